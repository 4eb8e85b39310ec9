"""Rank startup from the cache the main job fills: from S3 (or a shared directory) against the
same bytes on local disk, a restart, and a cold compile, each the command a user types, timed
from process start to exit.

  warm      `vcr warm` with its defaults fills the shared cache (moto's S3 server on 127.0.0.1
            by default; --cache file: a directory)
  first     `vcr load --on-miss error` from it: the first rank of a model traces it and publishes
            the traced model (later ranks restore it)
  shared    `vcr load --on-miss error` from the shared cache, as a new node: fresh Inductor cache
            and staging directory
  local     the same from a local-disk copy of the shared cache (every object, bytes as they are)
  restart   each side again with the Inductor cache and staging directory of its first new-node
            run kept (a rank restarted on that node)
  cold      `vcr load --on-miss compile` into an empty cache: the rank compiles every piece itself,
            one after another (what it does without a shared cache; --skip-cold leaves it out)

New-node runs alternate sides (shared, local, local, shared, ...), --repeats per side.

    python benchmarks/bench_load.py --device cpu --backend eager --model llama-tiny --sizes 1,4
    python benchmarks/bench_load.py --device cuda --model llama-3-8b --warm-layers 4 \\
        --num-layers 32 --sizes 1,2,4,8,16,32,64,128,256,512 --max-autotune --repeats 3

Targets on the GPU machine: rank ready <= 6 s (trace + key + fetch + load + first call of every
shape), no kernel compile or autotune at startup, shared <= 1.2x local, key + lookup <= 5 ms per
piece (bench_keys.py at the preset's full depth).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "vcr-bench"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
PHASES = ("total_s", "trace_s", "fetch_s", "load_s", "first_call_s")
COUNTS = ("hits", "compiles", "kernel_compiles", "autotunes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-tiny", help="what `vcr warm --model` takes")
    p.add_argument("--num-layers", type=int, help="layers of the ranks' model")
    p.add_argument("--warm-layers", type=int,
                   help="layers the warm traces (default --num-layers): it compiles the same "
                        "unique pieces at any depth")
    p.add_argument("--sizes", default="4", help="comma-separated compile sizes")
    p.add_argument("--no-dynamic", action="store_true", help="static sizes only")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--max-autotune", action="store_true")
    p.add_argument("--cache", default="s3", choices=["s3", "file"],
                   help="the shared cache: moto's S3 server (needs moto) or a directory")
    p.add_argument("--repeats", type=int, default=1, help="new-node runs per side")
    p.add_argument("--skip-cold", action="store_true", help="leave out the cold compile")
    p.add_argument("--json", help="write every run's report and times here")
    return p.parse_args(argv)


def model_args(args: argparse.Namespace, layers: int | None) -> list[str]:
    argv = ["--model", args.model, "--sizes", args.sizes, "--device", args.device,
            "--backend", args.backend]
    argv += ["--num-layers", str(layers)] if layers else []
    argv += ["--no-dynamic"] if args.no_dynamic else []
    return argv + (["--max-autotune"] if args.max_autotune else [])


def report_of(output: str) -> dict:
    """Rank 0's row of the table `vcr load` prints, by column name ("trace(s)" -> "trace_s")."""
    lines = output.splitlines()
    i = max(n for n, line in enumerate(lines) if line.startswith("rank "))
    names = [h.replace("(s)", "_s") for h in lines[i].split()]
    return {name: float(v) if "." in v else int(v)
            for name, v in zip(names, lines[i + 1].split())}


class Runner:
    """Runs `vcr` commands as processes in `work`, each with its own or a kept Inductor cache."""

    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env, self.runs = work, env, []

    def vcr(self, mode: str, argv: list[str], node: str, storage: str = "") -> dict:
        env = {**self.env, "TORCHINDUCTOR_CACHE_DIR": str(self.work / f"inductor-{node}"),
               "VCR_STORAGE_OPTIONS": storage}
        if mode != "warm":
            argv = [*argv, "--staging-dir", str(self.work / f"staging-{node}")]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "vllm_compile_ray", *argv], env=env,
                              capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - start
        out = done.stdout + done.stderr
        if done.returncode != 0:
            sys.stderr.write(out[-6000:])
            raise SystemExit(f"{mode}: `vcr {' '.join(argv)}` failed (exit {done.returncode})")
        run = {"mode": mode, "wall_s": round(wall, 2), "argv": " ".join(argv)}
        if mode == "warm":
            run["summary"] = [x for x in done.stdout.splitlines()
                              if x.startswith(("warm ", "took ", "complete artifacts"))]
        else:
            run["report"] = report_of(done.stdout)
        self.runs.append(run)
        print(f"{mode}: {run['wall_s']:.2f} s start to exit", flush=True)
        return run


