"""The one settings registry of memosd.

Every setting is a field of a frozen dataclass below; its help text, unit,
bounds and choices live in the field's ``metadata``.  The registry
(:func:`describe_settings`), the TOML/env/CLI parsers and the generated table
in ``docs/configuration.md`` are all derived from these dataclasses, so there
is exactly one place to add a setting.

Precedence, lowest to highest::

    defaults  <  TOML file  <  environment  <  CLI overrides

* TOML (``tomllib``): top-level keys ``data_dir``, ``socket``,
  ``events_socket`` and the sections ``[log]``, ``[server]``, ``[storage]``,
  ``[auth]``, ``[plugins]``.  The file is ``config_path`` if given, else ``$MEMOSD_CONFIG``
  if set, else none.
* Environment: ``MEMOSD_<NAME>`` with dots turned into underscores, e.g.
  ``MEMOSD_SERVER_MAX_MESSAGE_BYTES``, ``MEMOSD_DATA_DIR``, ``MEMOSD_SOCKET``.
  Other ``MEMOSD_*`` variables (``MEMOSD_TOKEN``, ``MEMOSD_CONFIG``) are not
  settings and are ignored here, but an unknown variable under a settings
  section prefix (``MEMOSD_SERVER_*``...) is rejected, so a typo cannot be
  silently ignored.
* CLI overrides: a mapping of dotted names to values (typed values or strings,
  which are parsed like environment values).

Unknown keys and values of the wrong type raise :class:`SettingsError` (a
:class:`~memosd.errors.BadRequest`) naming the setting, where it came from and
a "did you mean" hint.

Path defaults: under systemd ``$STATE_DIRECTORY`` and
``$RUNTIME_DIRECTORY/memosd.sock``; otherwise ``$XDG_STATE_HOME/memosd``
(fallback ``~/.local/state/memosd``) and ``$XDG_RUNTIME_DIR/memosd/memosd.sock``
(fallback ``<data_dir>/run/memosd.sock``).  The events socket defaults to
``events.sock`` next to the request socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from memosd.errors import BadRequest

__all__ = [
    "LOG_LEVELS",
    "SYSTEM_SOCKET_PATH",
    "AuthSettings",
    "IndexSectionSettings",
    "KvSettings",
    "LogSettings",
    "LoraSectionSettings",
    "ModelsSettings",
    "PluginSettings",
    "SchedulerSettings",
    "ServerSettings",
    "SettingInfo",
    "Settings",
    "SettingsError",
    "StorageSettings",
    "default_data_dir",
    "default_socket_path",
    "describe_settings",
    "events_socket_for",
    "load_settings",
    "render_markdown_table",
    "settings_as_dict",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")

#: Where a system-wide daemon (systemd unit ``memosd.service``) listens.
SYSTEM_SOCKET_PATH: Final = Path("/run/memosd/memosd.sock")

SOCKET_NAME: Final = "memosd.sock"
EVENTS_SOCKET_NAME: Final = "events.sock"
ENV_PREFIX: Final = "MEMOSD_"
# ZeroMQ socket options are C ints (HWMs, heartbeats) or int64 (MAXMSGSIZE).
_C_INT_MAX: Final = 2**31 - 1
_INT64_MAX: Final = 2**63 - 1


class SettingsError(BadRequest):
    """A setting is unknown, has the wrong type or is out of range."""

    default_reason = "bad_setting"


def expand_user(text: str) -> Path:
    """``text`` as a path, ``~``/``~user`` expanded; :class:`SettingsError` for an unknown user."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~nobody-by-that-name": no home directory to expand to
        raise SettingsError(f"cannot expand {text!r}: no such user or home directory") from None


