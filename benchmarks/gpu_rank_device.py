"""One artifact serves every rank: ranks on other GPUs run artifacts compiled on GPU 0.

Needs a machine with at least 2 GPUs. Self-checking: prints each step, exits 1 on a failure.

  1. compile  (CUDA_VISIBLE_DEVICES=<gpu0>) compiles one TP rank's pieces with Inductor (runtime
              autotune results shipped) and publishes them to a file:// cache
  2. ranks    two processes, rank r with CUDA_VISIBLE_DEVICES=<gpu r> (`rank_device_env`), NCCL
              all-reduce live: each `vcr.load`s from the cache; zero compiles on both, output
              equal to the eager TP run, rank 1 on another physical GPU than the compile
  3. visible  one process seeing both GPUs: a model on cuda:1, then one on cuda:0, each
              `vcr.load`ed with on_miss="error": the artifacts (compiled for index 0) are
              retargeted to index 1 by the loader; zero compiles, output equal to eager on each
              GPU, no kernel autotuned at the first call, and (where nvidia-smi lists processes)
              no CUDA context opened on GPU 0 before the cuda:0 model
  4. reverse  one process seeing both GPUs: a rank on cuda:1 compiles and publishes
              (on_miss="compile_and_publish"; code for index 1), then a model on cuda:0 loads
              those artifacts (retargeted 1 -> 0); outputs equal to eager on both

    python benchmarks/gpu_rank_device.py [--gpus 0,1] [--model llama-tiny] [--num-layers 2]
                                         [--from-step 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (3, 4, 16)  # 4: a static artifact; 3, 16: the dynamic one
TOLERANCE = 2e-2  # max |compiled - eager| / max |eager|: bf16 models round at 2^-8 per op


def relative_diff(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="0,1", help="physical GPUs: first compiles, both serve")
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--sizes", default="4", help="compile sizes (plus dynamic)")
    p.add_argument("--work", help="keep the cache and staging here (default: a temp dir)")
    p.add_argument("--from-step", type=int, default=1, choices=(1, 4),
                   help="4: only step 4 (it builds its own cache)")
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

    return vcr.CompilationConfig(compile_sizes=spec["sizes"], on_miss=on_miss,
                                 cache=vcr.CacheConfig(cache_dir=spec["cache"],
                                                       staging_dir=staging))


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
                diffs[n] = relative_diff(out, eager)
        return {"uuid": gpu_uuid(), "report": compiled.report.to_dict(), "max_rel_diff": diffs,
                "compiles": compiled.counter.num_backend_compilations}
    finally:
        dist.destroy_process_group()


def contexts_on(gpu_uuid_: str) -> bool | None:
    """Whether this process holds a CUDA context on the GPU (None: nvidia-smi cannot tell)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if "," in line]
    if not any(pid == str(os.getpid()) for pid, _ in rows):
        return None  # this process is not listed at all (PID namespace): no answer
    return any(pid == str(os.getpid()) and gpu_uuid_ in uuid for pid, uuid in rows)


