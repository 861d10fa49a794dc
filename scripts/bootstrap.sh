#!/usr/bin/env bash
# Create or reuse the virtualenv at .venv in the repo root and install memosd.
# torch comes first, pinned to the CPU build this machine serves from local
# disk; the project's own "torch>=..." requirement is then already satisfied.
# Everything else is installed with constraints.txt (exact, tested versions).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install --quiet --disable-pip-version-check --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
# constraints.txt pins every dependency to the versions the suite passed with,
# so a fresh machine installs what was tested (transformers, peft... move fast).
"$py" -m pip install --quiet --disable-pip-version-check -c constraints.txt \
    -e ".${extras:+[$extras]}"
if [ "$extras" = "dev" ]; then
    # The example third-party plugin: the plugin tests drive it end to end.
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
        --no-index examples/memosd-facts
fi

