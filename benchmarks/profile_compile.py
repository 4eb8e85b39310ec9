"""Where one (piece, shape) compile spends its time: Inductor's phase timers and a profile.

    python benchmarks/profile_compile.py --model llama-3-8b --shape 512 --max-autotune

Compiles the plan's biggest piece (or --piece N in plan order) for one shape in this process,
cold Inductor cache, then prints the compile seconds, the runtime-autotune seconds (the first
call, `ship_autotune`), Inductor's `compile_times()` and the top functions by cumulative time.
It answers which part of the longest warm task sets the floor of a Ray fan-out.

Several at once, as a warm run's compiles share GPUs (each plans, then all compile together):

    T=$(( $(date +%s) + 45 )); for dev in 0 0 0 0 0 0 0 0 0; do CUDA_VISIBLE_DEVICES=$dev \
        python benchmarks/profile_compile.py --shape 512 --max-autotune --threads 1 \
        --warm-device --no-profile --gc freeze --start-at $T & done; wait
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import tempfile
import time

# Before torch is imported: importing torch._inductor.config sets TORCHINDUCTOR_CACHE_DIR to its
# shared default (/tmp/torchinductor_<user>) when unset, so a later setdefault would keep every run
# in one warm cache (seen on the GPU host: a second run of the same compile took 2.5 s, not 21 s).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="vcr-prof-"))

from vllm_compile_ray import CompilationConfig, models
from vllm_compile_ray.compiling import cpu_time
from vllm_compile_ray.compiling import heap
from vllm_compile_ray.compiling.compiler_interface import make_compiler
from vllm_compile_ray.planning.plan import capture, plan_graph
from vllm_compile_ray.runtime.api import example_args, key_context
from vllm_compile_ray.torch_private.inductor import environment_fingerprint, set_compile_threads, warm_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--shape", default="512", help='a size, or "dynamic"')
    p.add_argument("--piece", type=int, default=None, help="index among unique pieces (default: biggest)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-autotune", action="store_true", help='Inductor {"max_autotune": true}')
    p.add_argument("--coordesc", action="store_true", help="and coordinate_descent_tuning")
    p.add_argument("--threads", type=int, default=0, help="Inductor compile threads (0: default)")
    p.add_argument("--warm-pool", action="store_true",
                   help="start Inductor's compile pool (--threads processes) and wait until it "
                        "answers before compiling (a first compile does not wait for it)")
    p.add_argument("--check", action="store_true",
                   help="run the compiled piece against the eager piece on the same inputs")
    p.add_argument("--gc", choices=("normal", "freeze", "off"), default="normal",
                   help="the garbage collector during the compile: as Python starts it, with the "
                        "heap frozen first (what compile workers do, `heap.freeze`), or disabled")
    p.add_argument("--warm-device", action="store_true",
                   help="first one tiny compile on the device, as a compile worker's start-up does")
    p.add_argument("--start-at", type=float, default=0.0,
                   help="compile at this time.time(), after planning (several processes started "
                        "together then compile at once, as a warm run's workers do)")
    p.add_argument("--no-profile", action="store_true",
                   help="no cProfile (it slows the compile's Python work, the collector's too)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--sort", default="cumulative",
                   help="pstats orders for the profile, comma-separated (e.g. cumulative,tottime)")
    args = p.parse_args()

    print(f"Inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}", flush=True)
    if args.threads:
        set_compile_threads(args.threads)
    if args.warm_pool:
        if args.threads < 2:
            p.error("--warm-pool needs --threads 2 or more (a pool of that many processes)")
        wait_for_pool()
    shape = args.shape if args.shape == "dynamic" else int(args.shape)
    options = {"max_autotune": True} if args.max_autotune else {}
    if args.coordesc:
        options["coordinate_descent_tuning"] = True
    config = CompilationConfig(compile_sizes=(shape,) if shape != "dynamic" else (),
                               inductor_compile_config=options)
    compiler = make_compiler(config)
    module = models.build(args.model, args.tp, 0, device="meta", num_layers=args.num_layers)
    plan = plan_graph(capture(module, example_args(device="meta")), config,
                      key_context(config, compiler, args.device, environment_fingerprint(args.device)),
                      args.device)
    tasks = [t for t in plan.tasks() if t.shape == shape]
    task = (tasks[args.piece] if args.piece is not None
            else max(tasks, key=lambda t: len(t.piece.graph.graph.nodes)))
    print(f"profiling {task.name}: {len(task.piece.graph.graph.nodes)} nodes, "
          f"options {options or 'default'}", flush=True)

    import torch._dynamo.utils as dynamo_utils

    if args.warm_device:
        warm_device(args.device)
    if args.gc == "freeze":
        print(f"froze {heap.freeze()} objects", flush=True)
    elif args.gc == "off":
        gc.disable()
    if args.start_at:
        wait = args.start_at - time.time()
        print(f"waited {wait:.1f} s for the start (negative: started late)", flush=True)
        time.sleep(max(0.0, wait))
    profiler = cProfile.Profile()
    with heap.collections() as collected, cpu_time.measure() as cpu:
        start = time.perf_counter()
        if not args.no_profile:
            profiler.enable()
        result = compiler.compile(task.piece.graph, task.piece.input_specs, shape, args.device)
        profiler.disable()
        total = time.perf_counter() - start
    print(f"garbage collector ({args.gc}): {collected['collections']} collections by generation, "
          f"{collected['seconds']:.2f} s")
    print(f"CPU: process {cpu['cpu_s']:.2f} s, its children {cpu['child_cpu_s']:.2f} s, compile "
          f"thread ran {cpu.get('run_s', 0):.2f} s and waited for a core {cpu.get('runq_s', 0):.2f} s")
    print(f"compile + first-call tuning {total:.2f} s; artifact {len(result.artifact) / 1e6:.2f} MB; "
          f"{result.info}")
    if args.check:
        check(task, result.fn, args.device)
    print(dynamo_utils.compile_times(repr="str", aggregate=True))
    for order in [] if args.no_profile else args.sort.split(","):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.top)
        print(out.getvalue())


def wait_for_pool() -> None:
    """Start Inductor's compile process pool and wait until its workers answer."""
    from torch._inductor.async_compile import AsyncCompile

    start = time.perf_counter()
    if not AsyncCompile.use_process_pool():
        AsyncCompile._ready_future.result(timeout=600)
    print(f"compile pool ready in {time.perf_counter() - start:.1f} s "
          f"(used: {AsyncCompile.use_process_pool()})", flush=True)


def check(task, fn, device: str) -> None:
    """Compiled against eager on the same random inputs (static shapes: the task's size)."""
    import torch

    from vllm_compile_ray.torch_private.inductor import example_tensors

    size = task.shape if task.shape != "dynamic" else 48
    torch.manual_seed(0)
    inputs = [t.normal_(0, 0.02) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in example_tensors(task.piece.input_specs, size, device)]
    want = task.piece.graph(*inputs)
    got = fn(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    worst = max(float((g.float() - w.float()).abs().max() / (w.float().abs().max() + 1e-6))
                for g, w in zip(got, want) if isinstance(w, torch.Tensor) and w.is_floating_point())
    print(f"check: {len(want)} outputs, worst max|compiled - eager| / max|eager| = {worst:.2e}")


if __name__ == "__main__":
    main()