def _setting(
    default: Any,
    help: str,
    *,
    unit: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    reloadable: bool = False,
) -> Any:
    """A dataclass field carrying its registry entry in ``metadata``."""
    metadata = {
        "help": help,
        "unit": unit,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "reloadable": reloadable,
    }
    if isinstance(default, tuple | list | dict):
        frozen = tuple(default)
        return field(default_factory=lambda: frozen, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: how the daemon logs (reloaded on SIGHUP)."""

    format: Literal["auto", "json", "console"] = _setting(
        "auto",
        "Log format: `json` (one JSON object per line), `console` (readable, "
        "for a terminal) or `auto` (JSON under systemd or when stderr is not a "
        "terminal, console otherwise).",
        reloadable=True,
    )
    level: str = _setting(
        "info",
        "Lowest level logged. Memory contents are only ever logged at `debug`.",
        choices=LOG_LEVELS,
        reloadable=True,
    )


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """``[server]``: the ZeroMQ request/event sockets."""

    max_message_bytes: int = _setting(
        64 * MiB,
        "Largest request accepted (ZMQ_MAXMSGSIZE); a bigger message drops the "
        "connection of the peer that sent it.",
        unit="bytes",
        minimum=1024,
        maximum=_INT64_MAX,
    )
    max_inflight: int = _setting(
        256,
        "Requests processed concurrently; further requests wait in the socket queue.",
        minimum=1,
        maximum=65536,
    )
    drain_timeout_s: float = _setting(
        10.0,
        "On SIGTERM, how long in-flight requests may take to finish before the "
        "daemon checkpoints and exits anyway.",
        unit="seconds",
        minimum=0.0,
        maximum=86400.0,
    )
    rcvhwm: int = _setting(
        10000,
        "Receive high-water mark of the request socket (messages queued before "
        "ZeroMQ stops reading from peers).",
        unit="messages",
        minimum=0,
        maximum=_C_INT_MAX,
    )
    sndhwm: int = _setting(
        10000,
        "Send high-water mark of the request socket and the admin events socket "
        "(replies and events queued per peer; a reply beyond it is dropped, "
        "subscription events wait in `server.subscriber_queue`).",
        unit="messages",
        minimum=0,
        maximum=_C_INT_MAX,
    )
    subscriber_queue: int = _setting(
        1000,
        "Change-feed events queued per subscriber while its connection is full; "
        "beyond it events are dropped and the subscriber gets one `gap` event "
        "saying how many it missed.",
        unit="events",
        minimum=1,
        maximum=_C_INT_MAX,
    )
    heartbeat_ivl_ms: int = _setting(
        5000,
        "ZMTP heartbeat interval (ZMQ_HEARTBEAT_IVL); 0 disables heartbeats.",
        unit="milliseconds",
        minimum=0,
        maximum=_C_INT_MAX,
    )
    heartbeat_timeout_ms: int = _setting(
        15000,
        "A peer silent for this long is disconnected (ZMQ_HEARTBEAT_TIMEOUT).",
        unit="milliseconds",
        minimum=0,
        maximum=_C_INT_MAX,
    )
    request_timeout_s: float = _setting(
        300.0,
        "Longest a single request may run before it fails with `unavailable`.",
        unit="seconds",
        minimum=0.001,
        maximum=86400.0,
    )


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """``[storage]``: the storage engine (WAL + LMDB)."""

    wal_segment_bytes: int = _setting(
        64 * MiB,
        "Size at which the WAL rolls over to a new segment file.",
        unit="bytes",
        minimum=64 * KiB,
        maximum=_INT64_MAX,
    )
    checkpoint_interval_s: float = _setting(
        60.0,
        "Time between automatic checkpoints (LMDB synced, old WAL segments deleted).",
        unit="seconds",
        minimum=0.1,
        maximum=86400.0,
    )
    checkpoint_wal_bytes: int = _setting(
        256 * MiB,
        "WAL bytes written since the last checkpoint that trigger an early checkpoint.",
        unit="bytes",
        minimum=64 * KiB,
        maximum=_INT64_MAX,
    )
    initial_map_size: int = _setting(
        256 * MiB,
        "Initial LMDB map size; it doubles automatically when full.",
        unit="bytes",
        minimum=1 * MiB,
        maximum=_INT64_MAX,
    )
    max_batch: int = _setting(
        1024,
        "Most WAL records written (and fsynced) together in one group commit.",
        unit="records",
        minimum=1,
        maximum=1_000_000,
    )
    max_text_bytes: int = _setting(
        1 * MiB,
        "Largest text of one memory item (UTF-8 bytes); larger ones fail with `too_large`.",
        unit="bytes",
        minimum=1,
        maximum=_INT64_MAX,
    )
    deferred_adds: int = _setting(
        256,
        "Adds acknowledged once durable in the WAL and served from memory until LMDB "
        "applies them together: at most this many wait (0: every add is applied first).",
        unit="adds",
        minimum=0,
        maximum=1_000_000,
    )
    deferred_add_max_s: float = _setting(
        0.005,
        "Longest a deferred add waits before LMDB applies it; a scan, any other write or "
        "a checkpoint has it applied sooner.",
        unit="seconds",
        minimum=0.0,
        maximum=10.0,
    )


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """``[auth]``: who is admin."""

    admin_uids: tuple[int, ...] = _setting(
        (),
        "Extra uids treated as admin (root and the daemon's own uid always are).",
    )


@dataclass(frozen=True, slots=True)
class IndexSectionSettings:
    """``[index]``: the search indexes (docs/retrieval.md)."""

    enabled: bool = _setting(
        True,
        "Keep dense + lexical search indexes; when false, `search` falls back to a "
        "plain lexical scan of the cube.",
    )
    embedder: str = _setting(
        "minilm",
        "`minilm` (the embedded all-MiniLM-L6-v2, offline), the name of an embedder a "
        "plugin registers (`register_embedders`), a path to a local "
        "sentence-transformers model directory, or `hashing` (a tiny deterministic "
        "embedder for tests only: no semantic quality).",
    )
    embed_dtype: str = _setting(
        "auto",
        "Precision of the `minilm` or model-directory embedder's weights: `bfloat16` "
        "(2x the batch throughput of `float32` on a CPU with AVX512-BF16 or AMX; vectors "
        "within cosine 0.9999 of float32), `float32`, or `auto` (bfloat16 where the CPU "
        "has native bfloat16, else float32). Plugin embedders choose their own.",
        choices=("auto", "float32", "bfloat16"),
    )
    hnsw_threshold: int = _setting(
        4_000,
        "Items in a cube past which its dense index switches from exact (flat) to HNSW, "
        "built in the background without downtime.",
        unit="items",
        minimum=1,
    )
    ef_search: int = _setting(128, "HNSW efSearch (recall vs. speed).", minimum=1, maximum=4096)
    vector_storage: str = _setting(
        "float16",
        "How the dense index stores vectors: `float16` (half the memory: 768 bytes per "
        "384-d vector; recall@10 0.99+ of exact float32 search) or `float32`. An index "
        "loaded from a snapshot keeps its storage until its next rebuild.",
        choices=("float16", "float32"),
    )
    fusion: str = _setting(
        "score",
        "How hybrid search fuses dense and lexical results: weighted `score` or `rrf`.",
        choices=("score", "rrf"),
    )
    neighbour_weight: float = _setting(
        0.3,
        "Conversation smoothing: a search candidate's score gains this fraction of the "
        "best score among the items written just before and after it in the same "
        "session (evidence often sits next to the turn a question matches). 0 turns it off.",
        minimum=0.0,
        maximum=10.0,
    )
    embed_workers: int = _setting(
        2,
        "Embedding calls the background indexer runs at once when writes pile up "
        "(each on its own model instance with one torch thread); 1: one batch at a time.",
        minimum=1,
        maximum=16,
    )
    wait_timeout_s: float = _setting(
        10.0,
        "How long a search waits for the caller's own writes to become searchable "
        "(read-your-writes) before failing with `unavailable`/`index_lagging`.",
        unit="s",
        minimum=0.0,
    )
    inline_search_us: int = _setting(
        2000,
        "A search estimated to take at most this long (CPU time measured on earlier searches "
        "of the same cubes and kind, plus the query embedding unless cached) runs on the "
        "daemon's event loop instead of a worker thread (no thread hops); it bounds how "
        "long one search may hold up other requests. 0: every search in a thread.",
        unit="us",
        minimum=0,
        maximum=100_000,
    )


@dataclass(frozen=True, slots=True)
class PluginSettings:
    """``[plugins]``: which installed plugins load (docs/plugins.md)."""

    allow: tuple[str, ...] = _setting(
        ("*",),
        "Plugins (entry-point names in group `memosd.plugins`) allowed to load; `*` "
        "allows every installed plugin. Others are listed as `disabled`. Built-ins always load.",
    )
    required: tuple[str, ...] = _setting(
        (),
        "Plugins that must load: if one is missing or fails, the daemon refuses to start "
        "(others that fail are reported and skipped).",
    )
    modules: tuple[str, ...] = _setting(
        (),
        "Extra plugin modules imported by name, after the entry points (development and "
        "tests; not subject to `allow`).",
    )


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """``[scheduler]``: the job runner and the tier scheduler (docs/scheduler.md)."""

    enabled: bool = _setting(
        True,
        "Run background jobs and tier policies. Off: jobs stay queued and no tier "
        "policy runs (queued jobs run when it is turned back on).",
    )
    concurrency: int = _setting(
        2,
        "Jobs that run at the same time (worker threads; heavy jobs such as LoRA "
        "training also use a worker process each).",
        minimum=1,
        maximum=64,
    )
    tick_s: float = _setting(
        60.0,
        "How often tier policies are asked for periodic work (heat decay, consolidation, "
        "forgetting).",
        unit="s",
        minimum=0.05,
    )
    poll_s: float = _setting(
        5.0,
        "Safety-net interval at which the job runner rescans the queue (it is woken on "
        "every queued job anyway).",
        unit="s",
        minimum=0.01,
    )
    default_policies: tuple[str, ...] = _setting(
        ("plaintext",),
        "Tier policies enabled on a cube whose config does not list its own "
        "(`tier_policy.policies`).",
    )
    job_retention_s: float = _setting(
        7 * 86400.0,
        "Succeeded and cancelled jobs are deleted this long after their last change "
        "(an hourly sweep; 0 keeps them forever).",
        unit="s",
        minimum=0.0,
    )
    failed_job_retention_s: float = _setting(
        30 * 86400.0,
        "Failed jobs are deleted this long after they failed (kept longer than the others so "
        "failures stay visible; 0 keeps them forever).",
        unit="s",
        minimum=0.0,
    )


@dataclass(frozen=True, slots=True)
class ModelsSettings:
    """``[models]``: local model directories for activation and parameter memory."""

    backend: str = _setting(
        "hf",
        "Model backend that loads a model directory: `hf` (Hugging Face causal LM, "
        "built in) or a name a plugin registers (`register_model_backends`). KV caches "
        "are built with it; LoRA training's worker process always loads the model with "
        "Hugging Face + peft.",
    )

    allowed_dirs: tuple[str, ...] = _setting(
        (),
        "Directories under which non-admin clients may name a model (`kv build --model`, "
        "LoRA); admins may use any readable directory. Paths are compared after "
        "resolving symlinks.",
    )
    dtype: str = _setting(
        "float32",
        "dtype a model is loaded in when the client names none (`auto`: the config's).",
        choices=("float32", "float16", "bfloat16", "auto"),
    )
    device: str = _setting(
        "cpu",
        "Device models are loaded on: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).",
    )
    max_loaded: int = _setting(
        2,
        "Models kept loaded at once (least recently used dropped first).",
        minimum=1,
        maximum=64,
    )


@dataclass(frozen=True, slots=True)
class KvSettings:
    """``[kv]``: activation memory (KV caches, docs/activation-memory.md)."""

    budget_bytes: int = _setting(
        0,
        "Byte budget of all stored KV caches (chunk blobs, a shared chunk once); after "
        "each build the least recently used caches are evicted until they fit. 0: no budget.",
        unit="bytes",
        minimum=0,
        maximum=_INT64_MAX,
    )
    eviction: str = _setting(
        "lru",
        "Which caches the budget evicts first: `lru` (least recently fetched) or `heat` "
        "(coldest by hits decayed with a one-hour half-life, or the tier policy's heat).",
        choices=("lru", "heat"),
    )
    ram_cache_bytes: int = _setting(
        256 * MiB,
        "Assembled caches kept in the daemon's RAM for `kv_get` (LRU).",
        unit="bytes",
        minimum=0,
        maximum=_INT64_MAX,
    )
    quant: str = _setting(
        "none",
        "Default storage of new caches: `none` (the model's dtype) or `int8` (keys per "
        "channel, values per token; about 4x smaller, small logit error).",
        choices=("none", "int8"),
    )
    auto_rebuild: bool = _setting(
        True,
        "Queue a `kv.rebuild` job when a source of a KV cache changes, is deleted or "
        "purged (the cache is marked stale or erased either way).",
    )


@dataclass(frozen=True, slots=True)
class LoraSectionSettings:
    """``[lora]``: parameter memory (LoRA adapters, docs/parameter-memory.md).

    The hyperparameters are the daemon's defaults for `lora_train`; a request
    may override each of them (and the rest of `memosd.lora.LoraSettings`).
    """

    auto_retrain: bool = _setting(
        True,
        "Queue a `lora.retrain` job when an item an adapter was trained on is purged "
        "(the adapter is stale and never served either way).",
    )
    rank: int = _setting(8, "LoRA rank r of each adapted matrix.", minimum=1, maximum=1024)
    alpha: int = _setting(
        16, "LoRA scaling numerator: the update is (alpha / rank) * BA.", minimum=1
    )
    target_modules: tuple[str, ...] = _setting(
        ("q_proj", "v_proj"), "Names of the linear modules to adapt."
    )
    learning_rate: float = _setting(2e-3, "AdamW learning rate.", minimum=1e-12, maximum=1000.0)
    epochs: int = _setting(4, "Passes over the training samples.", minimum=1, maximum=1000)
    batch_size: int = _setting(8, "Samples per optimiser step.", minimum=1, maximum=4096)
    max_tokens: int = _setting(
        65_536,
        "Token budget of the training set (one epoch); later items are skipped.",
        minimum=1,
        maximum=1 << 32,
    )
    max_seq_len: int = _setting(
        256, "Tokens per sample; longer memories are truncated.", minimum=2, maximum=1 << 20
    )
    min_memory_ppl_drop: float = _setting(
        0.20,
        "Promotion gate: perplexity on the trained memories must drop by at least this share.",
        minimum=0.0,
        maximum=1.0,
    )
    max_control_ppl_rise: float = _setting(
        0.10,
        "Promotion gate: perplexity on the shipped control text may rise by at most this share.",
        minimum=0.0,
    )
    torch_threads: int = _setting(
        0,
        "torch intra-op threads of the training worker process; 0 = torch's default.",
        minimum=0,
        maximum=1024,
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """All daemon settings.  Build it with :func:`load_settings`."""

    # Path defaults are computed by load_settings (see _PATH_DEFAULT_DOC).
    data_dir: Path = _setting(  # noqa: RUF009 - a field() with registry metadata
        Path("."),
        "Directory of the WAL, the LMDB store, indexes and blobs.",
    )
    socket: Path = _setting(  # noqa: RUF009
        Path(SOCKET_NAME),
        "ZeroMQ ipc path of the request socket (ROUTER).",
    )
    events_socket: Path = _setting(  # noqa: RUF009
        Path(EVENTS_SOCKET_NAME),
        "ZeroMQ ipc path of the admin change feed (PUB, mode 0600: the daemon's "
        "user only; clients use `subscribe`).",
    )
    log: LogSettings = field(default_factory=LogSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    index: IndexSectionSettings = field(default_factory=IndexSectionSettings)
    plugins: PluginSettings = field(default_factory=PluginSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    kv: KvSettings = field(default_factory=KvSettings)
    lora: LoraSectionSettings = field(default_factory=LoraSectionSettings)


_SECTIONS: Final[dict[str, type[Any]]] = {
    "log": LogSettings,
    "server": ServerSettings,
    "storage": StorageSettings,
    "auth": AuthSettings,
    "index": IndexSectionSettings,
    "plugins": PluginSettings,
    "scheduler": SchedulerSettings,
    "models": ModelsSettings,
    "kv": KvSettings,
    "lora": LoraSectionSettings,
}

_PATH_DEFAULT_DOC: Final[dict[str, str]] = {
    "data_dir": "`$STATE_DIRECTORY`, else `$XDG_STATE_HOME/memosd`, else `~/.local/state/memosd`",
    "socket": "`$RUNTIME_DIRECTORY/memosd.sock`, else `$XDG_RUNTIME_DIR/memosd/memosd.sock`, "
    "else `<data_dir>/run/memosd.sock`",
    "events_socket": "`events.sock` next to `socket`",
}


# --- the registry -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """One registry entry, derived from a dataclass field."""

    name: str
    default: Any
    type: str
    help: str
    env: str
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    reloadable: bool = False
    default_doc: str | None = None
    """For computed defaults (paths): how the default is found."""

    @property
    def section(self) -> str | None:
        return self.name.split(".", 1)[0] if "." in self.name else None

    @property
    def key(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class _Entry:
    info: SettingInfo
    kind: Any  # the resolved type annotation


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "str"
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(kind)
        return f"list[{item.__name__}]"
    if kind is Path:
        return "path"
    return str(kind.__name__)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise AssertionError(f"setting {f.name} has no default")  # pragma: no cover


def _entries_of(cls: type[Any], section: str | None) -> list[_Entry]:
    hints = typing.get_type_hints(cls)
    entries: list[_Entry] = []
    for f in dataclasses.fields(cls):
        if f.name in _SECTIONS and section is None:
            continue
        meta = f.metadata
        name = f.name if section is None else f"{section}.{f.name}"
        kind = hints[f.name]
        choices = meta.get("choices")
        if typing.get_origin(kind) is Literal:
            choices = tuple(str(a) for a in typing.get_args(kind))
        info = SettingInfo(
            name=name,
            default=_default_of(f),
            type=_type_name(kind),
            help=str(meta["help"]),
            env=ENV_PREFIX + name.replace(".", "_").upper(),
            unit=meta.get("unit"),
            minimum=meta.get("minimum"),
            maximum=meta.get("maximum"),
            choices=choices,
            reloadable=bool(meta.get("reloadable")),
            default_doc=_PATH_DEFAULT_DOC.get(name),
        )
        entries.append(_Entry(info, kind))
    return entries


def _build_registry() -> dict[str, _Entry]:
    entries = _entries_of(Settings, None)
    for section, cls in _SECTIONS.items():
        entries.extend(_entries_of(cls, section))
    return {e.info.name: e for e in entries}


_REGISTRY: Final[dict[str, _Entry]] = _build_registry()
_BY_ENV: Final[dict[str, str]] = {e.info.env: name for name, e in _REGISTRY.items()}


def describe_settings() -> list[SettingInfo]:
    """Every setting, in declaration order (top-level first, then by section)."""
    return [e.info for e in _REGISTRY.values()]


# --- value parsing -----------------------------------------------------------------

_SIZE_RE: Final = re.compile(r"^\s*(\d[\d_]*)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "ki": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "mi": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "gi": GiB,
    "t": 1024 * GiB,
    "tb": 1024 * GiB,
    "tib": 1024 * GiB,
    "ti": 1024 * GiB,
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


class _BadValueError(Exception):
    """Internal: a value did not parse; turned into SettingsError with context."""


def _parse_int(value: Any, *, unit: str | None) -> int:
    if isinstance(value, bool):
        raise _BadValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if unit == "bytes":
            match = _SIZE_RE.match(text)
            if match:
                return (
                    int(match.group(1).replace("_", ""))
                    * _SIZE_UNITS[(match.group(2) or "").lower()]
                )
            raise _BadValueError(
                f"expected a size in bytes (e.g. 67108864 or '64MiB'), got {value!r}"
            )
        try:
            return int(text.replace("_", ""), 10)
        except ValueError:
            pass
    raise _BadValueError(f"expected an integer, got {value!r}")


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _BadValueError("expected a number, got a boolean")
    result: float | None = None
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            result = float(value.strip())
    if result is None or not math.isfinite(result):
        raise _BadValueError(f"expected a finite number, got {value!r}")
    return result


def _parse_value(entry: _Entry, value: Any) -> Any:
    kind = entry.kind
    info = entry.info
    origin = typing.get_origin(kind)
    if origin is Literal:
        allowed = typing.get_args(kind)
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in allowed:
            raise _BadValueError(f"expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return text
    if origin is tuple:
        (item_kind, _ellipsis) = typing.get_args(kind)
        if isinstance(value, str):
            items: list[Any] = [v for v in (p.strip() for p in value.split(",")) if v]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise _BadValueError(f"expected a list, got {value!r}")
        if item_kind is str:
            if not all(isinstance(v, str) and v.strip() for v in items):
                raise _BadValueError(f"expected a list of non-empty strings, got {value!r}")
            return tuple(v.strip() for v in items)
        if item_kind is not int:  # pragma: no cover - only int and str lists exist today
            raise AssertionError(item_kind)
        return tuple(_parse_int(v, unit=None) for v in items)
    if kind is int:
        result: Any = _parse_int(value, unit=info.unit)
    elif kind is float:
        result = _parse_float(value)
    elif kind is bool:
        if isinstance(value, bool):
            result = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            result = value.strip().lower() in _TRUE
        else:
            raise _BadValueError(f"expected true or false, got {value!r}")
    elif kind is Path:
        if isinstance(value, Path):
            result = value
        elif isinstance(value, str) and value.strip():
            try:
                result = expand_user(value.strip())
            except SettingsError as exc:
                raise _BadValueError(exc.message) from None
        else:
            raise _BadValueError(f"expected a path, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise _BadValueError(f"expected a string, got {value!r}")
        result = value.strip()
        if info.choices is not None:
            result = result.lower()
            if result not in info.choices:
                raise _BadValueError(f"expected one of {', '.join(info.choices)}, got {value!r}")
    else:  # pragma: no cover - a new setting type must be handled above
        raise AssertionError(f"unsupported setting type {kind!r}")
    if info.minimum is not None and result < info.minimum:
        raise _BadValueError(f"must be at least {_number(info.minimum)}, got {result!r}")
    if info.maximum is not None and result > info.maximum:
        raise _BadValueError(f"must be at most {_number(info.maximum)}, got {result!r}")
    return result


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _hint(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _set(values: dict[str, Any], name: str, raw: Any, source: str, *, shown: str) -> None:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise SettingsError(
            f"unknown setting {shown!r} in {source}{_hint(shown, _shown_names(shown))}",
            setting=shown,
            source=source,
        )
    try:
        values[name] = _parse_value(entry, raw)
    except _BadValueError as exc:
        raise SettingsError(
            f"bad value for setting {shown!r} in {source}: {exc}",
            setting=name,
            source=source,
        ) from None


def _shown_names(shown: str) -> list[str]:
    """The spelling family of ``shown`` (env names or dotted names) for hints."""
    if shown.startswith(ENV_PREFIX):
        return list(_BY_ENV)
    return list(_REGISTRY)


# --- sources ---------------------------------------------------------------------------


def _from_toml(path: Path, values: dict[str, Any]) -> None:
    source = f"config file {str(path)!r}"
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {str(path)!r} does not exist", source=str(path)) from None
    except OSError as exc:
        raise SettingsError(
            f"cannot read config file {str(path)!r}: {exc.strerror or exc}", source=str(path)
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{source} is not valid TOML: {exc}", source=str(path)) from None
    top_level = [i.name for i in describe_settings() if i.section is None]
    for key, value in document.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise SettingsError(
                    f"{key!r} in {source} must be a [{key}] table, got {value!r}",
                    setting=key,
                    source=str(path),
                )
            for sub_key, sub_value in value.items():
                _set(values, f"{key}.{sub_key}", sub_value, source, shown=f"{key}.{sub_key}")
        elif key in top_level:
            _set(values, key, value, source, shown=key)
        else:
            hint = _hint(key, [*top_level, *_SECTIONS, *_REGISTRY])
            raise SettingsError(
                f"unknown setting {key!r} in {source}{hint}", setting=key, source=str(path)
            )


def _from_env(env: Mapping[str, str], values: dict[str, Any]) -> None:
    section_prefixes = tuple(f"{ENV_PREFIX}{s.upper()}_" for s in _SECTIONS)
    for var in sorted(env):
        name = _BY_ENV.get(var)
        if name is not None:
            _set(values, name, env[var], f"environment variable {var}", shown=name)
        elif var.startswith(section_prefixes):
            raise SettingsError(
                f"unknown setting in environment variable {var}{_hint(var, _BY_ENV)}",
                setting=var,
                source="environment",
            )


def _from_overrides(overrides: Mapping[str, Any], values: dict[str, Any]) -> None:
    for name, raw in overrides.items():
        if raw is None:
            continue  # an unset CLI flag
        _set(values, name, raw, "command-line options", shown=name)


# --- path defaults ---------------------------------------------------------------------


def _first_dir(value: str | None) -> Path | None:
    """systemd passes ``StateDirectory=a b`` as ``/var/lib/a:/var/lib/b``."""
    if not value:
        return None
    first = value.split(":", 1)[0]
    return Path(first) if first else None


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The daemon's data directory when none is configured."""
    env = os.environ if env is None else env
    state = _first_dir(env.get("STATE_DIRECTORY"))
    if state is not None:
        return state
    xdg = env.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else _home(env) / ".local" / "state"
    return base / "memosd"


def _daemon_default_socket(env: Mapping[str, str], data_dir: Path) -> Path:
    runtime = _first_dir(env.get("RUNTIME_DIRECTORY"))
    if runtime is not None:
        return runtime / SOCKET_NAME
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "memosd" / SOCKET_NAME
    return data_dir / "run" / SOCKET_NAME


def events_socket_for(socket: Path) -> Path:
    """The default change-feed socket for a request socket path."""
    return socket.parent / EVENTS_SOCKET_NAME


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """Where a *client* looks for the daemon when no socket is given.

    ``$MEMOSD_SOCKET`` if set; otherwise the per-user daemon's path
    (``$XDG_RUNTIME_DIR/memosd/memosd.sock``, else
    ``~/.local/state/memosd/run/memosd.sock``) if it exists, else the system
    daemon's :data:`SYSTEM_SOCKET_PATH` if it exists, else the per-user path
    (so a "not running" message names where a user daemon would listen).

    ``$RUNTIME_DIRECTORY`` is deliberately ignored: in a client running as a
    systemd service it is the *client's* runtime directory.
    """
    env = os.environ if env is None else env
    explicit = env.get(ENV_PREFIX + "SOCKET")
    if explicit:
        return expand_user(explicit)
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        user = Path(xdg) / "memosd" / SOCKET_NAME
    else:
        xdg_state = env.get("XDG_STATE_HOME")
        state = (
            Path(xdg_state)
            if xdg_state and Path(xdg_state).is_absolute()
            else _home(env) / ".local" / "state"
        )
        user = state / "memosd" / "run" / SOCKET_NAME
    for candidate in (user, SYSTEM_SOCKET_PATH):
        if candidate.exists():
            return candidate
    return user


# --- loading -------------------------------------------------------------------------------


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, a TOML file, the environment and overrides.

    ``env`` defaults to ``os.environ``; ``overrides`` maps dotted setting names
    (``"server.max_inflight"``, ``"data_dir"``) to values; ``None`` values are
    skipped so unset CLI flags can be passed straight through.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if config_path is None and env.get(ENV_PREFIX + "CONFIG"):
        config_path = env[ENV_PREFIX + "CONFIG"]
    if config_path is not None:
        _from_toml(expand_user(str(config_path)), values)
    _from_env(env, values)
    if overrides:
        _from_overrides(overrides, values)

    data_dir = values.get("data_dir") or default_data_dir(env)
    socket = values.get("socket") or _daemon_default_socket(env, data_dir)
    events_socket = values.get("events_socket") or events_socket_for(socket)
    if events_socket == socket:
        raise SettingsError(
            f"events_socket and socket are the same path ({socket}); they must differ",
            setting="events_socket",
        )
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        prefix = section + "."
        kwargs = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        sections[section] = cls(**kwargs)
    server: ServerSettings = sections["server"]
    if 0 < server.heartbeat_timeout_ms < server.heartbeat_ivl_ms:
        raise SettingsError(
            "server.heartbeat_timeout_ms must not be shorter than server.heartbeat_ivl_ms "
            f"({server.heartbeat_timeout_ms} < {server.heartbeat_ivl_ms})",
            setting="server.heartbeat_timeout_ms",
        )
    return Settings(
        data_dir=Path(data_dir),
        socket=Path(socket),
        events_socket=Path(events_socket),
        **sections,
    )


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """Flat ``{dotted name: value}`` with JSON/TOML-friendly values (paths as str)."""
    flat: dict[str, Any] = {}
    for name in _REGISTRY:
        obj: Any = settings
        for part in name.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, Path):
            obj = str(obj)
        elif isinstance(obj, tuple):
            obj = list(obj)
        flat[name] = obj
    return flat


# --- documentation -------------------------------------------------------------------------


def _format_default(info: SettingInfo) -> str:
    if info.default_doc is not None:
        return info.default_doc
    value = info.default
    if info.unit == "bytes" and isinstance(value, int) and value >= KiB:
        for size, suffix in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
            if value % size == 0:
                return f"`{value}` ({value // size} {suffix})"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def render_markdown_table() -> str:
    """The settings table committed in docs/configuration.md (kept in sync by a test)."""
    lines = [
        "| Setting | Environment variable | Type | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for info in describe_settings():
        kind = info.type
        if info.choices:
            kind += ": " + ", ".join(f'"{c}"' for c in info.choices)
        if info.unit:
            kind += f", {info.unit}"
        if info.minimum is not None:
            kind += f", ≥ {_number(info.minimum)}"
        if info.maximum is not None and info.maximum < _INT64_MAX:
            kind += f", ≤ {_number(info.maximum)}"
        help_text = info.help + (" Reloaded on SIGHUP." if info.reloadable else "")
        lines.append(
            f"| `{info.name}` | `{info.env}` | {kind} | {_format_default(info)} | {help_text} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - `python -m memosd.settings` prints the table
    print(render_markdown_table(), end="")
