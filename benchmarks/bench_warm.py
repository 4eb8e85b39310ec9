"""Ray fan-out vs serial in-process compilation of the same (piece, shape) tasks, in one run.

    python benchmarks/bench_warm.py --model llama-3-8b --num-layers 4 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune --workers 8,16

Both modes compile every unique task of the plan from cold Inductor caches (each gets its own
TORCHINDUCTOR_CACHE_DIR, Triton's cache lives inside it) into its own fresh artifact store.
Serial: plan, then one loop in this process (torch already imported). Ray: `warm()` on an
in-process Ray (or --address), once per --workers entry. Two ratios per Ray run:
  end to end   serial (plan + loop) / Ray (plan + compile phase + manifest), Ray start excluded;
               the compile workers start while the driver plans
  compile      serial loop / Ray compile phase (first submit to last result)
Prints one JSON line per run and the ratios, how busy the CPUs and GPUs were in each compile
phase (`utilization.py`), and where the task seconds went: Inductor's phase timers summed over
the tasks, serial against each Ray run (a phase that grows under Ray is where it loses).
What it reports is made in `warm_report.py`.

--end-to-end measures what a user waits for instead, process start to exit, side by side:

    python benchmarks/bench_warm.py --end-to-end --model llama-3-8b --num-layers 4 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune

  user command  `vcr warm` as the README gives it (model, sizes, cache: every other option at its
                default), run as a process with a cold Inductor cache and an empty cache dir
  serial        this script in a process of its own (`--serial-process`): import, plan, then
                the loop, as one process compiles in vLLM today
  --flags F     (repeatable) the user command again with flags F added, to set the defaults
                beside the best flags measured in the same run
and prints one JSON line with the walls, the ratio serial / user command and, with --flags,
defaults / fastest flagged run. --root DIR keeps the caches (the defaults' in DIR/user-cache, for
`vcr load` runs after).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import ray
import torch

from vllm_compile_ray import CacheConfig, CompilationConfig, models
from vllm_compile_ray.compiling import heap
from vllm_compile_ray.compiling.compiler_interface import make_compiler
from vllm_compile_ray.orchestration import pool as compile_pool
from vllm_compile_ray.orchestration.options import ComputeOptions
from vllm_compile_ray.orchestration.sizing import gpu_fraction
from vllm_compile_ray.orchestration.stats import get_stats_actor, top_phases
from vllm_compile_ray.orchestration.warm import _connect, order_tasks, pool_spec, warm
from vllm_compile_ray.planning.plan import capture, plan_graph
from vllm_compile_ray.runtime.api import example_args, key_context, open_store
from vllm_compile_ray.runtime.manager import CompilerManager
from vllm_compile_ray.torch_private.inductor import environment_fingerprint, set_compile_threads
from vllm_compile_ray.torch_private.inductor_metrics import phase_times

from utilization import Sampler
from warm_report import ALL, print_results, run_row


def per_run(text: str, runs: int, flag: str, allowed: str, ok: Callable[[str], bool]) -> list[str]:
    """A comma-separated option with one value for every --workers entry, or one for all."""
    values = text.split(",")
    values = values * runs if len(values) == 1 else values
    if len(values) != runs or not all(ok(v) for v in values):
        raise SystemExit(f"{flag} {text!r}: give {allowed}, once or once per --workers entry "
                         f"({runs})")
    return values


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--no-dynamic", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--max-autotune", action="store_true", help='Inductor {"max_autotune": true}')
    p.add_argument("--coordesc", action="store_true", help="and coordinate_descent_tuning")
    p.add_argument("--workers", default="8",
                   help="compiles at once, one Ray run per comma-separated entry: GPU fraction "
                        "per compile = GPUs / workers (cuda), CPUs per compile = CPUs / workers (cpu)")
    p.add_argument("--gpus-per-compile", type=float, default=None,
                   help="override the GPU fraction per compile (e.g. for a remote --address)")
    p.add_argument("--cpus-per-compile", default=None,
                   help="CPUs (= Inductor compile threads) per compile task, one value or one "
                        "per --workers entry (default: 1 for cuda, CPUs / workers for cpu)")
    p.add_argument("--precompile-threads", default="all",
                   help="threads each compile task gives max-autotune's GEMM template "
                        "precompilation, one value or one per --workers entry: 'all' (Inductor's "
                        "default: every core of the node), 'cpus' (the task's CPUs) or a number")
    p.add_argument("--pool", default="off",
                   help="off, or on: the run compiles in a standing pool of compile workers "
                        "(`ComputeOptions(pool=True)`) started and warmed up before it (its start "
                        "is timed apart), one value or one per --workers entry")
    p.add_argument("--gpu-sharing", default="time-slice",
                   help="time-slice or mps: how the compiles on one GPU share it "
                        "(`ComputeOptions(gpu_sharing=...)`), one value or one per --workers entry")
    p.add_argument("--address", default=None, help="Ray cluster (default: in-process Ray)")
    p.add_argument("--skip-serial", action="store_true", help="only the Ray run")
    p.add_argument("--serial-freeze-heap", action="store_true",
                   help="freeze the heap before the serial loop, as compile workers do after "
                        "their start-up (default: as a process compiles in vLLM today)")
    p.add_argument("--serial-compile-threads", type=int, default=None,
                   help="Inductor compile threads of the serial loop (default: Inductor's "
                        "default on cuda, 1 on cpu); Ray tasks use their CPUs")
    p.add_argument("--end-to-end", action="store_true",
                   help="time `vcr warm` with its defaults as a process against the serial loop "
                        "as a process, start to exit (the Ray-run options above do not apply)")
    p.add_argument("--flags", action="append", default=[],
                   help="with --end-to-end: the user command again with these flags added, e.g. "
                        "'--gpus-per-compile 0.0625 --max-in-flight 16'; repeatable, each one "
                        "more process timed beside the defaults")
    p.add_argument("--root", default=None,
                   help="directory for the runs' caches and logs, kept (default: a temporary "
                        "directory); with --end-to-end the defaults' cache is ROOT/user-cache")
    p.add_argument("--serial-process", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def serial(config: CompilationConfig, args: argparse.Namespace
           ) -> tuple[float, float, int, list[float], dict[str, float], float]:
    """(plan seconds, loop seconds, tasks, per-task seconds, Inductor phase seconds summed over
    the tasks, loop start as time.time()) compiling every task in turn here."""
    planned = time.perf_counter()
    fp = environment_fingerprint(args.device)
    compiler = make_compiler(config)
    module = models.build(args.model, args.tp, 0, device="meta", num_layers=args.num_layers)
    plan = plan_graph(capture(module, example_args(device="meta")), config,
                      key_context(config, compiler, args.device, fp), args.device)
    store = open_store(config)
    manager = CompilerManager(config, compiler, store, args.device, plan.key_context.fingerprint_id)
    tasks = order_tasks(plan.tasks())
    if args.serial_freeze_heap:  # as compile workers do after their start-up
        heap.freeze()
    per_task, rows = [], []
    start, started_at = time.perf_counter(), time.time()
    for task in tasks:
        t0 = time.perf_counter()
        with phase_times() as phases, heap.collections() as collected:
            _, meta = manager.compile(task.key, task.piece, task.shape, publish=True,
                                      name=task.name)
        rows.append({"phases": {**phases, "tune_s": float(meta.get("tune_seconds", 0.0)),
                                "gc_s": collected["seconds"]}})
        per_task.append(round(time.perf_counter() - t0, 3))
        # progress: a call cut off by its time limit still shows how far the loop got
        print(f"serial {len(per_task)}/{len(tasks)} {task.name} {per_task[-1]:.1f}s, loop "
              f"{time.perf_counter() - start:.1f}s", flush=True)
    return (start - planned, time.perf_counter() - start, len(tasks), per_task,
            top_phases(rows, top=ALL), started_at)


def per_compile(args: argparse.Namespace, workers: int, cpus: float | None) -> dict[str, float]:
    if args.gpus_per_compile is not None:
        out = {"gpus_per_compile": args.gpus_per_compile, "cpus_per_compile": 1.0}
    elif args.device == "cuda":
        # Ray fits a GPU fraction below one within one GPU: 1/k gives k per GPU, 4/33 only 8
        per_gpu = -(-workers // torch.cuda.device_count())
        out = {"gpus_per_compile": gpu_fraction(per_gpu), "cpus_per_compile": 1.0}
    else:
        out = {"gpus_per_compile": 0.0, "cpus_per_compile": (os.cpu_count() or 1) / workers}
    if cpus is not None:
        out["cpus_per_compile"] = cpus
    return out


def start_pool(base: CompilationConfig, args: argparse.Namespace, workers: int,
               resources: dict[str, float], runtime_env: dict,
               gpu_sharing: str) -> float:
    """Connect to Ray (it stays up for the run; the caller shuts it down), start `workers` pool
    workers for the run's settings and the stats actor, and wait until every one has warmed up;
    returns the seconds. (On a cluster both stay up between runs; here each run has its own
    Ray. A run that planned in 1 s otherwise waited 6-7 s for the stats actor's process.)"""
    _connect(args.address, runtime_env)
    spec = pool_spec(base, ComputeOptions(device_type=args.device, runtime_env=runtime_env,
                                          gpu_sharing=gpu_sharing, **resources))
    start = time.perf_counter()
    members = compile_pool.up(spec, workers)
    ray.get([worker.start.remote(warm=True) for worker, _ in members]  # worker 0's warm-up too
            + [get_stats_actor().snapshot.remote()])
    seconds = round(time.perf_counter() - start, 3)
    print(f"pool of {workers} compile workers started in {seconds:.1f}s", flush=True)
    return seconds


def run_settings(args: argparse.Namespace) -> list[tuple]:
    """(workers, cpus per compile, precompile threads, pool, GPU sharing) of each
    Ray run, one per --workers entry."""
    workers = [int(w) for w in args.workers.split(",")]
    n = len(workers)
    cpus = ([float(c) for c in per_run(args.cpus_per_compile, n, "--cpus-per-compile",
                                       "a number", _is_float)]
            if args.cpus_per_compile else [None] * n)
    precompile = per_run(args.precompile_threads, n, "--precompile-threads",
                         "'all', 'cpus' or a number", lambda p: p in ("all", "cpus") or p.isdigit())
    pools = per_run(args.pool, n, "--pool", "off or on", lambda v: v in ("off", "on"))
    sharing = per_run(args.gpu_sharing, n, "--gpu-sharing", "time-slice or mps",
                      lambda v: v in ("time-slice", "mps"))
    return list(zip(workers, cpus, precompile, pools, sharing))


def ray_run(args: argparse.Namespace, base: CompilationConfig, root: str, i: int, runs: int,
            n: int, c: float | None, pre: str, pl: str, gs: str) -> dict:
    """Ray run `i` of `runs` (`warm`, with a cold Inductor cache of its own), its row."""
    resources = per_compile(args, n, c)
    env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(root, f"ray-inductor-{i}")}
    if pre != "all":  # Inductor's select_algorithm sizes its precompile pool from this
        env["TORCHINDUCTOR_COMPILE_THREADS"] = (
            str(max(1, int(resources["cpus_per_compile"]))) if pre == "cpus" else pre)
    runtime_env = {"env_vars": env}
    pool_start_s = start_pool(base, args, n, resources, runtime_env, gs) \
        if pl == "on" else 0.0
    try:
        cache = CacheConfig(cache_dir=os.path.join(root, f"ray-cache-{i}"))
        summary = warm(args.model, base.replace(cache=cache),
                       tp_size=args.tp, num_layers=args.num_layers,
                       compute=ComputeOptions(device_type=args.device, address=args.address,
                                              max_in_flight=n, runtime_env=runtime_env,
                                              pool=pl == "on", gpu_sharing=gs, **resources),
                       progress=lambda line: print(line, flush=True))
    finally:
        if pl == "on":
            compile_pool.down()
            ray.shutdown()
    row = run_row(summary, n, resources, pre, pl, gs, pool_start_s)
    print(f"ray run {i + 1}/{runs} ({n} workers, pool {pl}, GPU sharing {gs}, "
          f"precompile threads {pre}): compile phase {summary.wall_s:.1f}s, longest task "
          f"{row['longest_task_s']:.1f}s, plan {summary.plan_s:.1f}s, pool start "
          f"{pool_start_s:.1f}s", flush=True)
    return row


