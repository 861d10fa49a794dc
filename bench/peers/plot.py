"""Search latency vs corpus size, one line per system: compare.py's JSON -> PNG.

    bench/.venv-peers/bin/python bench/peers/plot.py RESULT.json docs/bench-compare-search.png

Runs in the peer venv (matplotlib is not a project dependency).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> int:
    with open(src) as f:
        data = json.load(f)
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for row in data["raw"]["search"]:
        series[row["system"]].append((row["items"], row["p50_ms"], row["p99_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for system, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        line = ax.plot(xs, [p[1] for p in points], marker="o", label=f"{system} p50")[0]
        ax.plot(
            xs, [p[2] for p in points], marker="x", linestyle=":", color=line.get_color(), alpha=0.6
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memories in the store")
    ax.set_ylabel("search latency, ms (solid p50, dotted p99)")
    ax.set_title(
        f"Search latency vs corpus size (k=10, query embedding excluded)\n{data['date']}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
