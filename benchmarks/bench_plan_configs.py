"""Planning public config.json files as a user does on a CPU-only machine: wall time and peak RSS.

    python benchmarks/bench_plan_configs.py --tp 8 --sizes 1,8,64,512

Runs `vcr plan --model <config.json> --tp N --sizes ...` once per model as a subprocess, one after
the other, and measures each from process start to exit (wall time) and the child's peak RSS
(`os.wait4`'s rusage). Prints one `result {...}` line per model and a table; exit status 1 if a
plan fails or a peak reaches --limit-gb (default 4, issue 23).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "configs"
DEFAULT_MODELS = ",".join(str(CONFIGS / f"{m}.json")
                          for m in ("mixtral-8x7b", "qwen3-30b-a3b", "llama-3-70b"))


def vcr_command() -> str:
    here = Path(sys.executable).with_name("vcr")  # the console script of this environment
    found = str(here) if here.exists() else shutil.which("vcr")
    if not found:
        raise SystemExit("vcr is not installed in this environment (pip install -e .)")
    return found


def plan_once(vcr: str, model: str, tp: int, sizes: str) -> dict:
    """One `vcr plan` process: wall time start to exit, its peak RSS, and the report's numbers."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([vcr, "plan", "--model", model, "--tp", str(tp), "--sizes", sizes],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    params = re.search(r"parameters: ([\d.]+[KMB]) per rank x tp \d+, ([\d.]+[KMB]) total", text)
    plan = re.search(r"plan: (\d+) pieces, (\d+) unique x \d+ shapes .*= (\d+) compile tasks", text)
    row = {"model": Path(model).stem, "tp": tp, "sizes": sizes, "rc": proc.returncode,
           "wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1),  # KiB
           "architecture": text.split(" ", 1)[0] if params else ""}
    if params and plan:
        row.update(params_per_rank=params[1], params_total=params[2], pieces=int(plan[1]),
                   unique=int(plan[2]), tasks=int(plan[3]))
    if proc.returncode != 0 or not (params and plan):
        row["output_tail"] = text[-2000:]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma-separated config.json paths (or presets); default: Mixtral-8x7B, "
                        "Qwen3-30B-A3B, Llama-3-70B from tests/data/configs")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--sizes", default="1,8,64,512")
    p.add_argument("--limit-gb", type=float, default=4.0)
    args = p.parse_args()

    vcr, limit_mb = vcr_command(), args.limit_gb * 1024
    rows = []
    for model in (m for m in args.models.split(",") if m):
        row = plan_once(vcr, model, args.tp, args.sizes)
        row["ok"] = row["rc"] == 0 and "tasks" in row and row["peak_rss_mb"] < limit_mb
        rows.append(row)
        print("result " + json.dumps(row), flush=True)
    print(f"\nvcr plan --tp {args.tp} --sizes {args.sizes} (limit {args.limit_gb:g} GB)")
    print(f"{'model':<16} {'architecture':<22} {'params/rank':>11} {'total':>8} {'pieces':>6} "
          f"{'unique':>6} {'tasks':>5} {'wall':>7} {'peak RSS':>9}")
    for r in rows:
        print(f"{r['model']:<16} {r['architecture']:<22} {r.get('params_per_rank', '?'):>11} "
              f"{r.get('params_total', '?'):>8} {r.get('pieces', '?'):>6} {r.get('unique', '?'):>6} "
              f"{r.get('tasks', '?'):>5} {r['wall_s']:>6.1f}s {r['peak_rss_mb']:>6.0f} MB"
              + ("" if r["ok"] else "  FAILED"))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
