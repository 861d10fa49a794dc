"""The settings registry: precedence, validation with hints, path defaults, docs."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memosd.errors import BadRequest
from memosd.settings import (
    SettingsError,
    default_data_dir,
    default_socket_path,
    describe_settings,
    load_settings,
    render_markdown_table,
    settings_as_dict,
)
from memosd.testing import fuzz_examples

HOME_ENV = {"HOME": "/home/alice"}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "memosd.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_spec() -> None:
    s = load_settings(env=HOME_ENV)
    assert s.server.max_message_bytes == 64 * 2**20
    assert s.server.max_inflight == 256
    assert s.server.drain_timeout_s == 10.0
    assert (s.server.rcvhwm, s.server.sndhwm) == (10000, 10000)
    assert (s.server.heartbeat_ivl_ms, s.server.heartbeat_timeout_ms) == (5000, 15000)
    assert s.server.request_timeout_s == 300.0
    assert s.storage.wal_segment_bytes == 64 * 2**20
    assert s.storage.checkpoint_interval_s == 60.0
    assert s.storage.checkpoint_wal_bytes == 256 * 2**20
    assert s.storage.initial_map_size == 256 * 2**20
    assert s.storage.max_batch == 1024
    assert s.storage.max_text_bytes == 2**20
    assert s.auth.admin_uids == ()
    assert (s.log.format, s.log.level) == ("auto", "info")


def test_engine_settings_defaults_agree_with_the_registry() -> None:
    engine = pytest.importorskip("memosd.engine")
    ours = load_settings(env=HOME_ENV).storage
    theirs = engine.EngineSettings()
    for name in (
        "wal_segment_bytes",
        "checkpoint_interval_s",
        "checkpoint_wal_bytes",
        "initial_map_size",
        "max_batch",
        "max_text_bytes",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_precedence_defaults_toml_env_overrides(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        "[server]\nmax_inflight = 10\nrcvhwm = 11\nsndhwm = 12\n[log]\nlevel = 'debug'\n",
    )
    env = {**HOME_ENV, "MEMOSD_SERVER_RCVHWM": "21", "MEMOSD_SERVER_SNDHWM": "22"}
    s = load_settings(config, env=env, overrides={"server.sndhwm": 32, "server.rcvhwm": None})
    assert s.server.max_inflight == 10  # file
    assert s.server.rcvhwm == 21  # env beats file; a None override is "unset"
    assert s.server.sndhwm == 32  # override beats env
    assert s.log.level == "debug"
    assert s.server.drain_timeout_s == 10.0  # default


def test_memosd_config_env_names_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[storage]\nmax_batch = 7\n")
    assert load_settings(env={**HOME_ENV, "MEMOSD_CONFIG": str(config)}).storage.max_batch == 7


def test_top_level_paths_from_toml_env_and_overrides(tmp_path: Path) -> None:
    config = write_toml(tmp_path, f"data_dir = '{tmp_path / 'file'}'\n")
    s = load_settings(config, env=HOME_ENV)
    assert s.data_dir == tmp_path / "file"
    # No XDG_RUNTIME_DIR: the socket follows the configured data dir.
    assert s.socket == tmp_path / "file" / "run" / "memosd.sock"
    assert s.events_socket == tmp_path / "file" / "run" / "events.sock"
    s = load_settings(
        config,
        env={**HOME_ENV, "MEMOSD_DATA_DIR": "/srv/env", "MEMOSD_SOCKET": "/srv/s.sock"},
        overrides={"data_dir": "/srv/cli"},
    )
    assert s.data_dir == Path("/srv/cli")
    assert s.socket == Path("/srv/s.sock")
    assert s.events_socket == Path("/srv/events.sock")


def test_sizes_accept_units_and_strings_from_env() -> None:
    env = {
        **HOME_ENV,
        "MEMOSD_SERVER_MAX_MESSAGE_BYTES": "8MiB",
        "MEMOSD_STORAGE_INITIAL_MAP_SIZE": "1 GiB",
        "MEMOSD_STORAGE_WAL_SEGMENT_BYTES": "1_048_576",
        "MEMOSD_SERVER_DRAIN_TIMEOUT_S": "2.5",
        "MEMOSD_AUTH_ADMIN_UIDS": "1000, 1001",
        "MEMOSD_LOG_FORMAT": "JSON",
    }
    s = load_settings(env=env)
    assert s.server.max_message_bytes == 8 * 2**20
    assert s.storage.initial_map_size == 2**30
    assert s.storage.wal_segment_bytes == 2**20
    assert s.server.drain_timeout_s == 2.5
    assert s.auth.admin_uids == (1000, 1001)
    assert s.log.format == "json"


def test_toml_list_of_uids(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[auth]\nadmin_uids = [0, 1000]\n")
    assert load_settings(config, env=HOME_ENV).auth.admin_uids == (0, 1000)


@pytest.mark.parametrize(
    ("toml", "hint"),
    [
        ("[server]\nmax_inflgiht = 3\n", "did you mean 'server.max_inflight'"),
        ("[storge]\nmax_batch = 3\n", "did you mean 'storage'"),
        ("dat_dir = '/x'\n", "did you mean 'data_dir'"),
        ("[log]\nlevle = 'info'\n", "did you mean 'log.level'"),
    ],
)
def test_unknown_toml_key_is_rejected_with_a_hint(tmp_path: Path, toml: str, hint: str) -> None:
    config = write_toml(tmp_path, toml)
    with pytest.raises(SettingsError, match="unknown setting") as info:
        load_settings(config, env=HOME_ENV)
    assert hint in str(info.value)
    assert str(config) in str(info.value)
    assert isinstance(info.value, BadRequest)
    assert info.value.code == "bad_request"
    assert info.value.reason == "bad_setting"


def test_unknown_env_var_in_a_settings_section_is_rejected_with_a_hint() -> None:
    with pytest.raises(SettingsError, match="MEMOSD_SERVER_MAX_INFLIGHT") as info:
        load_settings(env={**HOME_ENV, "MEMOSD_SERVER_MAX_INFLIGH": "3"})
    assert "did you mean" in str(info.value)


def test_other_memosd_env_vars_are_not_settings() -> None:
    load_settings(env={**HOME_ENV, "MEMOSD_TOKEN": "x", "MEMOSD_SOMETHING": "y"})


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"did you mean 'server\.max_inflight'"):
        load_settings(env=HOME_ENV, overrides={"server.max_infligth": 3})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nmax_inflight = 'many'\n", "expected an integer"),
        ("[server]\nmax_inflight = true\n", "boolean"),
        ("[server]\nmax_inflight = 0\n", "at least 1"),
        ("[server]\nrcvhwm = 99999999999\n", "at most 2147483647"),
        ("[server]\ndrain_timeout_s = inf\n", "expected a finite number"),
        ("[server]\ndrain_timeout_s = 'soon'\n", "expected a finite number"),
        ("[server]\nmax_message_bytes = '12 parsecs'\n", "size in bytes"),
        ("[log]\nformat = 'xml'\n", "auto, json, console"),
        ("[log]\nlevel = 'loud'\n", "debug, info"),
        ("[log]\nlevel = 3\n", "expected a string"),
        ("[auth]\nadmin_uids = 1000\n", "expected a list"),
        ("[auth]\nadmin_uids = ['root']\n", "expected an integer"),
        ("server = 3\n", "must be a [server] table"),
        ("data_dir = 3\n", "expected a path"),
    ],
)
def test_wrong_types_are_rejected(tmp_path: Path, toml: str, message: str) -> None:
    config = write_toml(tmp_path, toml)
    with pytest.raises(SettingsError, match=r"setting|table") as info:
        load_settings(config, env=HOME_ENV)
    assert message in str(info.value)


def test_wrong_type_in_env_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="MEMOSD_STORAGE_MAX_BATCH"):
        load_settings(env={**HOME_ENV, "MEMOSD_STORAGE_MAX_BATCH": "lots"})


def test_heartbeat_timeout_shorter_than_interval_is_rejected() -> None:
    with pytest.raises(SettingsError, match="heartbeat_timeout_ms"):
        load_settings(env=HOME_ENV, overrides={"server.heartbeat_timeout_ms": 100})


def test_same_request_and_events_socket_is_rejected() -> None:
    with pytest.raises(SettingsError, match="must differ"):
        load_settings(env=HOME_ENV, overrides={"socket": "/x.sock", "events_socket": "/x.sock"})


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write_toml(tmp_path, "[server\n"), env=HOME_ENV)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env=HOME_ENV)


def test_path_defaults_for_a_normal_user() -> None:
    env = {"HOME": "/home/alice", "XDG_RUNTIME_DIR": "/run/user/1000"}
    s = load_settings(env=env)
    assert s.data_dir == Path("/home/alice/.local/state/memosd")
    assert s.socket == Path("/run/user/1000/memosd/memosd.sock")
    assert s.events_socket == Path("/run/user/1000/memosd/events.sock")
    env["XDG_STATE_HOME"] = "/data/state"
    assert load_settings(env=env).data_dir == Path("/data/state/memosd")
    # A relative XDG_STATE_HOME is invalid per the spec and ignored.
    assert default_data_dir({"HOME": "/h", "XDG_STATE_HOME": "rel"}) == Path(
        "/h/.local/state/memosd"
    )


def test_path_defaults_under_systemd() -> None:
    env = {
        "HOME": "/",
        "STATE_DIRECTORY": "/var/lib/memosd:/var/lib/other",
        "RUNTIME_DIRECTORY": "/run/memosd",
        "XDG_RUNTIME_DIR": "/run/user/0",
    }
    s = load_settings(env=env)
    assert s.data_dir == Path("/var/lib/memosd")
    assert s.socket == Path("/run/memosd/memosd.sock")
    assert s.events_socket == Path("/run/memosd/events.sock")


def test_client_default_socket_path(tmp_path: Path) -> None:
    assert default_socket_path({"MEMOSD_SOCKET": "/x/y.sock"}) == Path("/x/y.sock")
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    user = tmp_path / "run" / "memosd" / "memosd.sock"
    assert default_socket_path(env) == user
    # A client running as a service must not look in its own RUNTIME_DIRECTORY.
    assert default_socket_path({**env, "RUNTIME_DIRECTORY": "/run/other"}) == user
    assert default_socket_path({"HOME": str(tmp_path)}) == (
        tmp_path / ".local" / "state" / "memosd" / "run" / "memosd.sock"
    )


def test_registry_is_derived_from_the_dataclasses() -> None:
    infos = describe_settings()
    names = [i.name for i in infos]
    assert len(names) == len(set(names))
    assert names[:3] == ["data_dir", "socket", "events_socket"]
    for info in infos:
        assert info.help.strip(), info.name
        assert info.env == "MEMOSD_" + info.name.replace(".", "_").upper()
    by_name = {i.name: i for i in infos}
    assert by_name["server.max_message_bytes"].default == 64 * 2**20
    assert by_name["server.max_message_bytes"].unit == "bytes"
    assert by_name["log.format"].choices == ("auto", "json", "console")
    assert by_name["log.level"].reloadable
    flat = settings_as_dict(load_settings(env=HOME_ENV))
    assert set(flat) == set(names)


def test_every_setting_is_documented() -> None:
    docs = DOCS.read_text()
    missing = [i.name for i in describe_settings() if f"`{i.name}`" not in docs]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    env_missing = [i.env for i in describe_settings() if i.env not in docs]
    assert not env_missing, env_missing


def test_committed_settings_table_is_current() -> None:
    assert render_markdown_table() in DOCS.read_text(), (
        "docs/configuration.md is stale: regenerate the table with `python -m memosd.settings`"
    )


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(
    name=st.sampled_from([i.env for i in describe_settings()]),
    value=st.text(max_size=40),
)
def test_any_env_value_is_accepted_or_a_settings_error(name: str, value: str) -> None:
    try:
        load_settings(env={**HOME_ENV, name: value})
    except SettingsError as error:
        assert name in str(error) or "must" in str(error)  # noqa: PT017 - all other types fail


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(
    doc=st.dictionaries(
        st.sampled_from(["log", "server", "storage", "auth", "data_dir", "bogus"]),
        st.one_of(
            st.dictionaries(
                st.sampled_from(["level", "format", "max_inflight", "rcvhwm", "admin_uids", "x"]),
                st.one_of(st.integers(), st.text(max_size=8), st.booleans(), st.floats()),
                max_size=3,
            ),
            st.integers(),
            st.text(max_size=8),
        ),
        max_size=4,
    )
)
def test_any_toml_document_is_accepted_or_a_settings_error(
    tmp_path_factory: pytest.TempPathFactory, doc: dict[str, object]
) -> None:
    path = tmp_path_factory.mktemp("toml") / "memosd.toml"
    path.write_bytes(tomli_w_dumps(doc))
    with contextlib.suppress(SettingsError):  # any other exception fails the test
        load_settings(path, env=HOME_ENV)


def tomli_w_dumps(doc: dict[str, object]) -> bytes:
    """A tiny TOML writer for the generated documents (strings, numbers, tables)."""

    def scalar(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if value in (float("inf"), float("-inf")):
                return "inf" if value > 0 else "-inf"
            return repr(value)
        if isinstance(value, int):
            return str(value)
        return json.dumps(value)

    top = [f"{k} = {scalar(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {scalar(vv)}" for kk, vv in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return ("\n".join(top) + "\n" + "\n".join(tables) + "\n").encode()


def test_a_path_naming_an_unknown_users_home_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match=r"MEMOSD_DATA_DIR.*no such user"):
        load_settings(env={**HOME_ENV, "MEMOSD_DATA_DIR": "~no-such-user-0/x"})
    with pytest.raises(SettingsError, match="no such user"):
        load_settings(config_path="~no-such-user-0/memosd.toml", env=HOME_ENV)
    with pytest.raises(SettingsError, match="no such user"):
        default_socket_path({"MEMOSD_SOCKET": "~no-such-user-0/s"})
    assert default_socket_path({"MEMOSD_SOCKET": "~/s"}) == Path("~/s").expanduser()
