"""The memosd process: lock, recover, serve, drain, checkpoint, exit.

Lifecycle of :func:`serve` (one anyio task group):

1. Take an exclusive ``flock`` on ``<data_dir>/LOCK`` (a second daemon on the
   same data directory exits with :data:`EXIT_LOCKED` and a clear message).
2. Recover: ``Engine.open`` in a worker thread; meanwhile ``STATUS=`` and
   ``EXTEND_TIMEOUT_USEC=`` go to systemd every few seconds.
3. Prepare the socket directory (created 0750 if missing), remove a stale
   socket file left by a crash (only now that the lock is held, and only if
   nothing answers on it), bind (socket files 0660).
4. ``READY=1``, one readiness line on stderr; ``WATCHDOG=1`` periodically
   while the engine is healthy (the engine checkpoints by itself on its
   interval/WAL-size triggers).
5. Shutdown trigger (SIGTERM/SIGINT): ``STOPPING=1``, stop reading requests,
   drain in-flight ones for up to ``server.drain_timeout_s``, close the
   engine (final checkpoint), exit 0.  If the engine turns unhealthy (WAL
   poisoned by EIO/ENOSPC) writes fail with ``unavailable`` at once and the
   daemon shuts down the same way, exiting :data:`EXIT_UNHEALTHY` so systemd
   restarts it into a clean recovery.

SIGHUP reloads the configuration file and environment: ``log.level`` and
``log.format`` take effect at once; any other changed setting is logged as
"needs a restart" and ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import os
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import structlog
import zmq
from anyio.abc import TaskStatus

from memosd import __version__, sdnotify
from memosd.engine import Engine, EngineSettings
from memosd.errors import MemosError
from memosd.gcstats import GcPauses
from memosd.logs import configure_logging
from memosd.models.cache import ModelCache
from memosd.ops_kv import KvRuntime
from memosd.ops_lora import LoraRuntime
from memosd.plugins import builtin_models
from memosd.plugins.manager import RequiredPluginError
from memosd.plugins.runtime import PluginRuntime, load_plugins
from memosd.scheduling import SchedulerRuntime, open_scheduler
from memosd.server import Server, ipc_endpoint
from memosd.service import Service
from memosd.settings import Settings, SettingsError, load_settings, settings_as_dict

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_UNHEALTHY",
    "DaemonExitError",
    "DataDirLock",
    "main",
    "serve",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # unexpected error (traceback in the log)
EXIT_UNHEALTHY: Final = 69  # EX_UNAVAILABLE: storage failed; a restart recovers
EXIT_LOCKED: Final = 75  # EX_TEMPFAIL: another daemon uses this data dir or socket
EXIT_CONFIG: Final = 78  # EX_CONFIG: bad settings or unusable paths

_log = structlog.get_logger("memosd.daemon")
_EXTEND_EVERY_S: Final = 5.0
_EXTEND_BY_S: Final = 30.0
_HEALTH_POLL_S: Final = 0.25
# A cyclic-GC collection this long is logged (memosd.gcstats).
_LONG_GC_PAUSE_MS: Final = 100.0
SOCKET_DIR_MODE: Final = 0o750


class DaemonExitError(Exception):
    """A clean refusal to run: print ``message``, exit with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- the data-dir lock -------------------------------------------------------------


