"""Does a loaded, autotuned artifact's first call run without tuning? (GPU)

    python benchmarks/gpu_tuned_first_call.py --sizes 64 --num-layers 2

Process A compiles llama-3-8b-shaped pieces with max-autotune (--options) into a file
cache (`ship_autotune` on, or off with --no-ship). Process B, with an empty Inductor and Triton
cache, loads them and runs every shape once. B reports its first-call seconds, the tuning Inductor
did during that call (benchmark_all_configs and coordinate descent seconds, from
`compile_times()`), the `.best_config` files in its Inductor cache, and the Triton kernels it had
to compile (new Triton cache entries). With results shipped, B should tune nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def count(root: Path, pattern: str) -> int:
    return sum(1 for _ in root.rglob(pattern)) if root.exists() else 0


def best_configs(root: Path) -> dict[str, int]:
    """relative path -> mtime_ns of every `.best_config` under an Inductor cache dir."""
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in root.rglob("*.best_config")}


def child(spec: dict) -> dict:
    import torch
    import torch._dynamo.utils as dynamo_utils

    import vllm_compile_ray as vcr

    inductor_dir, triton_dir = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]), Path(os.environ["TRITON_CACHE_DIR"])
    cfg = vcr.CompilationConfig.from_dict(spec["config"])
    device = spec["device"]
    model = vcr.models.build(spec["model"], num_layers=spec["num_layers"], device=device)
    compiled = vcr.load(model, cfg, model_name=spec["model"], warmup=False, report=False)
    def phase_seconds() -> dict[str, float]:
        names, values = dynamo_utils.compile_times(repr="csv", aggregate=True)
        return {name: float(value) for name, value in zip(names, values)}

    loaded_times = phase_seconds()
    before = {"best_configs": best_configs(inductor_dir),
              "triton_entries": count(triton_dir, "*.json")}
    start = time.perf_counter()
    for size in [*cfg.compile_sizes, 7]:  # 7: the dynamic artifact
        compiled(*vcr.api.example_args(size, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    tuning = {k: round(v - loaded_times.get(k, 0.0), 3) for k, v in phase_seconds().items()
              if "autotun" in k.lower() or "coordinate" in k or "benchmark" in k}
    return {"mode": spec["mode"], "first_call_s": round(first_call_s, 3),
            "tuning_during_first_call_s": tuning,
            "best_configs_before_first_call": len(before["best_configs"]),
            "best_configs_written_by_first_call": sorted(
                k for k, t in best_configs(inductor_dir).items() if before["best_configs"].get(k) != t),
            "sample_best_config": sorted(before["best_configs"])[:3],
            "triton_compiled_during_first_call": count(triton_dir, "*.json") - before["triton_entries"],
            "counters": {k: dict(v) for k, v in dynamo_utils.counters.items() if k == "inductor"},
            "compiles": compiled.counter.num_backend_compilations,
            "hits": compiled.counter.num_cache_hits}


def run(spec: dict, work: Path) -> dict:
    inductor_dir = Path(tempfile.mkdtemp(prefix=f"ind-{spec['mode']}-", dir=work))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
           "TRITON_CACHE_DIR": str(inductor_dir / "triton"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{spec['mode']} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--no-ship", action="store_true")
    p.add_argument("--options", default='{"max_autotune": true}', help="Inductor options (JSON)")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    work = Path(tempfile.mkdtemp(prefix="vcr-tuned-"))
    config = {"compile_sizes": [int(s) for s in args.sizes.split(",")],
              "inductor_compile_config": json.loads(args.options),
              "ship_autotune": not args.no_ship}
    for mode, on_miss in (("compile", "compile_and_publish"), ("load", "error")):
        spec = {"mode": mode, "num_layers": args.num_layers, "model": args.model, "device": args.device,
                "config": {**config, "on_miss": on_miss,
                           "cache": {"cache_dir": f"file://{work}/cache",
                                     "staging_dir": str(work / f"staging-{mode}")}}}
        print(json.dumps(run(spec, work)), flush=True)


if __name__ == "__main__":
    main()
