"""The daemon-wide cache of loaded model backends.

Activation memory (``kv_build``, ``kv_rebuild``) and parameter memory (LoRA)
name a model by its local directory.  Loading one costs seconds and hundreds
of megabytes, so the daemon keeps the backends it loaded in one
:class:`ModelCache`, keyed by ``(resolved path, dtype, device)``:

* **One load per model**: the first caller of a key loads it *outside* the
  cache's lock; concurrent callers of the same key wait for that load (and
  share its error), callers of other keys are not blocked, so two different
  models load at the same time.  A failed load is not cached.
* **LRU with a size bound** (``models.max_loaded``): past it the least
  recently used backend is dropped from the cache (users still holding it
  keep a valid object; its memory goes when they let go).
* **Who may name what** (:meth:`ModelCache.resolve`): admins may load any
  readable directory; other principals only a directory under one of
  ``models.allowed_dirs`` (checked on the resolved path, so a symlink cannot
  escape).  Errors: :class:`NotFound` ``no_model`` (no such directory),
  :class:`Forbidden` ``model_not_allowed``, :class:`BadRequest`
  ``not_causal_lm`` (no ``config.json``, or its ``architectures`` name no
  causal LM) and ``bad_model`` (transformers could not load it).

The service exposes the cache as ``svc.models``.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final

from memosd.errors import BadRequest, Forbidden, MemosError, NotFound
from memosd.models.backend import HFBackend, ModelBackend, resolve_device, resolve_dtype

__all__ = ["ModelCache", "ModelKey", "check_model_dir"]

ModelKey = tuple[str, str, str]  # (resolved path, dtype name, device)
Loader = Callable[..., ModelBackend]

#: ``architectures`` entries that name a causal LM (transformers' conventions).
_CAUSAL_SUFFIXES: Final = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_model_dir(path: str | Path) -> Path:
    """The resolved directory of a causal LM, or NotFound/BadRequest (see the module doc)."""
    directory = Path(path).expanduser()
    try:
        directory = directory.resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFound(f"no model directory {str(path)!r}", reason="no_model") from None
    if not directory.is_dir():
        raise NotFound(f"{str(path)!r} is not a directory", reason="no_model")
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadRequest(
            f"{directory} is not a model directory (no config.json)", reason="not_causal_lm"
        ) from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {config_path}: {exc}", reason="not_causal_lm") from None
    if not isinstance(config, dict):
        raise BadRequest(f"{config_path} is not a JSON object", reason="not_causal_lm")
    architectures = config.get("architectures")
    if architectures and not any(
        isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in architectures
    ):
        raise BadRequest(
            f"{directory} is not a causal language model (architectures {architectures})",
            reason="not_causal_lm",
        )
    return directory


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


class ModelCache:
    """Loaded model backends, shared by every subsystem of the daemon (module doc)."""

    def __init__(
        self,
        *,
        allowed_dirs: Iterable[str | Path] = (),
        dtype: str = "float32",
        device: str = "cpu",
        max_loaded: int = 2,
        fingerprint_cache_dir: Path | None = None,
        loader: Loader | None = None,
    ) -> None:
        if max_loaded < 1:
            raise BadRequest("max_loaded must be >= 1")
        roots = []
        for d in allowed_dirs:
            p = Path(d).expanduser()
            try:
                roots.append(p.resolve(strict=True))
            except (OSError, RuntimeError):
                roots.append(p.resolve())  # may appear later; compared as written
        self.allowed_dirs: tuple[Path, ...] = tuple(roots)
        self.default_dtype = dtype
        self.default_device = device
        self.max_loaded = max_loaded
        self.fingerprint_cache_dir = fingerprint_cache_dir
        self._loader: Loader = loader if loader is not None else HFBackend.load
        self._lock = threading.Lock()
        self._loaded: OrderedDict[ModelKey, ModelBackend] = OrderedDict()
        self._loading: dict[ModelKey, Future[ModelBackend]] = {}
        self.loads = 0  # completed loads (tests, status)

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        fingerprint_cache_dir: Path | None = None,
        loader: Loader | None = None,
    ) -> ModelCache:
        """From a :class:`memosd.settings.ModelsSettings` section.

        ``loader`` is the factory of the configured model backend
        (``models.backend``, registered through ``register_model_backends``);
        ``None`` means the built-in Hugging Face one.
        """
        return cls(
            allowed_dirs=settings.allowed_dirs,
            dtype=settings.dtype,
            device=settings.device,
            max_loaded=settings.max_loaded,
            fingerprint_cache_dir=fingerprint_cache_dir,
            loader=loader,
        )

    # --- access --------------------------------------------------------------------

    def resolve(self, path: str | Path, *, admin: bool) -> Path:
        """The model directory a caller may use (NotFound / Forbidden / BadRequest)."""
        if not isinstance(path, str | Path) or not str(path):
            raise BadRequest("model must be a directory path", reason="bad_arg", field="model")
        directory = check_model_dir(path)
        if not admin and not _under(directory, self.allowed_dirs):
            raise Forbidden(
                f"model {directory} is not under an allowed model directory "
                "(models.allowed_dirs); only admins may load other models",
                reason="model_not_allowed",
            )
        if not os.access(directory, os.R_OK | os.X_OK):
            raise Forbidden(f"model directory {directory} is not readable", reason="unreadable")
        return directory

    def key(self, directory: Path, dtype: str | None, device: str | None) -> ModelKey:
        dtype_name = resolve_dtype(dtype or self.default_dtype, directory)
        return (str(directory), dtype_name, resolve_device(device or self.default_device))

    # --- loading -------------------------------------------------------------------

    def get(
        self,
        path: str | Path,
        *,
        admin: bool = True,
        dtype: str | None = None,
        device: str | None = None,
    ) -> ModelBackend:
        """The backend of ``path`` (loaded once; blocking: call from a worker thread)."""
        directory = self.resolve(path, admin=admin)
        key = self.key(directory, dtype, device)
        with self._lock:
            backend = self._loaded.get(key)
            if backend is not None:
                self._loaded.move_to_end(key)
                return backend
            pending = self._loading.get(key)
            owner = pending is None
            if pending is None:
                pending = Future()
                self._loading[key] = pending
        if not owner:
            return pending.result()
        try:
            backend = self._load(key)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._loading.pop(key, None)
            self._loaded[key] = backend
            self._loaded.move_to_end(key)
            self.loads += 1
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        pending.set_result(backend)
        return backend

    def _load(self, key: ModelKey) -> ModelBackend:
        path, dtype, device = key
        try:
            return self._loader(
                path, dtype=dtype, device=device, fingerprint_cache_dir=self.fingerprint_cache_dir
            )
        except MemosError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise BadRequest(
                f"cannot load the model at {path}: {type(exc).__name__}: {exc}"[:2000],
                reason="bad_model",
            ) from None

    # --- introspection -------------------------------------------------------------

    def loaded(self) -> list[dict[str, Any]]:
        """The loaded backends, least recently used first (for ``status``)."""
        with self._lock:
            items = list(self._loaded.items())
        return [
            {"path": k[0], "dtype": k[1], "device": k[2], "fingerprint": b.fingerprint}
            for k, b in items
        ]

    def clear(self) -> None:
        """Forget every loaded backend (loads in flight finish and are cached)."""
        with self._lock:
            self._loaded.clear()