class DataDirLock:
    """``flock(LOCK_EX | LOCK_NB)`` on ``<data_dir>/LOCK``; the file holds our pid."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise DaemonExitError(
                EXIT_CONFIG, f"cannot create data dir {data_dir}: {exc}"
            ) from None
        path = data_dir / "LOCK"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DaemonExitError(EXIT_CONFIG, f"cannot open lock file {path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise DaemonExitError(
                    EXIT_LOCKED,
                    f"another memosd{who} is already using the data dir {data_dir}",
                ) from None
            raise DaemonExitError(EXIT_CONFIG, f"cannot lock {path}: {exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# --- socket paths ---------------------------------------------------------------------


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory (0750) if missing; remove a stale socket file.

    An existing directory keeps its mode (it may be ``$XDG_RUNTIME_DIR`` or a
    systemd ``RuntimeDirectory=`` whose mode the unit sets).  Call only while
    holding the data-dir lock.
    """
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            os.chmod(parent, SOCKET_DIR_MODE)
        except OSError as exc:
            raise DaemonExitError(
                EXIT_CONFIG, f"cannot create socket dir {parent}: {exc}"
            ) from None
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonExitError(
            EXIT_CONFIG, f"{path} exists and is not a socket; refusing to remove it"
        )
    if _socket_is_live(path):
        raise DaemonExitError(EXIT_LOCKED, f"another daemon is listening on {path}")
    _log.info("removing stale socket file", path=str(path))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _socket_is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False  # ECONNREFUSED: nobody listens (stale); anything else: not usable
        return True


# --- serve --------------------------------------------------------------------------------


def _engine_settings(settings: Settings) -> EngineSettings:
    st = settings.storage
    return EngineSettings(
        wal_segment_bytes=st.wal_segment_bytes,
        checkpoint_interval_s=st.checkpoint_interval_s,
        checkpoint_wal_bytes=st.checkpoint_wal_bytes,
        initial_map_size=st.initial_map_size,
        max_batch=st.max_batch,
        max_text_bytes=st.max_text_bytes,
        deferred_adds=st.deferred_adds,
        deferred_add_max_s=st.deferred_add_max_s,
    )