def serial_run(args: argparse.Namespace, base: CompilationConfig, root: str, common: dict,
               runs: list[dict]) -> tuple[dict[str, float], float, float]:
    """The serial loop (cold Inductor cache) after the Ray runs; its numbers go into `common`,
    the ratios into each of `runs`. (phase seconds, loop start as time.time(), loop seconds)"""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "serial-inductor")  # cold cache
    if args.serial_compile_threads is not None:
        set_compile_threads(args.serial_compile_threads)
        common["serial_compile_threads"] = args.serial_compile_threads
    elif args.device == "cpu":
        set_compile_threads(1)  # faster than the default on small CPU hosts (NOTES)
    common["serial_freeze_heap"] = args.serial_freeze_heap
    plan_s, loop_s, n_tasks, per_task, serial_phases, loop_at = serial(
        base.replace(cache=CacheConfig(cache_dir=os.path.join(root, "serial-cache"))), args)
    # No fan-out beats its longest task: serial loop / longest serial task bounds the ratio
    # as long as Ray's tasks take as long as serial's (shared GEMM timings and one compile
    # thread per task made them shorter in the 2026-11-21 runs, see RESULTS.md).
    common.update(serial_plan_s=round(plan_s, 3), serial_s=round(loop_s, 3),
                  serial_tasks=n_tasks, serial_per_task_s=per_task,
                  ceiling=round(loop_s / max(per_task), 2) if per_task else None)
    for run in runs:
        run["ratio_end_to_end"] = round((plan_s + loop_s) / run["ray_total_s"], 2)
        run["ratio_compile"] = round(loop_s / run["ray_wall_s"], 2) if run["ray_wall_s"] else None
        if run["pool"] == "on":  # counting the pool's start too, as a first run would
            run["ratio_end_to_end_with_pool_start"] = round(
                (plan_s + loop_s) / (run["ray_total_s"] + run["pool_start_s"]), 2)
    return serial_phases, loop_at, loop_s


