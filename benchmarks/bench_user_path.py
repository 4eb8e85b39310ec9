"""The user's path, end to end: each step is the command a user types, run as a process and
timed from its start to its exit, with the CLI's defaults.

    python benchmarks/bench_user_path.py --model llama-3-8b --num-layers 4 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --max-autotune --steps serial,warm,load,restart

  serial   `vcr load --on-miss compile` into an empty cache: one process traces and compiles
           every (piece, shape) one after another (what each rank does without a shared cache)
  warm     `vcr warm` into an empty cache (Ray in-process, its defaults sized from this node)
  load     `vcr load --on-miss error` from warm's cache, a fresh Inductor cache (a new node)
  restart  the same again, the Inductor cache of `load` kept (a restart on that node)

--load-layers sets the layer count of the load steps (the warm and serial steps compile the
same unique pieces at any layer count: --num-layers only shortens their trace). Prints each
step's seconds, its last lines, and serial / warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run(argv: list[str], env: dict[str, str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
    return {"argv": " ".join(argv), "rc": done.returncode, "seconds": round(seconds, 2),
            "tail": tail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--load-layers", type=int, default=None)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-autotune", action="store_true")
    p.add_argument("--steps", default="serial,warm,load,restart")
    p.add_argument("--extra-warm", default="", help="more `vcr warm` options, space-separated")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="vcr-user-path-")
    vcr = [sys.executable, "-m", "vllm_compile_ray"]
    common = ["--model", args.model, "--sizes", args.sizes, "--device", args.device]
    common += ["--max-autotune"] if args.max_autotune else []
    layers = ["--num-layers", str(args.num_layers)] if args.num_layers else []
    load_layers = ["--num-layers", str(args.load_layers)] if args.load_layers else layers

    def env(inductor: str) -> dict[str, str]:
        return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, inductor)}

    results: dict[str, dict] = {}
    for step in args.steps.split(","):
        if step == "serial":
            argv = [*vcr, "load", *common, *layers, "--on-miss", "compile",
                    "--cache", os.path.join(work, "serial-cache")]
            results[step] = run(argv, env("inductor-serial"))
        elif step == "warm":
            argv = [*vcr, "warm", *common, *layers, "--cache", os.path.join(work, "cache"),
                    *args.extra_warm.split()]
            results[step] = run(argv, env("inductor-warm"))
        elif step in ("load", "restart"):
            argv = [*vcr, "load", *common, *load_layers, "--on-miss", "error",
                    "--cache", os.path.join(work, "cache")]
            results[step] = run(argv, env("inductor-load"))
        else:
            raise SystemExit(f"unknown step {step!r}: serial, warm, load, restart")
        print(json.dumps({step: results[step]}), flush=True)
    if "serial" in results and "warm" in results:
        ratio = results["serial"]["seconds"] / results["warm"]["seconds"]
        print(f"serial {results['serial']['seconds']} s / warm {results['warm']['seconds']} s "
              f"= {ratio:.2f}x end to end", flush=True)


if __name__ == "__main__":
    main()