def _builtin(registrations: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Built-in registrations as a plugin manager holds them, for use without one."""
    return {name: (builtin_models.__name__, factory) for name, factory in registrations.items()}


def model_backend(settings: Settings, plugins: PluginRuntime | None) -> Any:
    """The loader of the model backend ``models.backend`` names (a plugin's or ``hf``)."""
    name = settings.models.backend
    registered = (
        plugins.manager.model_backends
        if plugins is not None
        else _builtin(dict(builtin_models.register_model_backends()))
    )
    if name in registered:
        return registered[name][1]
    raise DaemonExitError(
        EXIT_CONFIG,
        f"models.backend = {name!r}: no plugin registers that model backend "
        f"(registered: {', '.join(sorted(registered)) or 'none'})",
    )


def open_search(settings: Settings, engine: Any, plugins: PluginRuntime | None = None) -> Any:
    """The search indexes over ``engine`` (blocking: loads the embedder), or None.

    ``index.embedder`` names ``minilm``, ``hashing``, an embedder a plugin
    registers (``register_embedders``), or a local model directory.  What is
    indexed for an item comes from its memory form (``MemoryForm.index_text``).
    """
    ix = settings.index
    if not ix.enabled:
        return None
    # Heavy (torch, faiss): imported only when the indexes are enabled.
    from memosd.embed import Embedder, SentenceTransformerEmbedder  # noqa: PLC0415
    from memosd.index import IndexSettings, SearchService  # noqa: PLC0415

    manager = plugins.manager if plugins is not None else None
    # The built-ins (minilm, hashing) register through the same hook.
    embedders = (
        manager.embedders
        if manager is not None
        else _builtin(dict(builtin_models.register_embedders()))
    )
    embedder: Embedder
    if ix.embedder in embedders:
        plugin, factory = embedders[ix.embedder]
        # Only the built-in MiniLM takes the dtype: a plugin's factory keeps its own signature.
        builtin = plugin == builtin_models.__name__ and ix.embedder == "minilm"
        options = {"dtype": ix.embed_dtype} if builtin else {}
        try:
            embedder = factory(**options)
        except Exception as exc:  # a plugin's bug is a start-up config error, named
            raise DaemonExitError(
                EXIT_CONFIG, f"embedder {ix.embedder!r} of plugin {plugin!r} failed: {exc}"
            ) from exc
    else:
        embedder = SentenceTransformerEmbedder(ix.embedder, dtype=ix.embed_dtype)
    search = SearchService(
        engine,
        settings.data_dir,
        embedder=embedder,
        form_text=manager.forms.index_text if manager is not None else None,
        settings=IndexSettings(
            hnsw_threshold=ix.hnsw_threshold,
            ef_search=ix.ef_search,
            vector_storage=ix.vector_storage,
            fusion=ix.fusion,
            neighbour_weight=ix.neighbour_weight,
            embed_workers=ix.embed_workers,
            wait_timeout_s=ix.wait_timeout_s,
            inline_search_us=ix.inline_search_us,
        ),
    )
    search.start()
    return search


def open_engine(settings: Settings, on_progress: Callable[[str], None]) -> Engine:
    """The default engine factory: recover and open the store (blocking)."""
    return Engine.open(
        settings.data_dir, settings=_engine_settings(settings), on_progress=on_progress
    )


async def _open_engine(
    settings: Settings, factory: Callable[[Settings, Callable[[str], None]], Any]
) -> Any:
    progress = ["recovering"]

    def on_progress(message: str) -> None:
        progress[0] = message  # read by the keep-alive task below

    async def keep_systemd_waiting() -> None:
        while True:
            sdnotify.extend_timeout(_EXTEND_BY_S)
            sdnotify.status(f"recovery: {progress[0]}")
            await anyio.sleep(_EXTEND_EVERY_S)

    sdnotify.status("recovery: opening the store")
    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_systemd_waiting)
        try:
            engine = await anyio.to_thread.run_sync(factory, settings, on_progress)
        finally:
            tg.cancel_scope.cancel()
    return engine


@dataclass(slots=True)
class Running:
    """What :func:`serve` reports through ``task_status`` once it is ready."""

    server: Server
    engine: Any
    socket: Path
    events_socket: Path


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
    engine_factory: Callable[[Settings, Callable[[str], None]], Any] = open_engine,
) -> int:
    """Run the daemon until ``shutdown_trigger`` returns; the exit code to use.

    ``engine_factory(settings, on_progress)`` opens the engine in a worker
    thread (tests pass a wrapper to reach the engine they get).
    """
    lock = DataDirLock.acquire(settings.data_dir)
    try:
        # Plugins first: a required plugin that fails aborts before a long recovery.
        plugins = await anyio.to_thread.run_sync(_load_plugins, settings)
        engine = await _open_engine(settings, engine_factory)
        search = None
        scheduler = None
        kv = None
        lora = None
        try:
            sdnotify.status("loading the search indexes")
            search = await anyio.to_thread.run_sync(open_search, settings, engine, plugins)
            # Loaded model backends (shared by KV and LoRA) and activation memory.
            models = ModelCache.from_settings(
                settings.models,
                fingerprint_cache_dir=settings.data_dir / "cache",
                loader=model_backend(settings, plugins),
            )
            kv = KvRuntime(engine, settings, models, search=search)
            lora = LoraRuntime.from_settings(engine, settings.lora)  # parameter memory
            scheduler = open_scheduler(
                settings.scheduler,
                engine,
                plugins=plugins,
                embedder=search.embedder if search is not None else None,
                vector_lookup=search.known_vectors if search is not None else None,
                index_wait=search.wait_caught_up if search is not None else None,
                handlers={**kv.handlers(), **lora.handlers()},
            )
            return await _serve_engine(
                settings,
                engine,
                shutdown_trigger,
                task_status,
                search=search,
                plugins=plugins,
                scheduler=scheduler,
                models=models,
                kv=kv,
                lora=lora,
            )
        finally:
            if kv is not None:
                kv.close()
            if lora is not None:
                lora.close()
            if scheduler is not None:
                sdnotify.status("stopping background jobs")
                try:
                    await anyio.to_thread.run_sync(scheduler.close)
                except Exception:
                    _log.exception("stopping the scheduler failed")
            plugins.close()
            if search is not None:
                sdnotify.status("writing the search index snapshot")
                try:
                    await anyio.to_thread.run_sync(search.close)
                except Exception:
                    _log.exception("closing the search indexes failed")
            sdnotify.status("closing the store (final checkpoint)")
            try:
                await anyio.to_thread.run_sync(engine.close)
            except Exception:
                _log.exception("closing the engine failed")
    finally:
        lock.release()