def step_visible(spec: dict) -> dict:
    import torch
    from torch._inductor.runtime import triton_heuristics

    import vllm_compile_ray as vcr

    autotuned: list[str] = []  # kernels that benchmark configs at their first call
    original = triton_heuristics.CachingAutotuner.autotune_to_one_config

    def counting(self, *args, **kwargs):
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        from vllm_compile_ray.torch_private.retarget import autotune_key

        filename = getattr(self, "filename", None)
        where = "?"
        if filename and os.path.exists(filename):
            key = autotune_key(open(filename).read())
            found = [d for d in (cache_dir(), os.path.join(cache_dir(), "vcr-cuda1"))
                     if os.path.exists(os.path.join(d, key))]
            where = f"{filename}: result {key} in {found}"
        autotuned.append(f"{getattr(self.fn, '__name__', '?')} ({where})")
        return original(self, *args, **kwargs)

    triton_heuristics.CachingAutotuner.autotune_to_one_config = counting
    from vllm_compile_ray.torch_private import retarget as retarget_mod

    retarget, retarget_s = retarget_mod.retarget, [0.0]

    def timed_retarget(*args, **kwargs):
        start = time.perf_counter()
        try:
            return retarget(*args, **kwargs)
        finally:
            retarget_s[0] += time.perf_counter() - start

    retarget_mod.retarget = timed_retarget
    uuid0 = str(torch.cuda.get_device_properties(0).uuid)
    out: dict = {"devices": {}}
    gpu0_contexts: dict[str, bool | None] = {}  # after each stage of the cuda:1 model
    for device in spec["devices"]:
        rank = int(device.split(":")[1]) % 2
        model = vcr.models.build(spec["model"], tp_size=2, rank=rank,
                                 num_layers=spec["num_layers"], device=device)
        if device == "cuda:1":
            gpu0_contexts["build"] = contexts_on(uuid0)
        compiled = vcr.load(model, config(spec, "error", spec["work"] + "/stage-visible"),
                            rank=rank, world_size=2, model_name=spec["model"], report=False)
        if device == "cuda:1":
            gpu0_contexts["load"] = contexts_on(uuid0)
        vocab = model.config.vocab_size
        diffs, outs_on = {}, set()
        with torch.no_grad():
            for n in SIZES:
                eager = model(*inputs(n, vocab, device))
                got = compiled(*inputs(n, vocab, device))
                outs_on.add(str(got.device))
                diffs[n] = relative_diff(got, eager)
        torch.cuda.synchronize(device)
        out["devices"][device] = {
            "report": compiled.report.to_dict(), "max_rel_diff": diffs,
            "compiles": compiled.counter.num_backend_compilations, "outputs_on": sorted(outs_on),
            "autotuned_at_first_call": list(autotuned), "retarget_s": retarget_s[0],
            "context_on_gpu0": {**gpu0_contexts, "calls": contexts_on(uuid0)}
            if device == "cuda:1" else None}
        autotuned.clear()
        retarget_s[0] = 0.0
    return out


def step_reverse(spec: dict) -> dict:
    """Compile on cuda:1 of a process that sees both GPUs (a rank's on_miss="compile_and_publish"),
    then load those artifacts for a model on cuda:0: the other direction of retargeting."""
    import torch

    import vllm_compile_ray as vcr

    uuid0 = str(torch.cuda.get_device_properties(0).uuid)
    spec = {**spec, "cache": f"file://{spec['work']}/cache-reverse"}
    out: dict = {}
    for device, on_miss in (("cuda:1", "compile_and_publish"), ("cuda:0", "error")):
        rank = int(device.split(":")[1])
        model = vcr.models.build(spec["model"], tp_size=2, rank=rank,
                                 num_layers=spec["num_layers"], device=device)
        compiled = vcr.load(model, config(spec, on_miss, spec["work"] + f"/stage-rev-{rank}"),
                            rank=rank, world_size=2, model_name=spec["model"], report=False)
        vocab = model.config.vocab_size
        with torch.no_grad():
            diffs = {n: relative_diff(compiled(*inputs(n, vocab, device)),
                                      model(*inputs(n, vocab, device))) for n in SIZES}
        rep = compiled.report.to_dict()
        out[device] = {"compiles": compiled.counter.num_backend_compilations, "hits": rep["hits"],
                       "tasks": rep["tasks"], "max_rel_diff": diffs,
                       "context_on_gpu0": contexts_on(uuid0) if device == "cuda:1" else None}
    return out


STEPS = {"compile": step_compile, "rank": step_rank, "visible": step_visible,
         "reverse": step_reverse}


# --------------------------------------------------------------------------------- the driver