def shared_cache(kind: str, work: Path) -> tuple[str, dict, object | None]:
    """(url, storage_options, server) of the shared cache."""
    if kind == "file":
        return str(work / "shared"), {}, None
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": AWS_ENV["AWS_ACCESS_KEY_ID"], "secret": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                 "region_name": AWS_ENV["AWS_DEFAULT_REGION"]}}
    boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"],
                 region_name=AWS_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/vcr", options, server


def copy_to_local(url: str, options: dict, local: Path) -> int:
    """Every object under the shared cache, bytes as they are, into `local`; returns the bytes."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.get(path.rstrip("/") + "/", str(local), recursive=True)
    return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())


def summarize(runs: list[dict]) -> list[str]:
    names = {"total_s": "rank ready"}
    lines = [f"{'mode':15}{'runs':>5}"
             + "".join(f"{names.get(p, p.removesuffix('_s')):>18}" for p in PHASES)
             + f"{'start to exit':>18}" + "".join(f"{c:>16}" for c in COUNTS)]
    by_mode: dict[str, list[dict]] = {}
    for run in runs:
        if "report" in run:
            by_mode.setdefault(run["mode"], []).append(run)
    for mode, got in by_mode.items():
        def cell(values: list[float]) -> str:
            text = f"{statistics.mean(values):.2f}"
            return text if len(values) == 1 else f"{text} ({min(values):.2f}-{max(values):.2f})"
        lines.append(f"{mode:15}{len(got):>5}"
                     + "".join(f"{cell([r['report'][p] for r in got]):>18}" for p in PHASES)
                     + f"{cell([r['wall_s'] for r in got]):>18}"
                     + "".join(f"{sum(r['report'][c] for r in got):>16}" for c in COUNTS))
    mean = {m: statistics.mean(r["report"]["total_s"] for r in got) for m, got in by_mode.items()}
    wall = {m: statistics.mean(r["wall_s"] for r in got) for m, got in by_mode.items()}
    lines.append(f"shared / local: rank ready {mean['shared'] / mean['local']:.2f}x, start to "
                 f"exit {wall['shared'] / wall['local']:.2f}x (target <= 1.2x)")
    if "cold" in mean:
        lines.append(f"cold / shared: rank ready {mean['cold'] / mean['shared']:.1f}x, start to "
                     f"exit {wall['cold'] / wall['shared']:.1f}x")
    startup = [r for m in ("shared", "local", "restart-shared", "restart-local")
               for r in by_mode.get(m, [])]
    lines.append(f"startup from the cache: {sum(r['report']['compiles'] for r in startup)} piece "
                 f"compiles, {sum(r['report']['kernel_compiles'] for r in startup)} kernel "
                 f"compiles, {sum(r['report']['autotunes'] for r in startup)} autotunes "
                 f"in {len(startup)} runs")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vcr-bench-load-"))
    env = {**os.environ, **(AWS_ENV if args.cache == "s3" else {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    os.environ.update(AWS_ENV if args.cache == "s3" else {})
    url, options, server = shared_cache(args.cache, work)
    storage = json.dumps(options) if options else ""
    runner = Runner(work, env)
    ranks = model_args(args, args.num_layers)
    print(f"bench_load: {' '.join(ranks)}; shared cache {url}", flush=True)
    try:
        warm = runner.vcr("warm", ["warm", *model_args(args, args.warm_layers or args.num_layers),
                                   "--cache", url], "warm", storage)
        print("\n".join(warm["summary"]), flush=True)
        shared = ["load", *ranks, "--on-miss", "error", "--cache", url]
        local = ["load", *ranks, "--on-miss", "error", "--cache", str(work / "local")]
        runner.vcr("first", shared, "first", storage)
        print(f"copied {copy_to_local(url, options, work / 'local') / 1e6:.1f} MB to local disk",
              flush=True)
        for i in range(args.repeats):
            for side in (("shared", "local") if i % 2 == 0 else ("local", "shared")):
                runner.vcr(side, shared if side == "shared" else local, f"{side}{i}",
                           storage if side == "shared" else "")
        runner.vcr("restart-shared", shared, "shared0", storage)
        runner.vcr("restart-local", local, "local0")
        if not args.skip_cold:
            runner.vcr("cold", ["load", *ranks, "--on-miss", "compile", "--cache",
                                str(work / "cold")], "cold")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(summarize(runner.runs)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runner.runs}, indent=1))


if __name__ == "__main__":
    main()
