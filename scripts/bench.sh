#!/usr/bin/env bash
# Run every benchmark in bench/ (each prints a table).  Sizes come from
# environment variables documented at the top of each script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for script in bench/*_bench.py; do
    echo "== $script"
    .venv/bin/python "$script"
done