def spawn(step: str, spec: dict, visible: str) -> subprocess.Popen:
    # Each process its own Inductor cache: what it finds there came with the artifacts.
    inductor_dir = Path(spec["work"]) / f"inductor-{step}-{spec.get('rank', 0)}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible,
           "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
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
    work = args.work or tempfile.mkdtemp(prefix="vcr-gpu-rank-")
    os.makedirs(work, exist_ok=True)
    spec = {"model": args.model, "num_layers": args.num_layers, "work": work,
            "sizes": [int(s) for s in args.sizes.split(",")], "cache": f"file://{work}/cache"}
    ok = True

    def check(cond: bool, what: str) -> None:
        nonlocal ok
        ok &= bool(cond)
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")

    def step4() -> bool:
        print("4. one process, both GPUs visible: compile on cuda:1, then load on cuda:0",
              flush=True)
        rev = collect(spawn("reverse", spec, ",".join(gpus[:2])), spec, "reverse")
        if rev is None:
            return False
        one, zero = rev["cuda:1"], rev["cuda:0"]
        check(one["compiles"] == one["tasks"] > 0 and one["context_on_gpu0"] is not True,
              f"cuda:1 compiled {one['compiles']} of {one['tasks']} keys; CUDA context on GPU 0: "
              f"{one['context_on_gpu0']}; max diff / max |eager| {one['max_rel_diff']}")
        check(max(one["max_rel_diff"].values()) < TOLERANCE, "cuda:1 output equals eager")
        check(zero["compiles"] == 0 and zero["hits"] == zero["tasks"] == one["tasks"]
              and max(zero["max_rel_diff"].values()) < TOLERANCE,
              f"cuda:0 loaded the cuda:1 artifacts: {zero['compiles']} compiles, "
              f"{zero['hits']} hits, max diff / max |eager| {zero['max_rel_diff']}")
        return True

    if args.from_step == 4:
        if not step4():
            return 1
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1

    from vllm_compile_ray.runtime.load import StartupReport, format_reports, rank_device_env

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
        check(max(res["max_rel_diff"].values()) < TOLERANCE,
              f"rank {r}: output vs eager TP run, max diff / max |eager| {res['max_rel_diff']}")
    check(ranks[0]["report"]["keys_id"] == ranks[1]["report"]["keys_id"] == rep["keys_id"],
          "both ranks computed the compile's keys")
    check(ranks[1]["uuid"] != compiled["uuid"] and ranks[0]["uuid"] != ranks[1]["uuid"],
          f"rank 1 ran on GPU {ranks[1]['uuid']}, not the compiling GPU")

    print("3. one process, both GPUs visible: a model on cuda:1, then one on cuda:0",
          flush=True)
    visible = collect(spawn("visible", {**spec, "devices": ["cuda:1", "cuda:0"]},
                            ",".join(gpus[:2])), spec, "visible")
    # The same-index load to compare with: a fresh process, both GPUs visible, cuda:0 only.
    same = collect(spawn("visible", {**spec, "devices": ["cuda:0"], "rank": 9},
                         ",".join(gpus[:2])), spec, "visible", 9)
    if visible is None or same is None:
        return 1
    for device, res in visible["devices"].items():
        rep_d = res["report"]
        check(res["compiles"] == 0 and rep_d["hits"] == rep_d["tasks"] > 0,
              f"{device}: 0 compiles, {rep_d['hits']} artifacts from the cache "
              f"(load {rep_d['load_s']:.2f} s, first calls {rep_d['first_call_s']:.2f} s)")
        check(res["outputs_on"] == [device] and max(res["max_rel_diff"].values()) < TOLERANCE,
              f"{device}: outputs on {res['outputs_on']}, max diff / max |eager| "
              f"{res['max_rel_diff']}")
        check(not res["autotuned_at_first_call"],
              f"{device}: kernels autotuned at their first call: "
              f"{res['autotuned_at_first_call'] or 'none'}")
    moved, plain = visible["devices"]["cuda:1"]["report"], same["devices"]["cuda:0"]["report"]
    print(f"  load in a fresh process: retargeted to cuda:1 {moved['load_s']:.2f} s, as compiled "
          f"on cuda:0 {plain['load_s']:.2f} s ({moved['load_s'] / plain['load_s']:.2f}x); "
          f"first calls {moved['first_call_s']:.2f} s vs {plain['first_call_s']:.2f} s; rewriting "
          f"the artifacts took {visible['devices']['cuda:1']['retarget_s']:.3f} s of the load")
    gpu0 = visible["devices"]["cuda:1"]["context_on_gpu0"]
    check(True not in gpu0.values(), f"CUDA context on GPU 0 while only the cuda:1 model ran "
          f"(after build, load, calls; None: nvidia-smi cannot tell): {gpu0}")
    if not step4():
        return 1
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