def timed_process(argv: list[str], root: str, name: str) -> dict:
    """Run `argv` with a cold Inductor cache of its own under `root`; its wall seconds (start to
    exit), exit code, and the last lines of its output (kept in root/name.log)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(root, f"{name}-inductor"))
    log = os.path.join(root, f"{name}.log")
    print(f"{name}: {' '.join(argv[1:])} (output: {log})", flush=True)
    with open(log, "w") as f:  # written as it runs: a run cut off still shows how far it got
        start = time.perf_counter()
        rc = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    print(f"{name}: rc {rc}, {wall:.1f}s start to exit", flush=True)
    with open(log) as f:
        tail = f.read().strip().splitlines()[-12:]
    return {"wall_s": round(wall, 2), "rc": rc, "tail": tail}


def end_to_end(args: argparse.Namespace, root: str) -> int:
    """The user's `vcr warm` and the serial loop, each a process from start to exit."""
    shape = ["--model", args.model, "--tp", str(args.tp), "--num-layers", str(args.num_layers),
             "--sizes", args.sizes, "--device", args.device, "--backend", args.backend]
    shape += ["--no-dynamic"] * args.no_dynamic + ["--max-autotune"] * args.max_autotune
    user = [sys.executable, "-m", "vllm_compile_ray", "warm", *shape]
    runs = {"user_command": timed_process(
        [*user, "--cache", os.path.join(root, "user-cache")], root, "user_command")}
    for i, flags in enumerate(args.flags, 1):
        cache = os.path.join(root, f"flags{i}-cache")
        runs[f"flags{i}"] = timed_process([*user, *shlex.split(flags), "--cache", cache], root,
                                          f"flags{i}")
    if not args.skip_serial:
        serial_argv = [sys.executable, os.path.abspath(__file__), "--serial-process", *shape]
        serial_argv += ["--coordesc"] * args.coordesc
        runs["serial"] = timed_process(serial_argv, root, "serial")
    row = {"model": args.model, "tp": args.tp, "num_layers": args.num_layers,
           "sizes": args.sizes, "dynamic": not args.no_dynamic, "device": args.device,
           "max_autotune": args.max_autotune, "host_cpus": os.cpu_count(),
           **{f"{k}_s": v["wall_s"] for k, v in runs.items()}}
    if args.device == "cuda":
        row.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
    if "serial" in runs and all(v["rc"] == 0 for v in runs.values()):
        row["ratio_end_to_end"] = round(runs["serial"]["wall_s"]
                                        / runs["user_command"]["wall_s"], 2)
    flagged = [v["wall_s"] for k, v in runs.items() if k.startswith("flags") and v["rc"] == 0]
    if flagged and runs["user_command"]["rc"] == 0:
        row["flags"] = args.flags
        # The defaults against the fastest flags measured beside them (issue target: <= 1.1)
        row["defaults_over_best_flags"] = round(runs["user_command"]["wall_s"] / min(flagged), 2)
    for name, run in runs.items():
        if run["rc"]:
            print(f"{name} failed (rc {run['rc']}); its last lines:", *run["tail"], sep="\n")
    print(json.dumps(row), flush=True)
    return 0 if all(v["rc"] == 0 for v in runs.values()) else 1


