"""Deserializing a rank's artifacts one by one vs on a thread pool: is concurrent loading worth it?

    python benchmarks/bench_parallel_load.py --cache DIR --model llama-3-8b --num-layers 4 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --max-autotune --threads 1,4,8

Each thread count runs in a fresh process with an empty Inductor cache, on the artifacts `vcr
warm` published to DIR: fetch every artifact (timed apart), load them all (`compiler.load`, the
step `vcr load` reports as "load"), then run each once. Prints seconds per step and whether every
artifact's output equals the one-thread run's (loads that race must not change a kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def child(args: argparse.Namespace) -> dict:
    import torch

    from vllm_compile_ray import CacheConfig, CompilationConfig, models, plan_model

    from vllm_compile_ray.torch_private import inductor

    from vllm_compile_ray.torch_private import inductor_metrics
    from vllm_compile_ray.runtime.api import open_store
    from vllm_compile_ray.compiling.compiler_interface import make_compiler

    options = {"max_autotune": True} if args.max_autotune else {}
    config = CompilationConfig(compile_sizes=[int(s) for s in args.sizes.split(",")],
                               inductor_compile_config=options,
                               cache=CacheConfig(cache_dir=args.cache))
    model = models.build(models.get_config(args.model), device="meta",
                         num_layers=args.num_layers)
    tasks = plan_model(model, config, device_type="cuda").tasks()
    store, compiler = open_store(config), make_compiler(config)
    start = time.perf_counter()
    payloads = {t.key: store.fetch(t.key).payload for t in tasks}
    fetch_s = time.perf_counter() - start

    def load(task):
        return task.key, compiler.load(payloads[task.key], task.piece.graph, task.shape, "cuda")

    torch.cuda.init()
    start = time.perf_counter()
    with inductor_metrics.kernel_work() as work:
        if args.child == 1:
            loaded = dict(map(load, tasks))
        else:
            with ThreadPoolExecutor(args.child) as pool:
                loaded = dict(pool.map(load, tasks))
        load_s = time.perf_counter() - start
        sums = {}
        start = time.perf_counter()
        with torch.no_grad():
            for t in tasks:
                size = 8 if t.shape == "dynamic" else int(t.shape)
                torch.manual_seed(0)
                inputs = [x.normal_() if isinstance(x, torch.Tensor) and x.is_floating_point()
                          else x
                          for x in inductor.example_tensors(t.piece.input_specs, size, "cuda")]
                out = loaded[t.key](*inputs)
                outs = out if isinstance(out, (list, tuple)) else [out]
                sums[t.key] = [float(o.float().sum()) for o in outs if isinstance(o, torch.Tensor)]
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
    return {"threads": args.child, "artifacts": len(tasks), "fetch_s": round(fetch_s, 3),
            "load_s": round(load_s, 3), "first_calls_s": round(first_s, 3), **work, "sums": sums}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--max-autotune", action="store_true")
    p.add_argument("--threads", default="1,4,8")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    base = None
    for threads in [int(t) for t in args.threads.split(",")]:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="vcr-pl-")}
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", str(threads)]
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"threads={threads} failed:\n{done.stderr[-3000:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        sums = row.pop("sums")
        base = base if base is not None else sums
        row["same_outputs"] = sums == base
        row["process_s"] = round(time.perf_counter() - start, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
