"""Peak memory of planning a big model on a CPU-only driver (meta device, no weights).

    python benchmarks/bench_plan_memory.py --model llama-3-70b --tp 8

Plans every layer (capture, split, canonicalize, key) as `warm()` does on its driver and prints the
process's peak RSS; exit status 1 if it reaches --limit-gb (default 4). The target fingerprint is a
placeholder for --device cuda (a CPU driver asks a GPU node for the real one; its value does not
change memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-70b")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=None, help="default: the preset's (80 for 70B)")
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--limit-gb", type=float, default=4.0)
    args = p.parse_args()

    start = time.perf_counter()
    import torch  # noqa: F401  (import cost shows in the baseline)

    from vllm_compile_ray import CompilationConfig, models
    from vllm_compile_ray.runtime.api import example_args, key_context
    from vllm_compile_ray.compiling.compiler_interface import make_compiler
    from vllm_compile_ray.torch_private.inductor import environment_fingerprint
    from vllm_compile_ray.planning.plan import capture, plan_graph

    baseline = peak_rss_mb()
    config = CompilationConfig(compile_sizes=tuple(int(s) for s in args.sizes.split(",") if s))
    fingerprint = environment_fingerprint("cpu") if args.device == "cpu" else {
        "device_type": "cuda", "device_name": "placeholder", "capability": "9.0"}
    t0 = time.perf_counter()
    module = models.build(args.model, args.tp, 0, device="meta", num_layers=args.num_layers)
    plan = plan_graph(capture(module, example_args(device="meta")), config,
                      key_context(config, make_compiler(config), args.device, fingerprint),
                      args.device)
    plan_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    result = {"model": args.model, "tp": args.tp, "layers": module.config.num_hidden_layers,
              **plan.summary(), "plan_s": round(plan_s, 2),
              "total_s": round(time.perf_counter() - start, 2), "baseline_rss_mb": round(baseline, 1),
              "peak_rss_mb": round(peak, 1), "limit_mb": args.limit_gb * 1024}
    print("result " + json.dumps(result), flush=True)
    print(f"planned {args.model} tp={args.tp}: {result['tasks']} tasks in {plan_s:.1f}s, "
          f"peak RSS {peak:.0f} MB (limit {args.limit_gb:g} GB)")
    return 0 if peak < args.limit_gb * 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
