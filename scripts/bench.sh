#!/usr/bin/env bash
# Run every benchmark in bench/ and regenerate docs/benchmarks.md (`make bench`).
#
#   make bench                          # quick sizes, each bench once
#   BENCH_FULL=1 BENCH_RUNS=3 make bench   # full sizes, medians of 3 runs
#   BENCH_ONLY="compare storage_bench" make bench   # a subset (names from BENCHES)
#
# Each bench prints its tables; those that write JSON (bench/_result.py) get
# BENCH_OUT=bench/results/<name>/run-<i>.json, and bench/render.py renders
# docs/benchmarks.md from bench/results/ plus the notes in docs/bench-notes/.
# Sizes come from environment variables documented at the top of each script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The benchmarks, in run order.  Helper modules (bench/_*.py, bench/render.py,
# bench/peers/) are not benchmarks; a new benchmark must be added here.
BENCHES=(storage_bench wal_bench ipc_bench gc_scale search_bench locomo scheduler_bench kv lora compare)
NOT_BENCHES=(render soak)  # soak: full-size crash and fuzz runs, `make soak`
for path in bench/*.py; do
    name=$(basename "$path" .py)
    case " ${BENCHES[*]} ${NOT_BENCHES[*]} kv_bench lora_bench " in
        *" $name "*) ;;
        *) [[ $name == _* ]] || echo "bench.sh: warning: bench/$name.py is not in BENCHES" >&2 ;;
    esac
done

runs="${BENCH_RUNS:-1}"
failed=()
only=" ${BENCH_ONLY:-${BENCHES[*]}} "
for name in "${BENCHES[@]}"; do
    [[ $only == *" $name "* ]] || continue
    script="bench/$name.py"
    # kv.py and lora.py were kv_bench.py and lora_bench.py.
    [ -f "$script" ] || script="bench/${name}_bench.py"
    if [ ! -f "$script" ]; then
        echo "bench.sh: no bench/$name.py, skipped" >&2
        continue
    fi
    if [ "$name" = compare ] && ! bash bench/peers/setup.sh; then
        # mem0 lives in its own virtualenv, bench/.venv-peers (never a project dependency).
        failed+=("$name (peer setup)")
        continue
    fi
    result_name=$(basename "$script" .py)
    result_name=${result_name%_bench}
    # New runs replace the stored ones only if every run succeeded.
    new=$(mktemp -d)
    chmod 755 "$new"
    ok=1
    for ((i = 1; i <= runs; i++)); do
        echo "== $script (run $i of $runs)"
        if ! BENCH_OUT="$new/run-$i.json" .venv/bin/python "$script"; then
            failed+=("$name")
            ok=0
            break
        fi
    done
    if [ $ok = 1 ] && compgen -G "$new/*.json" >/dev/null; then
        rm -rf "bench/results/$result_name"
        mkdir -p bench/results
        mv "$new" "bench/results/$result_name"
    else
        rm -rf "$new"
    fi
done
.venv/bin/python bench/render.py
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench.sh: failed: ${failed[*]}" >&2
    exit 1
fi
