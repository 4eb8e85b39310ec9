"""Rank startup from the shared cache vs a cold compile vs the same bytes on local disk.

Each mode runs in a fresh process (nothing warm in memory), one after another in one run:

  cold    compile every (piece, shape) in a process with an empty Inductor cache, publishing to
          the shared cache (which fills it for the other modes); ready time excludes the upload
  local   vcr.load from a file:// cache on local disk holding the same artifact bytes
  shared  vcr.load from the shared cache (moto S3 by default, or a file:// "remote" directory)

Load modes get an empty Inductor cache and an empty staging dir too, as a new node would.

    python benchmarks/bench_load.py --device cpu --num-layers 1 --sizes 4
    python benchmarks/bench_load.py --device cuda --model llama-3-8b --num-layers 4 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --cache file

Targets on the GPU machine: shared >= 40x faster than cold, shared <= 1.2x local, key + lookup
<= 5 ms per piece. On CPU the loads recompile the C++ kernels of each artifact (NOTES), so the
cold/shared ratio there says little; shared/local and key + lookup still do.
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
BUCKET = "vcr-bench"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="llama-tiny", help="a preset of vllm_compile_ray.models")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--sizes", default="4", help="comma-separated compile sizes")
    p.add_argument("--no-dynamic", action="store_true", help="static sizes only")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--inductor-config", default="{}",
                   help='JSON Inductor options, e.g. \'{"max_autotune": true}\'')
    p.add_argument("--cache", default="s3", choices=["s3", "file"],
                   help="shared cache: moto S3 server (needs moto) or a file:// directory")
    p.add_argument("--repeats", type=int, default=1, help="runs of each load mode")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- child process


def child(spec: dict) -> dict:
    """One measurement in this fresh process: build the model, `vcr.load`, report."""
    started = time.perf_counter()
    import torch

    import vllm_compile_ray as vcr

    imported = time.perf_counter()
    cfg = vcr.CompilationConfig.from_dict(spec["config"])
    model = vcr.models.build(spec["model"], num_layers=spec["num_layers"],
                             device=spec["device"])
    built = time.perf_counter()
    compiled = vcr.load(model, cfg, model_name=spec["model"], report=False)
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter()
    if spec["mode"] == "cold":
        write_manifest(compiled, cfg, spec["model"])
    report = compiled.report.to_dict()
    publish_s = compiled.monitor.stats("publish")["total"]
    return {"mode": spec["mode"], "report": report, "publish_s": publish_s,
            "ready_s": report["total_s"] - publish_s, "import_s": imported - started,
            "build_s": built - imported, "process_to_ready_s": ready - started}


def write_manifest(compiled, cfg, model_name: str) -> None:
    """What the warm job leaves beside the artifacts: the manifest loads prefetch from."""
    try:
        from vllm_compile_ray.cache import manifest
    except ImportError:
        return
    import torch

    from vllm_compile_ray.runtime.api import open_store

    ctx = compiled.plan.key_context
    rows = [manifest.make_row(key=t.key, model=model_name, tp_size=1, piece=t.code_id,
                              shape=t.shape, bytes=0, sha256="", compile_seconds=0.0,
                              node="bench", torch=torch.__version__, fingerprint=ctx.fingerprint,
                              fingerprint_id=ctx.fingerprint_id)
            for t in compiled.plan.tasks()]
    manifest.update_manifest(open_store(cfg), model_name, ctx.fingerprint_id, rows)


def run_child(spec: dict, env: dict[str, str], workdir: Path) -> dict:
    inductor_dir = Path(tempfile.mkdtemp(prefix=f"inductor-{spec['mode']}-", dir=workdir))
    child_env = {**os.environ, **env, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
                 "TRITON_CACHE_DIR": str(inductor_dir / "triton"),
                 "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=child_env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{spec['mode']} run failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    return result


# -------------------------------------------------------------------------------- the driver


def shared_cache(kind: str, workdir: Path) -> tuple[str, dict, object | None]:
    """(url, storage_options, server) of the shared cache."""
    if kind == "file":
        return f"file://{workdir}/remote", {}, None
    os.environ.update(AWS_ENV)
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    return f"s3://{BUCKET}/cache", options, server


def copy_to_local(remote_url: str, options: dict, local_url: str) -> tuple[int, int]:
    """The shared cache's artifact bytes, copied as they are to a local-disk cache."""
    from vllm_compile_ray.cache.store import ArtifactStore

    remote, local = ArtifactStore(remote_url, options), ArtifactStore(local_url)
    total = 0
    keys = remote.list_keys()
    for key in keys:
        blob = remote.read_raw(key)
        local.write_raw(key, blob)
        total += len(blob)
    try:
        from vllm_compile_ray.cache import manifest
    except ImportError:
        return len(keys), total
    for entry in manifest.list_manifests(remote):
        local.put_file(entry["path"], remote.get_file(entry["path"]))
    return len(keys), total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sys.path.insert(0, str(ROOT))
    sizes = [int(s) for s in args.sizes.split(",") if s]
    workdir = Path(tempfile.mkdtemp(prefix="vcr-bench-load-"))
    url, options, server = shared_cache(args.cache, workdir)
    env = dict(AWS_ENV) if args.cache == "s3" else {}
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", os.environ.get(
        "TORCHINDUCTOR_COMPILE_THREADS", "1" if (os.cpu_count() or 1) <= 4 else ""))
    env = {k: v for k, v in env.items() if v}
    base = {"compile_sizes": sizes, "compile_dynamic": not args.no_dynamic,
            "backend": args.backend, "use_inductor": args.backend == "inductor",
            "inductor_compile_config": json.loads(args.inductor_config)}

    def spec(mode: str, cache_dir: str, storage_options: dict, on_miss: str) -> dict:
        staging = str(workdir / f"staging-{mode}-{time.time_ns()}")
        config = {**base, "on_miss": on_miss, "cache": {
            "cache_dir": cache_dir, "storage_options": storage_options, "staging_dir": staging}}
        return {"mode": mode, "config": config, "model": args.model,
                "num_layers": args.num_layers, "device": args.device}

    print(f"bench_load: {args.model} x{args.num_layers} layers on {args.device}, sizes {sizes}"
          f"{'' if args.no_dynamic else ' + dynamic'}, backend {args.backend}"
          f"{' ' + args.inductor_config if args.inductor_config != '{}' else ''}, shared cache "
          f"{url}", flush=True)
    results = [run_child(spec("cold", url, options, "compile_and_publish"), env, workdir)]
    keys, nbytes = copy_to_local(url, options, f"file://{workdir}/local")
    print(f"cold compile done; {keys} artifacts, {nbytes / 1e6:.1f} MB copied to local disk",
          flush=True)
    for i in range(args.repeats):
        order = ("local", "shared") if i % 2 == 0 else ("shared", "local")
        for mode in order:
            cache, opts = (url, options) if mode == "shared" else (f"file://{workdir}/local", {})
            results.append(run_child(spec(mode, cache, opts, "error"), env, workdir))
    if server is not None:
        server.stop()
    print_results(results)
    full_depth_keys(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


def print_results(results: list[dict]) -> None:
    cols = ("ready_s", "setup_s", "trace_s", "key_s", "fetch_s", "load_s", "compile_s", "first_call_s")
    print(f"\n{'mode':8}" + "".join(f"{c:>13}" for c in cols)
          + f"{'compiles':>10}{'hits':>6}{'MB':>8}{'process_s':>11}")
    for r in results:
        rep = r["report"]
        vals = [r["ready_s"]] + [rep[c] for c in cols[1:]]
        print(f"{r['mode']:8}" + "".join(f"{v:13.3f}" for v in vals)
              + f"{rep['compiles']:10d}{rep['hits']:6d}{rep['bytes_loaded'] / 1e6:8.2f}"
              f"{r['process_to_ready_s']:11.2f}")

    def best(mode: str) -> dict:
        return min((r for r in results if r["mode"] == mode), key=lambda r: r["ready_s"])

    cold, local, shared = best("cold"), best("local"), best("shared")
    assert shared["report"]["compiles"] == local["report"]["compiles"] == 0
    rep = shared["report"]
    key_ms, lookup_ms = rep["key_ms_per_piece"], rep["lookup_ms_per_key"]
    print(f"\npieces {rep['pieces']}, unique (piece, shape) keys {rep['tasks']}")
    print(f"cold / shared ready   {cold['ready_s'] / shared['ready_s']:8.1f}x   "
          f"(GPU target >= 40x)")
    print(f"shared / local ready  {shared['ready_s'] / local['ready_s']:8.2f}x   "
          f"(target <= 1.2x)")
    after = lambda r: r["ready_s"] - r["report"]["setup_s"]  # noqa: E731
    print(f"  same, after setup   {after(shared) / after(local):8.2f}x   (setup: compiler and "
          f"environment fingerprint, store check: equal work in both)")
    print(f"shared fetch blocked {rep['fetch_s'] * 1e3:.1f} ms, local {local['report']['fetch_s'] * 1e3:.1f} ms; "
          f"manifest keys prefetched while tracing: {rep['manifest_keys']}")
    print(f"key {key_ms:.2f} ms/piece; lookup {lookup_ms:.2f} ms/key ("
          + ("manifest read in the background, overlapped with tracing and slowed by it"
             if rep["manifest_keys"] else "the batched fetch") + ")")


def full_depth_keys(args: argparse.Namespace) -> None:
    """Key + lookup per piece for the preset at its real depth (bench_keys.py): the runs above use
    --num-layers, and few pieces share the fixed cost of canonicalizing the distinct ones."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_keys.py"),
                           "--model", args.model, "--sizes", args.sizes, "--repeats", "3"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    if proc.returncode != 0:
        print(f"full-depth key timing failed: {proc.stderr.strip().splitlines()[-1:]}")
        return
    keys = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.model} at full depth ({keys['pieces']} pieces): key {keys['plan_ms_per_piece']:.2f} "
          f"+ lookup {keys['lookup_ms_per_piece']:.2f} = {keys['total_ms_per_piece']:.2f} ms/piece "
          f"(target <= 5 ms/piece)")


if __name__ == "__main__":
    main()
