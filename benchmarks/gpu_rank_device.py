"""One artifact serves every rank: a rank on GPU 1 runs artifacts compiled on GPU 0.

Needs a machine with at least 2 GPUs. Self-checking: prints each step, exits 1 on a failure.

  1. compile  (CUDA_VISIBLE_DEVICES=<gpu0>) compiles one TP rank's pieces with Inductor and
              publishes them to a file:// cache
  2. ranks    two processes, rank r with CUDA_VISIBLE_DEVICES=<gpu r> (`rank_device_env`), NCCL
              all-reduce live: each `vcr.load`s from the cache; zero compiles on both, output
              equal to the eager TP run, rank 1 on another physical GPU than the compile
  3. guard    one process seeing both GPUs with the model on cuda:1: `load` refuses it
  4. why      same process, the guard bypassed: an artifact compiled on cuda:0 run directly on
              cuda:1 tensors (informational: shows what the guard prevents; never fails the run)

    python benchmarks/gpu_rank_device.py [--gpus 0,1] [--model llama-tiny] [--num-layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (3, 4, 16)  # 4: a static artifact; 3, 16: the dynamic one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="0,1", help="physical GPUs: first compiles, both serve")
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--sizes", default="4", help="compile sizes (plus dynamic)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def inputs(n: int, vocab: int, device: str):
    import torch

    g = torch.Generator().manual_seed(n)
    return (torch.randint(0, vocab, (n,), generator=g).to(device),
            torch.arange(n, device=device))


def gpu_uuid() -> str:
    import torch

    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def config(spec: dict, on_miss: str, staging: str):
    import vllm_compile_ray as vcr

    return vcr.CompilationConfig(compile_sizes=spec["sizes"], cache_dir=spec["cache"],
                                 staging_dir=staging, on_miss=on_miss)


# ---------------------------------------------------------------------------------- the steps


def step_compile(spec: dict) -> dict:
    import vllm_compile_ray as vcr

    model = vcr.models.build(spec["model"], tp_size=2, rank=0, num_layers=spec["num_layers"],
                             device="cuda:0")
    compiled = vcr.load(model, config(spec, "compile_and_publish", spec["work"] + "/stage-c"),
                        rank=0, world_size=2, model_name=spec["model"], report=False)
    return {"uuid": gpu_uuid(), "report": compiled.report.to_dict()}


def step_rank(spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    import vllm_compile_ray as vcr

    rank = spec["rank"]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{spec['work']}/pg", rank=rank,
                            world_size=2)
    try:
        model = vcr.models.build(spec["model"], tp_size=2, rank=rank,
                                 num_layers=spec["num_layers"], device="cuda:0")
        compiled = vcr.load(model, config(spec, "error", spec["work"] + "/stage-node"),
                            rank=rank, world_size=2, model_name=spec["model"], report=False)
        vocab = model.config.vocab_size
        diffs = {}
        with torch.no_grad():
            for n in SIZES:
                eager = model(*inputs(n, vocab, "cuda:0"))
                out = compiled(*inputs(n, vocab, "cuda:0"))
                diffs[n] = (out - eager).abs().max().item()
        return {"uuid": gpu_uuid(), "report": compiled.report.to_dict(), "max_abs_diff": diffs,
                "compiles": compiled.counter.num_backend_compilations}
    finally:
        dist.destroy_process_group()


def step_guard(spec: dict) -> dict:
    import torch

    import vllm_compile_ray as vcr
    from vllm_compile_ray import inductor
    from vllm_compile_ray.api import example_args
    from vllm_compile_ray.store import ArtifactStore

    model = vcr.models.build(spec["model"], tp_size=2, rank=1, num_layers=spec["num_layers"],
                             device="cuda:1")
    cfg = config(spec, "error", spec["work"] + "/stage-guard")
    out: dict = {}
    try:
        vcr.load(model, cfg, rank=1, world_size=2, model_name=spec["model"], report=False)
        out["guard"] = "load() accepted a model on cuda:1"
    except vcr.ConfigError as exc:
        out["guard"] = "refused"
        out["guard_message"] = str(exc)

    # What the guard prevents: run one compiled piece (static size 4) on cuda:1 tensors.
    plan = vcr.plan_model(model, cfg, device_type="cuda", args=example_args(8, "cuda:1"))
    task = next(t for t in plan.tasks() if t.shape == spec["sizes"][0])
    artifact = ArtifactStore(cfg.cache_dir, staging_dir=cfg.staging_dir).fetch(task.key)
    args = inductor.example_tensors(task.piece.input_specs, task.shape, "cuda:1")
    g = torch.Generator(device="cuda:1").manual_seed(0)
    args = [a.normal_(generator=g) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for a in args]
    try:
        fn = inductor.load_artifact(artifact.payload)
        got = fn(*args)
        torch.cuda.synchronize(1)
        want = task.piece.graph(*args)
        got = got if isinstance(got, (list, tuple)) else [got]
        diff = max((a - b).abs().max().item() for a, b in zip(got, want))
        out["unguarded"] = f"ran; max abs diff vs eager {diff:.3g}"
    except Exception as exc:  # noqa: BLE001 (the observation is the point)
        out["unguarded"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return out


STEPS = {"compile": step_compile, "rank": step_rank, "guard": step_guard}


# --------------------------------------------------------------------------------- the driver


def spawn(step: str, spec: dict, visible: str) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = Path(spec["work"]) / f"{step}-{spec.get('rank', 0)}.json"
    spec = {**spec, "out": str(out)}
    return subprocess.Popen([sys.executable, __file__, "--step", step, "--spec",
                             json.dumps(spec)], env=env)


def collect(proc: subprocess.Popen, spec: dict, step: str, rank: int = 0) -> dict | None:
    code = proc.wait(timeout=1800)
    out = Path(spec["work"]) / f"{step}-{rank}.json"
    if code != 0 or not out.exists():
        print(f"FAIL {step}[{rank}]: exit {code}")
        return None
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        spec = json.loads(args.spec)
        try:
            result = STEPS[args.step](spec)
        except Exception:
            traceback.print_exc()
            return 1
        Path(spec["out"]).write_text(json.dumps(result))
        return 0

    sys.path.insert(0, str(ROOT))
    gpus = [g.strip() for g in args.gpus.split(",")]
    if len(gpus) < 2:
        print("needs two GPUs: --gpus A,B")
        return 1
    work = tempfile.mkdtemp(prefix="vcr-gpu-rank-")
    spec = {"model": args.model, "num_layers": args.num_layers, "work": work,
            "sizes": [int(s) for s in args.sizes.split(",")], "cache": f"file://{work}/cache"}
    ok = True

    def check(cond: bool, what: str) -> None:
        nonlocal ok
        ok &= bool(cond)
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")

    from vllm_compile_ray.load import StartupReport, format_reports, rank_device_env

    print(f"1. compile on physical GPU {gpus[0]} (CUDA_VISIBLE_DEVICES={gpus[0]})", flush=True)
    compiled = collect(spawn("compile", spec, gpus[0]), spec, "compile")
    if compiled is None:
        return 1
    rep = compiled["report"]
    check(rep["compiles"] == rep["tasks"] > 0, f"compiled {rep['compiles']} of {rep['tasks']} "
          f"(piece, shape) keys on GPU {compiled['uuid']}")

    print(f"2. two TP ranks over NCCL on physical GPUs {gpus[0]} and {gpus[1]}, each its cuda:0",
          flush=True)
    procs = [spawn("rank", {**spec, "rank": r}, rank_device_env(r, args.gpus)[
        "CUDA_VISIBLE_DEVICES"]) for r in range(2)]
    ranks = [collect(p, spec, "rank", r) for r, p in enumerate(procs)]
    if None in ranks:
        return 1
    print(format_reports([StartupReport.from_dict(r["report"]) for r in ranks]))
    for r, res in enumerate(ranks):
        check(res["compiles"] == 0 and res["report"]["hits"] == res["report"]["tasks"],
              f"rank {r}: 0 compiles, {res['report']['hits']} artifacts from the cache")
        check(max(res["max_abs_diff"].values()) < 1e-3,
              f"rank {r}: output vs eager TP run, max abs diff {res['max_abs_diff']}")
    check(ranks[0]["report"]["keys_id"] == ranks[1]["report"]["keys_id"] == rep["keys_id"],
          "both ranks computed the compile's keys")
    check(ranks[1]["uuid"] != compiled["uuid"] and ranks[0]["uuid"] != ranks[1]["uuid"],
          f"rank 1 ran on GPU {ranks[1]['uuid']}, not the compiling GPU")

    print("3. guard: both GPUs visible, model on cuda:1", flush=True)
    guard = collect(spawn("guard", spec, ",".join(gpus[:2])), spec, "guard")
    if guard is None:
        return 1
    check(guard["guard"] == "refused", f"load() {guard['guard']}: "
          f"{guard.get('guard_message', '')[:160]}")
    print(f"4. without the guard, an artifact compiled for cuda:0 run on cuda:1 tensors: "
          f"{guard['unguarded']}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
