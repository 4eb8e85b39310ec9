"""Summary of an A/B log of `vcr load` runs (ab_load.sh, ab_warm.sh): per run name (the "== <name>"
line before each run), the means and ranges of rank 0's startup report phases, the process's
start to exit ("<name> wall <s> s"), the hits, kernel compiles and autotunes.

    python benchmarks/device/ab_summary.py LOG
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_load import report_of  # noqa: E402 (the report table, read by its header)

PHASES = ("trace_s", "fetch_s", "load_s", "first_call_s", "total_s", "wall_s")


def parse(path: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    name = None
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("== "):
            name = line[3:].strip()
        elif name and line.startswith("rank ") and i + 1 < len(lines):
            rows.setdefault(name, []).append(report_of("\n".join(lines[i:i + 2])))
        elif name and name in rows and line.startswith(f"{name} wall "):
            rows[name][-1]["wall_s"] = float(line.split()[-2])
    return rows


def main(path: str) -> None:
    for name, got in parse(path).items():
        stats = [f"{k.removesuffix('_s')} {statistics.mean(r[k] for r in got):.2f} "
                 f"({min(r[k] for r in got):.2f}-{max(r[k] for r in got):.2f})"
                 for k in PHASES if all(k in r for r in got)]
        print(f"{name:18s} n={len(got)} " + "  ".join(stats))
        print(f"{'':18s} hits {sorted({r['hits'] for r in got})}, kernel compiles "
              f"{sum(r['kernel_compiles'] for r in got)}, autotunes {sum(r['autotunes'] for r in got)}")


if __name__ == "__main__":
    main(sys.argv[1])
