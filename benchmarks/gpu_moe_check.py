"""A MoE model from its config.json on the user's path: `vcr warm --model CONFIG` fills a cache,
then a rank loads it with `vcr.load(..., on_miss="error")` and its outputs are checked against
the same model run eagerly.

    python benchmarks/gpu_moe_check.py --config tests/data/configs/qwen3-30b-a3b.json \\
        --num-layers 4 --sizes 1,8,64,512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

import vllm_compile_ray as vcr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--sizes", default="1,8,64,512")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cache", default=None)
    args = p.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="vcr-moe-")
    sizes = [int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    warm = subprocess.run([sys.executable, "-m", "vllm_compile_ray", "warm", "--model", args.config,
                           "--num-layers", str(args.num_layers), "--sizes", args.sizes,
                           "--device", args.device, "--cache", cache],
                          capture_output=True, text=True)
    warm_s = time.perf_counter() - start
    print("\n".join((warm.stdout + warm.stderr).strip().splitlines()[-8:]))
    if warm.returncode:
        raise SystemExit(f"vcr warm failed ({warm.returncode})")

    model = vcr.models.build(args.config, device=args.device, num_layers=args.num_layers)
    config = vcr.CompilationConfig(compile_sizes=sizes, cache=vcr.CacheConfig(cache_dir=cache),
                                   on_miss="error")
    compiled = vcr.load(model, config, model_name=args.config)
    diffs = {}
    for n in (*sizes, 100):  # 100: the dynamic artifact
        ids = torch.randint(0, 1000, (n,), device=args.device)
        pos = torch.arange(n, device=args.device)
        with torch.no_grad():
            want = model(ids, pos).float()
        got = compiled(ids, pos).float()
        diffs[n] = round(((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item(), 5)
    report = compiled.report
    print(json.dumps({"config": args.config, "layers": args.num_layers, "warm_s": round(warm_s, 1),
                      "load_total_s": round(report.total_s, 2), "compiles": report.compiles,
                      "hits": report.hits, "eager_fallbacks": report.eager_fallbacks,
                      "max_rel_diff_by_size": diffs}))


if __name__ == "__main__":
    main()
