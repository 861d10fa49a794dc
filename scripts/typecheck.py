"""Run mypy --strict on the installed package layout (args: paths under the
staged tree, e.g. ``memosd/engine.py``; default: the whole package).

The design card's folders (wal/, memcube/, ...) are installed as
``memosd.wal`` etc. through a setuptools package-dir mapping, which mypy
cannot follow from the source tree.  Stage the mapping as symlinks under
.typecheck/ and check that tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    # A private staging tree (and mypy cache) per run: concurrent runs must
    # not delete each other's files.
    (ROOT / ".typecheck").mkdir(exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="run-", dir=ROOT / ".typecheck"))
    (stage / "memosd").mkdir(parents=True)
    for entry in (ROOT / "memosd").iterdir():
        if entry.name != "__pycache__":
            (stage / "memosd" / entry.name).symlink_to(entry)
    for package, folder in mapping.items():
        if package != "memosd":
            (stage / package.replace(".", "/")).symlink_to(ROOT / folder)
    targets = sys.argv[1:] or ["memosd"]
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets]
    try:
        return subprocess.call(cmd, cwd=stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
