"""Summary of an A/B log of `vcr load` runs (ab_load.sh, ab_warm.sh): per run name (the "== <name>"
line before each run), the means and ranges of rank 0's startup report phases, the process's
start to exit ("<name> wall <s> s"), the hits, kernel compiles and autotunes.

    python benchmarks/device/ab_summary.py LOG
"""

import statistics
import sys

PHASES = {"trace": 2, "fetch": 4, "load": 5, "first": 7, "ready": 8}  # columns of the report
COUNTS = {"hits": 10, "kernel_compiles": 14, "autotunes": 15}


def parse(path: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    name = None
    for line in open(path):
        cols = line.split()
        if line.startswith("== "):
            name = line[3:].strip()
        elif name and cols and cols[0] == "0":  # the report's row of rank 0
            row = {k: float(cols[i]) for k, i in PHASES.items()}
            row.update({k: int(cols[i]) for k, i in COUNTS.items()})
            rows.setdefault(name, []).append(row)
        elif name and name in rows and line.startswith(f"{name} wall "):
            rows[name][-1]["wall"] = float(cols[-2])
    return rows


def main(path: str) -> None:
    for name, got in parse(path).items():
        stats = [f"{k} {statistics.mean(r[k] for r in got):.2f} ({min(r[k] for r in got):.2f}-"
                 f"{max(r[k] for r in got):.2f})" for k in (*PHASES, "wall")
                 if all(k in r for r in got)]
        print(f"{name:18s} n={len(got)} " + "  ".join(stats))
        print(f"{'':18s} hits {sorted({r['hits'] for r in got})}, kernel compiles "
              f"{sum(r['kernel_compiles'] for r in got)}, autotunes {sum(r['autotunes'] for r in got)}")


if __name__ == "__main__":
    main(sys.argv[1])