def main() -> int:
    args = parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    options = {"max_autotune": True} if args.max_autotune else {}
    if args.coordesc:
        options["coordinate_descent_tuning"] = True
    root = args.root or tempfile.mkdtemp(prefix="vcr-bench-")
    os.makedirs(root, exist_ok=True)
    if args.end_to_end:
        return end_to_end(args, root)
    base = CompilationConfig(backend=args.backend, use_inductor=args.backend == "inductor",
                             compile_sizes=sizes, compile_dynamic=not args.no_dynamic,
                             inductor_compile_config=options)
    if args.serial_process:
        found: dict = {}
        serial_run(args, base, root, found, [])
        print(json.dumps(found), flush=True)
        return 0
    settings = run_settings(args)
    common: dict = {"model": args.model, "tp": args.tp, "num_layers": args.num_layers,
                    "sizes": list(sizes), "dynamic": not args.no_dynamic, "device": args.device,
                    "backend": args.backend, "options": options}
    if args.device == "cuda":
        common.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
    common["host_cpus"] = os.cpu_count()

    # Ray first: its workers get a cold Inductor cache of their own through the runtime env.
    sampler = Sampler().start()
    runs = [ray_run(args, base, root, i, len(settings), *run)
            for i, run in enumerate(settings)]
    serial_phases = None
    if not args.skip_serial:
        serial_phases, loop_at, loop_s = serial_run(args, base, root, common, runs)
    sampler.stop()
    for run in runs:  # each window's mean once every sample covering it is in
        run["busy"] = sampler.mean(*run.pop("window"))
    if not args.skip_serial:
        common["serial_busy"] = sampler.mean(loop_at, loop_at + loop_s)
    print_results(common, runs, serial_phases)
    return 0 if all(run["ok"] for run in runs) else 1

if __name__ == "__main__":
    sys.exit(main())
