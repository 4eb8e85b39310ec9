"""What GEMM tuning ahead of time does to one piece compile, measured side by side in one run.

    python benchmarks/bench_gemm_tuning.py --model llama-3-8b --num-layers 4 --sizes 512

Three fresh processes, one after another, each compiling every task in a private Inductor cache
(`gemm_tuning`'s mechanism) with max_autotune on the GPU:
  cold    every (piece, shape) compiled as a warm task does today: benchmarks its own GEMMs
  tune    every unique GEMM problem at every shape tuned alone (what the tune tasks do)
  tuned   every (piece, shape) compiled after installing the tune results
Prints per task: cold s, tuned s, GEMM selections benchmarked in each (tuned: 0 when every timing
matched), and the longest tune task; the sum and the longest of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from vllm_compile_ray import CompilationConfig, models

from vllm_compile_ray.compiling import autotune_cache

from vllm_compile_ray.orchestration import gemm_tuning

from vllm_compile_ray.compiling import inductor
from vllm_compile_ray.runtime.api import example_args, key_context
from vllm_compile_ray.compiling.compiler_interface import make_compiler
from vllm_compile_ray.planning.plan import capture, plan_graph


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--sizes", default="512")
    p.add_argument("--no-dynamic", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--mode", choices=("cold", "tune", "tuned"), default=None,
                   help="(internal) run one phase in this process")
    p.add_argument("--timings", default="", help="(internal) tune results for --mode tuned")
    return p.parse_args()


def plan(args: argparse.Namespace):
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    config = CompilationConfig(compile_sizes=sizes, compile_dynamic=not args.no_dynamic,
                               inductor_compile_config={"max_autotune": True})
    module = models.build(args.model, 1, 0, device="meta", num_layers=args.num_layers)
    fp = inductor.environment_fingerprint(args.device.split(":")[0])
    compiler = make_compiler(config)
    return plan_graph(capture(module, example_args(device="meta")), config,
                      key_context(config, compiler, fp["device_type"], fp), fp["device_type"]), compiler


def run_mode(args: argparse.Namespace) -> list[dict]:
    the_plan, compiler = plan(args)
    rows = []
    if args.mode == "tune":
        tasks, _ = gemm_tuning.tune_tasks(the_plan.tasks(), args.device.split(":")[0])
        for task in tasks:
            row = gemm_tuning.tune(task.problem, task.shape, compiler.options, args.device)
            rows.append({"name": task.name, **row})
        return rows
    timings = json.load(open(args.timings)) if args.mode == "tuned" else {}
    for task in the_plan.tasks():
        def compile_it(task=task):
            if args.mode == "tuned":
                autotune_cache.install_gemm_timings(timings)
            return compiler.compile(task.piece.graph, task.piece.input_specs, task.shape,
                                    args.device)
        start = time.perf_counter()
        recorded, benchmarked = autotune_cache.gemm_timings(compile_it)
        rows.append({"name": task.name, "seconds": round(time.perf_counter() - start, 3),
                     "benchmarked": benchmarked, "timings": recorded})
    return rows


def phase(mode: str, timings: str = "") -> list[dict]:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--timings", timings]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def misses(recorded: dict, shipped: dict) -> list[str]:
    """Why a tuned compile still benchmarked: each (op, inputs key) it recorded, against the
    tune results (absent, or which choice hashes differ)."""
    out = []
    for op, by_inputs in recorded.items():
        for inputs, by_precision in by_inputs.items():
            for precision, by_choice in by_precision.items():
                have = shipped.get(op, {}).get(inputs, {}).get(precision)
                if have is None:
                    near = [k for k in shipped.get(op, {})]
                    out.append(f"miss {op} {inputs} {precision}: no tune result for these "
                               f"inputs; tuned inputs of {op}: {near}")
                    continue
                extra = sorted(set(by_choice) - set(have))
                out.append(f"miss {op} {inputs}: {len(extra)} of {len(by_choice)} choices not "
                           f"tuned, e.g. {extra[:2]}; tuned but unused {sorted(set(have) - set(by_choice))[:2]}")
    return out


def main() -> int:
    args = parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    cold = phase("cold")
    tune = phase("tune")
    merged: dict = {}
    for row in tune:
        autotune_cache.merge_timings(merged, row["timings"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(merged, f)
    tuned = phase("tuned", f.name)
    os.unlink(f.name)
    for row in tune:
        print(f"tune  {row['name']:<34} {row['seconds']:6.1f}s benchmarked {row['benchmarked']} "
              f"choices {row.get('choices', 0)} {row['error'][:200]}")
    for c, t in zip(cold, tuned):
        print(f"piece {c['name']:<34} cold {c['seconds']:6.1f}s ({c['benchmarked']} GEMMs "
              f"benchmarked)  tuned {t['seconds']:6.1f}s ({t['benchmarked']} benchmarked)")
        for line in misses(t["timings"], merged):
            print("      " + line)
    summary = {
        "cold_sum_s": round(sum(r["seconds"] for r in cold), 2),
        "cold_max_s": max(r["seconds"] for r in cold),
        "tune_sum_s": round(sum(r["seconds"] for r in tune), 2),
        "tune_max_s": max(r["seconds"] for r in tune),
        "tuned_sum_s": round(sum(r["seconds"] for r in tuned), 2),
        "tuned_max_s": max(r["seconds"] for r in tuned),
        "tuned_benchmarked": sum(r["benchmarked"] for r in tuned),
        "cold_benchmarked": sum(r["benchmarked"] for r in cold),
    }
    summary["critical_path_ratio"] = round(
        summary["cold_max_s"] / (summary["tune_max_s"] + summary["tuned_max_s"]), 2)
    print("result " + json.dumps({"model": args.model, "sizes": args.sizes, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
