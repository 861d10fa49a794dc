#!/usr/bin/env bash
# Rewrite constraints.txt from the current .venv (after `make test` passed).
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Exact versions the test suite passes with (a lock for CI and fresh set-ups)."
    echo "# scripts/bootstrap.sh installs with -c constraints.txt.  Refresh deliberately:"
    echo "#   .venv/bin/pip install -U <pkg> && make test && scripts/freeze-constraints.sh"
    .venv/bin/pip freeze --exclude-editable | grep -viE "^memosd" |
        sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/'
} > constraints.txt
