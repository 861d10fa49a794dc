#!/usr/bin/env bash
# The whole test suite: set up .venv, lint (ruff), type-check (mypy --strict),
# then pytest.  This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
py=.venv/bin/python
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy (strict)"
"$py" scripts/typecheck.py
echo "== pytest"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/pytest "$@"
