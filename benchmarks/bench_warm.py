"""Ray fan-out vs serial in-process compilation of the same (piece, shape) tasks, in one run.

    python benchmarks/bench_warm.py --model llama-3-8b --num-layers 4 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune --workers 8

Both modes compile every unique task of the plan from cold Inductor caches (each gets its own
TORCHINDUCTOR_CACHE_DIR) into its own fresh artifact store. Serial: one loop in this process
(torch already imported). Ray: `warm()` on an in-process Ray (or --address), wall time from the
first submit, including worker start-up. Prints one JSON line and the ratio serial / Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from vllm_compile_ray import CompilationConfig, models
from vllm_compile_ray.api import example_args, key_context, open_store
from vllm_compile_ray.compiler_interface import make_compiler
from vllm_compile_ray.inductor import environment_fingerprint, set_compile_threads
from vllm_compile_ray.manager import CompilerManager
from vllm_compile_ray.plan import capture, plan_graph
from vllm_compile_ray.warm import order_tasks, warm


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--no-dynamic", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--max-autotune", action="store_true")
    p.add_argument("--workers", type=int, default=8,
                   help="compiles at once: GPU fraction per compile = GPUs / workers (cuda), "
                        "CPUs per compile = CPUs / workers (cpu)")
    p.add_argument("--gpus-per-compile", type=float, default=None,
                   help="override the GPU fraction per compile (e.g. for a remote --address)")
    p.add_argument("--cpus-per-compile", type=float, default=None,
                   help="CPUs (= Inductor compile threads) per compile task (default: 1 for "
                        "cuda, CPUs / workers for cpu)")
    p.add_argument("--address", default=None, help="Ray cluster (default: in-process Ray)")
    p.add_argument("--skip-serial", action="store_true", help="only the Ray run")
    return p.parse_args()


def serial(config: CompilationConfig, args: argparse.Namespace) -> tuple[float, int, list[float]]:
    """(seconds, tasks, per-task seconds) compiling every task in turn in this process."""
    fp = environment_fingerprint(args.device)
    compiler = make_compiler(config)
    module = models.build(args.model, args.tp, 0, device="meta", num_layers=args.num_layers)
    plan = plan_graph(capture(module, example_args(device="meta")), config,
                      key_context(config, compiler, args.device, fp), args.device)
    store = open_store(config)
    manager = CompilerManager(config, compiler, store, args.device, plan.key_context.fingerprint_id)
    tasks = order_tasks(plan.tasks())
    per_task = []
    start = time.perf_counter()
    for task in tasks:
        t0 = time.perf_counter()
        manager.compile(task.key, task.piece, task.shape, publish=True, name=task.name)
        per_task.append(round(time.perf_counter() - t0, 3))
    return time.perf_counter() - start, len(tasks), per_task


def main() -> int:
    args = parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    options = {"max_autotune": True, "coordinate_descent_tuning": True} if args.max_autotune else {}
    root = tempfile.mkdtemp(prefix="vcr-bench-")
    base = CompilationConfig(backend=args.backend, use_inductor=args.backend == "inductor",
                             compile_sizes=sizes, compile_dynamic=not args.no_dynamic,
                             inductor_compile_config=options)
    if args.gpus_per_compile is not None:
        per_compile = {"gpus_per_compile": args.gpus_per_compile, "cpus_per_compile": 1.0}
    elif args.device == "cuda":
        gpus = torch.cuda.device_count()
        per_compile = {"gpus_per_compile": gpus / args.workers, "cpus_per_compile": 1.0}
    else:
        per_compile = {"gpus_per_compile": 0.0,
                       "cpus_per_compile": (os.cpu_count() or 1) / args.workers}
    if args.cpus_per_compile is not None:
        per_compile["cpus_per_compile"] = args.cpus_per_compile
    result: dict = {"model": args.model, "tp": args.tp, "num_layers": args.num_layers,
                    "sizes": list(sizes), "dynamic": not args.no_dynamic, "device": args.device,
                    "backend": args.backend, "max_autotune": args.max_autotune,
                    "workers": args.workers, **per_compile}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
        result["gpus"] = torch.cuda.device_count()

    # Ray first: its workers get a cold Inductor cache of their own through the runtime env.
    summary = warm(args.model, base.replace(cache_dir=os.path.join(root, "ray-cache")),
                   tp_size=args.tp, num_layers=args.num_layers, device_type=args.device,
                   address=args.address, max_in_flight=args.workers,
                   runtime_env={"env_vars": {
                       "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "ray-inductor")}},
                   progress=lambda line: print(line, flush=True), **per_compile)
    result.update(ray_wall_s=summary.wall_s, ray_plan_s=summary.plan_s,
                  ray_task_s_sum=summary.task_s_sum, ray_compiled=summary.compiled,
                  ray_failed=summary.failed + summary.timed_out, max_concurrent=summary.max_concurrent,
                  longest_task_s=max((r.get("seconds", 0.0) for r in summary.rows), default=0.0),
                  worker_pids=len({r["pid"] for r in summary.rows if "pid" in r}))
    if not args.skip_serial:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "serial-inductor")  # cold cache
        if args.device == "cpu":
            set_compile_threads(1)  # faster than the default on small CPU hosts (NOTES)
        seconds, n, per_task = serial(base.replace(cache_dir=os.path.join(root, "serial-cache")), args)
        result.update(serial_s=round(seconds, 3), serial_tasks=n, serial_per_task_s=per_task,
                      ratio=round(seconds / summary.wall_s, 2) if summary.wall_s else None)
    print("result " + json.dumps(result), flush=True)
    if "ratio" in result:
        print(f"serial {result['serial_s']:.1f}s / ray {summary.wall_s:.1f}s = {result['ratio']}x "
              f"({n} tasks, {args.workers} workers)")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
