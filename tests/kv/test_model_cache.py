"""ModelCache: one load per model, concurrent loads of different models, LRU, access."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from memosd.errors import BadRequest, Forbidden, NotFound
from memosd.models import HFBackend
from memosd.models.cache import ModelCache


def _model_dir(root: Path, name: str, arch: str = "LlamaForCausalLM") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": [arch], "dtype": "float32"}))
    return d


class FakeLoader:
    """Records loads; each load blocks until released (to overlap them)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.both_started = threading.Event()
        self.fail_once: set[str] = set()

    def __call__(self, path: str, **kwargs: Any) -> Any:
        with self.lock:
            self.started.append(path)
            if len(set(self.started)) >= 2:
                self.both_started.set()
        assert self.release.wait(10)
        if path in self.fail_once:
            self.fail_once.discard(path)
            raise OSError("weights unreadable")
        return type("B", (), {"fingerprint": path, "path": path, **kwargs})()


def test_one_load_per_model_and_concurrent_loads(tmp_path: Path) -> None:
    a, b = _model_dir(tmp_path, "a"), _model_dir(tmp_path, "b")
    loader = FakeLoader()
    cache = ModelCache(loader=loader, max_loaded=2)
    results: dict[int, Any] = {}

    def get(i: int, path: Path) -> None:
        results[i] = cache.get(path)

    threads = [threading.Thread(target=get, args=(i, p)) for i, p in enumerate([a, a, b, a, b])]
    for t in threads:
        t.start()
    # Both models are loading at the same time (neither waits for the other's lock).
    assert loader.both_started.wait(10)
    loader.release.set()
    for t in threads:
        t.join(10)
    assert sorted(loader.started) == sorted([str(a.resolve()), str(b.resolve())])
    assert results[0] is results[1] is results[3]
    assert results[2] is results[4]
    assert cache.loads == 2


def test_lru_bound_and_failed_load_not_cached(tmp_path: Path) -> None:
    dirs = [_model_dir(tmp_path, n) for n in "abc"]
    loader = FakeLoader()
    loader.release.set()
    cache = ModelCache(loader=loader, max_loaded=2)
    first = cache.get(dirs[0])
    cache.get(dirs[1])
    cache.get(dirs[0])  # a is now the most recently used
    cache.get(dirs[2])  # evicts b
    assert [m["path"] for m in cache.loaded()] == [str(dirs[0]), str(dirs[2])]
    assert cache.get(dirs[0]) is first
    loader.fail_once.add(str(dirs[1]))
    with pytest.raises(BadRequest) as exc:
        cache.get(dirs[1])
    assert exc.value.reason == "bad_model"
    assert cache.get(dirs[1]) is not None  # retried, not a cached failure


def test_access_rules(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    inside = _model_dir(allowed, "m")
    outside = _model_dir(tmp_path / "other", "m")
    link = allowed / "escape"
    link.symlink_to(outside)
    cache = ModelCache(allowed_dirs=[allowed])
    assert cache.resolve(inside, admin=False) == inside.resolve()
    assert cache.resolve(outside, admin=True) == outside.resolve()
    for path in (outside, link):
        with pytest.raises(Forbidden) as forb:
            cache.resolve(path, admin=False)
        assert forb.value.reason == "model_not_allowed"
    with pytest.raises(NotFound) as nf:
        cache.resolve(tmp_path / "missing", admin=True)
    assert nf.value.reason == "no_model"
    (tmp_path / "empty").mkdir()
    encoder = _model_dir(tmp_path, "bert", arch="BertModel")
    for path in (tmp_path / "empty", encoder):
        with pytest.raises(BadRequest) as bad:
            cache.resolve(path, admin=True)
        assert bad.value.reason == "not_causal_lm"


def test_real_model_loads_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = ModelCache(fingerprint_cache_dir=tmp_path)
    backend = cache.get(tiny_model_dir, dtype="auto")
    assert isinstance(backend, HFBackend)
    assert backend.dtype == "float32"
    assert cache.get(tiny_model_dir) is backend  # "auto" resolved to the same key
