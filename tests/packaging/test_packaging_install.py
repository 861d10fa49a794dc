"""The design card's folders install under ``memosd.*`` only, wheel and editable."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import memosd

ROOT = Path(__file__).resolve().parents[2]
MAPPED = ("wal", "memcube", "scheduler", "plugins", "cli")
PROBE = (
    "import memosd, memosd.wal, memosd.memcube, memosd.scheduler, memosd.plugins, memosd.cli, "
    "memosd.engine; print(memosd.__file__); print(memosd.wal.__file__)"
)


def test_editable_install_maps_folders_into_the_namespace() -> None:
    import memosd.memcube
    import memosd.wal

    assert Path(memosd.wal.__file__).parent == ROOT / "wal"
    assert Path(memosd.memcube.__file__).parent == ROOT / "memcube"
    assert Path(memosd.__file__).parent == ROOT / "memosd"


def test_wheel_installs_and_imports_without_squatting(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("memosd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.startswith("memosd-")}
    assert top_level == {"memosd"}, top_level
    for folder in MAPPED:
        assert f"memosd/{folder}/__init__.py" in names
    assert "memosd/py.typed" in names

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # The wheel's copy must win over the editable install of this checkout.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    ).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out), out
    assert memosd.__version__


def test_every_package_directory_is_declared() -> None:
    """A subpackage missing from pyproject would silently vanish from the wheel."""
    import tomllib

    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(setuptools_cfg["packages"])
    found = set()
    for package, folder in setuptools_cfg["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([package, *rel.parts]))
    assert found == declared
