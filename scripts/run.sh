#!/usr/bin/env bash
# Set up .venv and start memosd on its embedded defaults: state under
# $XDG_STATE_HOME/memosd, socket under $XDG_RUNTIME_DIR (see docs/configuration.md).
# Extra arguments go to memosd (e.g. --data-dir, --socket, --config).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/memosd "$@"