def _load_plugins(settings: Settings) -> PluginRuntime:
    """Load plugins (docs/plugins.md); a failed *required* plugin is a config error."""
    try:
        return PluginRuntime(load_plugins(settings))
    except RequiredPluginError as exc:
        raise DaemonExitError(EXIT_CONFIG, exc.message) from None


async def _serve_engine(
    settings: Settings,
    engine: Any,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: TaskStatus[Running],
    *,
    search: Any = None,
    plugins: PluginRuntime | None = None,
    scheduler: SchedulerRuntime | None = None,
    models: ModelCache | None = None,
    kv: KvRuntime | None = None,
    lora: LoraRuntime | None = None,
) -> int:
    prepare_socket_path(settings.socket)
    prepare_socket_path(settings.events_socket)
    service = Service(
        engine,
        admin_uids=settings.auth.admin_uids,
        thread_limit=max(4, min(settings.server.max_inflight, 256)),
        events_endpoint=ipc_endpoint(settings.events_socket),
        search=search,
        plugins=plugins.manager if plugins is not None else None,
        scheduler=scheduler,
    )
    service.models = models
    service.kv = kv
    server = Server(
        service,
        settings.server,
        socket_path=settings.socket,
        events_path=settings.events_socket,
    )
    exit_code = EXIT_OK
    stop = anyio.Event()

    async def wait_for_trigger() -> None:
        await shutdown_trigger()
        stop.set()

    gc_pauses = GcPauses(long_ms=_LONG_GC_PAUSE_MS)
    service.gc_pauses = gc_pauses

    async def watch_health() -> None:
        nonlocal exit_code
        while engine.healthy:
            await anyio.sleep(_HEALTH_POLL_S)
            for pause in gc_pauses.take_long_pauses():
                _log.warning(
                    "long garbage-collector pause",
                    generation=pause.generation,
                    ms=round(pause.ms, 1),
                    collected=pause.collected,
                )
        failure = getattr(engine, "failure", None)
        _log.error(
            "storage engine unhealthy; shutting down for a clean recovery", error=str(failure)
        )
        exit_code = EXIT_UNHEALTHY
        stop.set()

    async def feed_watchdog(interval: float) -> None:
        while True:
            if engine.healthy:
                sdnotify.watchdog()
            await anyio.sleep(interval)

    try:
        server.bind()
    except (zmq.ZMQError, OSError) as exc:
        server.close()
        raise DaemonExitError(EXIT_CONFIG, f"cannot bind {settings.socket}: {exc}") from None
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        engine.add_listener(server.publish_threadsafe)
        if plugins is not None:
            plugins.attach(engine)  # on_change observers, on their own thread
        if scheduler is not None:
            # After recovery and the indexes: jobs interrupted by a crash restart now.
            await anyio.to_thread.run_sync(scheduler.start, server.publish_threadsafe)
        if kv is not None:  # stale-cache watcher (queues kv.rebuild jobs)
            kv.start(scheduler.runner if scheduler is not None else None)
        if lora is not None:  # svc.lora; stale-adapter watcher (queues lora.retrain jobs)
            lora.attach(service)
        tg.start_soon(wait_for_trigger)
        tg.start_soon(watch_health)
        interval = sdnotify.watchdog_interval_s()
        if interval is not None:
            tg.start_soon(feed_watchdog, interval)
        # What start-up loaded (plugins, torch, recovery state) lives as long as
        # the daemon: freeze it out of the cyclic GC's sight, so that a full
        # collection scans only what was allocated since, not ~250k objects
        # (hundreds of ms holding the GIL, every second or so under load).
        gc.collect()
        gc.freeze()
        gc_pauses.install()
        endpoint = ipc_endpoint(settings.socket)
        sdnotify.ready(f"serving on {endpoint}")
        print(
            f"memosd {__version__}: ready on {endpoint} (pid {os.getpid()}, "
            f"data dir {settings.data_dir})",
            file=sys.stderr,
            flush=True,
        )
        _log.info("ready", socket=str(settings.socket), events=str(settings.events_socket))
        task_status.started(Running(server, engine, settings.socket, settings.events_socket))

        await stop.wait()
        sdnotify.stopping("draining in-flight requests")
        server.stop_accepting()
        started = time.monotonic()
        drained = await server.drain(settings.server.drain_timeout_s)
        _log.info(
            "drained" if drained else "drain deadline passed; cancelling",
            inflight=server.inflight,
            seconds=round(time.monotonic() - started, 3),
        )
        if not drained:
            server.cancel_inflight()
        tg.cancel_scope.cancel()
    gc_pauses.uninstall()
    await anyio.to_thread.run_sync(service.close)
    return exit_code


