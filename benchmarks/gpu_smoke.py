"""GPU smoke check of the core path: compile a Llama slice piecewise through a file cache, then
load it in a fresh process with zero compiles; outputs compared with eager.

python benchmarks/gpu_smoke.py [--model llama-3-8b] [--num-layers 4] [--sizes 1,16,64]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import vllm_compile_ray as vcr


def run(args: argparse.Namespace) -> dict:
    config = vcr.CompilationConfig(compile_sizes=[int(s) for s in args.sizes.split(",")],
                                   cache=vcr.CacheConfig(cache_dir=args.cache,
                                                         staging_dir=args.staging))
    start = time.perf_counter()
    model = vcr.models.build(args.model, num_layers=args.num_layers, device="cuda")
    compiled = vcr.compile(model, config, model_name=args.model)
    diffs = {}
    first_call = None
    for n in (1, 3, *config.compile_sizes, 100):
        ids, pos = torch.randint(0, 1000, (n,), device="cuda"), torch.arange(n, device="cuda")
        out = compiled(ids, pos)
        if first_call is None:
            torch.cuda.synchronize()
            first_call = time.perf_counter() - start
        with torch.no_grad():
            ref = model(ids, pos)
        diffs[n] = (out.float() - ref.float()).abs().max().item()
    return {"first_call_s": round(first_call, 2), "counter": compiled.counter.diff(vcr.CompilationCounter()),
            "max_abs_diff": diffs, "monitor": {k: v["total"] for k, v in compiled.monitor.summary().items()},
            "summary": compiled.plan.summary()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--sizes", default="1,16,64")
    parser.add_argument("--cache", default="")
    parser.add_argument("--staging", default="")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args)))
        return
    root = tempfile.mkdtemp(prefix="vcr-gpu-smoke-")
    for name in ("a", "b"):
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--num-layers",
               str(args.num_layers), "--sizes", args.sizes, "--cache", f"file://{root}/cache",
               "--staging", f"{root}/staging-{name}"]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{root}/inductor-{name}"}
        start = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-6000:])
            sys.exit(out.returncode)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["process_s"] = round(time.perf_counter() - start, 2)
        print(f"process {name}:", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
