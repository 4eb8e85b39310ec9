"""Warm the shared compile cache of a model: the entrypoint of `ray job submit`.

    ray job submit --working-dir . -- python jobs/warm_cache.py --model llama-3-8b --tp 8 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --cache s3://bucket/vcr

Exit status 1 when any compile failed or timed out. Env (read here only): VCR_CACHE and
VCR_STORAGE_OPTIONS (JSON) are the defaults of --cache and --storage-options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vllm_compile_ray.config import CompilationConfig
from vllm_compile_ray.warm import warm


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes expects comma-separated ints, got {text!r}") from None


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model preset name, e.g. llama-3-8b")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--num-layers", type=int, default=None, help="override the layer count")
    p.add_argument("--sizes", type=_sizes, default=(), help="static sizes, e.g. 1,2,4,8")
    p.add_argument("--no-dynamic", action="store_true", help="skip the dynamic-shape compile")
    p.add_argument("--cache", default=os.environ.get("VCR_CACHE", ""),
                   help="cache URL (s3://bucket/prefix, /path); default $VCR_CACHE or a local dir")
    p.add_argument("--storage-options", type=_json_dict,
                   default=_json_dict(os.environ.get("VCR_STORAGE_OPTIONS", "")),
                   help="fsspec storage options as JSON; default $VCR_STORAGE_OPTIONS")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="compile target")
    p.add_argument("--backend", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--inductor-config", type=_json_dict, default={},
                   help='Inductor options as JSON, e.g. {"max_autotune": true}')
    p.add_argument("--max-autotune", action="store_true", help="shorthand for max_autotune + "
                   "coordinate descent tuning in --inductor-config")
    p.add_argument("--max-compile-time", type=float, default=600.0, help="seconds per compile")
    p.add_argument("--gpus-per-compile", type=float, default=None,
                   help="GPU fraction per compile task (default 0.25 for cuda, 0 for cpu)")
    p.add_argument("--cpus-per-compile", type=float, default=1.0)
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--max-retries", type=int, default=3, help="retries after a worker crash")
    p.add_argument("--compile-retries", type=int, default=1, help="retries of a failed compile")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--summary-json", default="", help="also write the summary to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inductor_config = dict(args.inductor_config)
    if args.max_autotune:
        inductor_config.update(max_autotune=True, coordinate_descent_tuning=True)
    config = CompilationConfig(
        backend=args.backend, use_inductor=args.backend == "inductor", compile_sizes=args.sizes,
        compile_dynamic=not args.no_dynamic, inductor_compile_config=inductor_config,
        max_compile_time=args.max_compile_time, cache_dir=args.cache,
        storage_options=args.storage_options)
    summary = warm(args.model, config, tp_size=args.tp, num_layers=args.num_layers,
                   device_type=args.device, address=args.address, max_in_flight=args.max_in_flight,
                   gpus_per_compile=args.gpus_per_compile, cpus_per_compile=args.cpus_per_compile,
                   max_retries=args.max_retries, compile_retries=args.compile_retries,
                   progress=lambda line: print(line, flush=True))
    result = {k: v for k, v in summary.to_dict().items() if k != "rows"}
    print("summary " + json.dumps(result, sort_keys=True), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary.to_dict(), f, indent=1, default=str)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