# --- SIGHUP reload ------------------------------------------------------------------------


class Reloader:
    """Re-reads settings on SIGHUP; applies what can change at run time."""

    RELOADABLE: Final = frozenset({"log.level", "log.format"})

    def __init__(
        self, current: Settings, config_path: Path | None, overrides: Mapping[str, Any]
    ) -> None:
        self.current = current
        self.config_path = config_path
        self.overrides = dict(overrides)

    def reload(self) -> None:
        try:
            new = load_settings(self.config_path, overrides=self.overrides)
        except MemosError as exc:
            _log.error("reload failed; keeping the running settings", error=exc.message)
            return
        old_flat, new_flat = settings_as_dict(self.current), settings_as_dict(new)
        changed = sorted(k for k in new_flat if new_flat[k] != old_flat.get(k))
        ignored = [k for k in changed if k not in self.RELOADABLE]
        if any(k in self.RELOADABLE for k in changed):
            configure_logging(new.log)
        if ignored:
            _log.warning("changed settings need a restart; ignored for now", settings=ignored)
        _log.info("configuration reloaded", applied=[k for k in changed if k in self.RELOADABLE])
        self.current = new


# --- main -----------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="memosd", description="memosd: the memory OS daemon (ZeroMQ IPC)."
    )
    parser.add_argument("--data-dir", type=Path, help="data directory (WAL, store)")
    parser.add_argument("--socket", type=Path, help="request socket path (ipc)")
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--version", action="version", version=f"memosd {__version__}")
    return parser.parse_args(argv)


def _raise_fd_limit() -> None:
    """Each client connection is a file descriptor: use the whole hard limit."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run(settings: Settings, reloader: Reloader) -> int:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        stop = anyio.Event()

        async def handle_signals() -> None:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reloader.reload()
                else:
                    _log.info("shutdown requested", signal=signal.Signals(signum).name)
                    stop.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(handle_signals)
            code = await serve(settings, shutdown_trigger=stop.wait)
            tg.cancel_scope.cancel()
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``memosd``; returns the process exit code."""
    args = _parse_args(argv)
    overrides = {"data_dir": args.data_dir, "socket": args.socket}
    try:
        settings = load_settings(args.config, overrides=overrides)
    except SettingsError as exc:
        print(f"memosd: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, MemosError) as exc:
        print(f"memosd: cannot load configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log)
    _raise_fd_limit()
    reloader = Reloader(settings, args.config, overrides)
    try:
        return anyio.run(_run, settings, reloader, backend="asyncio")
    except DaemonExitError as exc:
        print(f"memosd: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as exc:  # an ExceptionGroup may wrap a DaemonExitError
        if isinstance(exc, BaseExceptionGroup):
            found = _find_daemon_exit(exc)
            if found is not None:
                print(f"memosd: {found.message}", file=sys.stderr)
                return found.code
        _log.exception("memosd failed")
        return EXIT_FAILURE


def _find_daemon_exit(group: BaseExceptionGroup[BaseException]) -> DaemonExitError | None:
    for exc in group.exceptions:
        if isinstance(exc, DaemonExitError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _find_daemon_exit(exc)
            if found is not None:
                return found
    return None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
