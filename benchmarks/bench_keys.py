"""Key computation + lookup per piece at startup: split, canonicalize and key a traced model, then
look every key up in a store (one batched request), as a loading rank does.

    python benchmarks/bench_keys.py --model llama-3-8b --sizes 1,2,4,8,16,32,64,128,256,512

Prints ms per piece for plan (split + canonical + keys) and for the lookup; target <= 5 ms/piece
together (vLLM's cached pass hashing brought its lookup to 11.3 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import vllm_compile_ray as vcr
from vllm_compile_ray.compiling.compiler_interface import make_compiler
from vllm_compile_ray.planning.plan import capture, plan_graph
from vllm_compile_ray.runtime.api import example_args, key_context, open_store
from vllm_compile_ray.torch_private import inductor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--cache", default="", help="store URL for the lookup (default: a temp dir)")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options (JSON)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cache = vcr.CacheConfig(cache_dir=args.cache or tempfile.mkdtemp(prefix="vcr-keys-"),
                            storage_options=args.storage_options)
    config = vcr.CompilationConfig(compile_sizes=[int(s) for s in args.sizes.split(",")],
                                   cache=cache)
    model = vcr.models.build(args.model, device="meta", num_layers=args.num_layers)
    context = key_context(config, make_compiler(config), "cpu", inductor.environment_fingerprint("cpu"))
    start = time.perf_counter()
    gm = capture(model, example_args())
    trace_s = time.perf_counter() - start
    store = open_store(config)
    plan_ms, lookup_ms = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plan = plan_graph(gm, config, context, "cpu")
        t1 = time.perf_counter()
        store.contains_many(plan.keys)
        t2 = time.perf_counter()
        plan_ms.append((t1 - t0) * 1e3 / len(plan.pieces))
        lookup_ms.append((t2 - t1) * 1e3 / len(plan.pieces))
    result = {"model": args.model, "pieces": len(plan.pieces), "keys": len(plan.keys),
              "trace_s": round(trace_s, 2),
              "plan_ms_per_piece": round(statistics.median(plan_ms), 2),
              "lookup_ms_per_piece": round(statistics.median(lookup_ms), 2)}
    result["total_ms_per_piece"] = round(result["plan_ms_per_piece"] + result["lookup_ms_per_piece"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
