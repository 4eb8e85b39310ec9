"""`warm`: compile every unique (piece, shape) of a model into the shared cache with Ray.

The driver plans on the meta device (no weights, no GPU), drops what the cache already has,
submits the rest longest-expected-first with a bounded number in flight, and writes the manifest
and the stats snapshot. Bytes go from the compile tasks straight to the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from . import gemm_tuning, intake, manifest
from . import gpu_sharing as gpu_sharing_mode
from . import pool as compile_pool
from .api import PLAN_TOKENS, key_context, model_device, open_store
from .compile_task import Faults, TaskContext, start_worker_remote
from .compiler_interface import make_compiler
from .config import CompilationConfig
from .dispatch import Dispatcher
from .errors import ClusterResourceError, ConfigError, VcrError
from .hf import maybe_prepare
from .inputs import ExampleInputs, example_call
from .intake import ModelSpec
from .plan import CompileTask, Plan, capture, plan_graph
from .sizing import NodeResources, Sizing, fits, size_compiles
from .stats import get_stats_actor
from .store import ArtifactStore
from .warm_summary import WarmSummary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    """The resources of one compile task."""

    gpus: float
    cpus: float
    resources: dict[str, float]

    def needs(self) -> dict[str, float]:
        wanted = {"GPU": self.gpus, "CPU": self.cpus, **self.resources}
        return {k: v for k, v in wanted.items() if v > 0}

    def options(self) -> dict[str, Any]:
        return {"num_gpus": self.gpus, "num_cpus": self.cpus, "resources": dict(self.resources)}


def cluster_capacity(request: _Request, nodes: list[dict[str, Any]] | None = None) -> int:
    """How many compile tasks the alive nodes can run at once; ClusterResourceError (naming the
    missing resource) if no node can run one. Does not wait for an autoscaler to add nodes."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    needs = request.needs()
    have = [n.get("Resources", {}) for n in nodes]
    capacity = sum(min((fits(res.get(k, 0.0), v, k) for k, v in needs.items()), default=64)
                   for res in have)
    if capacity:
        return capacity
    missing = [f"{v:g} {k} (largest node has {max((res.get(k, 0.0) for res in have), default=0):g})"
               for k, v in needs.items() if all(res.get(k, 0.0) < v for res in have)]
    what = ", ".join(missing) or " + ".join(f"{v:g} {k}" for k, v in needs.items()) + " on one node"
    raise ClusterResourceError(
        f"no node of the Ray cluster can run a compile task: it needs {what}; {len(nodes)} alive "
        f"node(s) with {ray.cluster_resources() if nodes else {}} in all. Add GPU nodes, or lower "
        "gpus_per_compile / cpus_per_compile (gpus_per_compile=0 compiles on CPUs).")


def cluster_sizing(request: _Request, tasks: int | None = None,
                   nodes: list[dict[str, Any]] | None = None) -> Sizing:
    """`sizing.size_compiles` over the alive nodes that hold `request`'s other resources (its
    `resources`); ClusterResourceError when none has a GPU."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    usable = [NodeResources.from_ray(n) for n in nodes if all(
        n.get("Resources", {}).get(k, 0.0) >= v for k, v in request.resources.items())]
    sizing = size_compiles(usable, tasks, cpus_per_compile=request.cpus)
    if sizing is None:
        extra = f" and {request.resources}" if request.resources else ""
        raise ClusterResourceError(
            f"no node of the Ray cluster can run a cuda compile task: none of its {len(nodes)} "
            f"alive node(s) has a GPU{extra} (their resources: "
            f"{[n.get('Resources', {}) for n in nodes]}). Add GPU nodes, or compile on CPUs "
            "(device_type='cpu', or gpus_per_compile=0).")
    return sizing


def order_tasks(tasks: list[CompileTask]) -> list[CompileTask]:
    """Longest expected first: pieces with more GEMMs first, each piece's sizes descending and
    its dynamic compile last, then bigger pieces.

    With max-autotune a compile's time is mostly its GEMMs' benchmarks, and the size barely
    matters. Measured on 4xH200, serial loop (session 11), llama-3-8b: the layer piece (4 GEMMs)
    took 14-26 s at every size and 10 s dynamic, the last piece (3) 8-13 s and 8 s, the first
    piece (1) 1-2 s at every size; the order by size alone put each size's first piece before
    its layer piece, and the layer piece at size 1 among the last tasks of the queue."""
    def cost(task: CompileTask) -> tuple[int, int, int]:
        size = 0 if task.shape == "dynamic" else int(task.shape)
        return (-gemm_tuning.gemm_count(task.piece), -size, -len(task.piece.graph.graph.nodes))
    return sorted(tasks, key=cost)


def _connect(address: str | None, runtime_env: dict | None) -> bool:
    """Connect to Ray unless connected; True if this call connected (and must `ray.shutdown()`:
    that stops an in-process instance it started, or only disconnects from a cluster).
    address None: RAY_ADDRESS (set inside `ray job submit`) or else a new in-process Ray."""
    if ray.is_initialized():
        return False
    # This driver submits every worker start-up, then every compile, at once; beyond Ray's default
    # of 10 lease requests in flight per kind of task the rest wait (its log: "Task submission is
    # being throttled"). Measured on a 64-core host, 32 start-ups, one run each: the last ended
    # 12.9 s into the compile phase with the default, 10.4 s with this.
    os.environ.setdefault("RAY_max_pending_lease_requests_per_scheduling_category", "256")
    # Workers' stdout/stderr (Inductor's and Triton's warnings, per compile) stay in Ray's logs
    # and the dashboard: the terminal gets the progress lines and the summary, whose rows carry
    # every task's error.
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    return True


def _draft_plan(model: str | ModelSpec, config: CompilationConfig, tp_size: int,
                num_layers: int | None, device_type: str,
                fingerprint: dict[str, str] | None) -> Plan:
    """Capture on meta, split and key; keyed for `fingerprint`, or for none yet when None (a
    compile node is computing it: `_keyed` keys the plan again once it has come). Its tasks
    are the run's, whatever the fingerprint."""
    spec = intake.build(model, tp_size=tp_size, device="meta", num_layers=num_layers) \
        if isinstance(model, str) else model
    module = maybe_prepare(spec.module)
    args, kwargs = example_call(module, spec.example_inputs, PLAN_TOKENS, model_device(module))
    gm = capture(module, args, kwargs, config.dynamic_dims)
    context = key_context(config, make_compiler(config), device_type, fingerprint or {})
    return plan_graph(gm, config, context, device_type)


def _keyed(draft: Plan, config: CompilationConfig, device_type: str,
           fp_ref: ray.ObjectRef) -> Plan:
    """`draft` keyed for the fingerprint that `fp_ref` (a `start_worker` task) computes."""
    try:
        fingerprint = ray.get(fp_ref)["fingerprint"]
    except ray.exceptions.RayError as exc:
        raise VcrError(f"a compile node could not compute the environment fingerprint for "
                       f"device_type={device_type!r}: {exc}") from exc
    return draft.rekeyed(key_context(config, make_compiler(config), device_type, fingerprint))


def warm(model: str | torch.nn.Module, config: CompilationConfig | None = None, *,
         tp_size: int = 1, num_layers: int | None = None, model_name: str | None = None,
         device_type: str = "cuda", address: str | None = None,
         max_in_flight: int | None = None, gpus_per_compile: float | None = None,
         cpus_per_compile: float = 1.0, resources: dict[str, float] | None = None,
         max_retries: int = 3, compile_retries: int = 1,
         fingerprint: dict[str, str] | None = None, runtime_env: dict | None = None,
         faults: Faults | None = None, prestart: bool | None = None,
         tune_gemms: bool | str = False, pool: bool = False,
         pool_idle_timeout_s: float = compile_pool.DEFAULT_IDLE_TIMEOUT_S,
         gpu_sharing: str = "time-slice",
         progress: Callable[[str], None] | None = print,
         example_inputs: ExampleInputs | None = None) -> WarmSummary:
    """Compile every unique (piece, shape) of `model` at `tp_size` into `config.cache_dir`.

    model: a preset name, a config.json or its directory, an entry point "package.module:function"
    (built on meta; see `intake`) or an nn.Module (named by `model_name`; a transformers model
    works as it is). example_inputs(num_tokens, device) makes a call of an nn.Module (default
    `inputs.default_example_inputs`).
    device_type: the compile target ("cuda", or "cpu" for CPU compiles and fake-GPU tests).
    gpus_per_compile: GPU fraction per task; several compiles share a GPU. None: on cpu 0; on
    cuda sized from the cluster and the plan (`sizing.size_compiles`: one compile per CPU core
    of each GPU node, within its memory, no more than the tasks; measured fastest on one H200
    host), and max_in_flight (None) follows. cpus_per_compile also sets Inductor's compile
    threads in the task.
    max_retries: Ray retries of a task whose worker died; compile_retries: retries of a compile
    that raised. A compile running past `config.max_compile_time` is cancelled ("timed_out").
    address: a Ray cluster; None connects to RAY_ADDRESS or starts Ray in-process (and stops it).
    fingerprint: the target environment fingerprint; None asks a compile node for it.
    faults: test hooks (see `compile_task.Faults`).
    prestart: start the compile workers (imports, compile pool, fingerprint, on CUDA a tiny
    warm-up compile) while the driver plans; None:
    with the inductor backend (eager compiles take milliseconds: there a worker per slot started
    ahead would mostly add start-ups a small run never needs).
    tune_gemms: tune each unique GEMM problem as a task of its own (`gemm_tuning`): False
    (default), "ahead" (or True: before the compiles that use it, timings handed to them) or
    "alongside" (at the same time; a node's compiles wait for its tunes' timings, so one piece's
    GEMMs are benchmarked side by side; give it slots for tunes and compiles together). Both
    measured slower than none on 4×H200 (benchmarks/RESULTS.md).
    pool: compile in the cluster's standing pool of compile workers (`pool`: detached actors,
    one per compile slot, that keep their started process between runs), starting the ones it
    lacks and leaving them up for the next run until pool_idle_timeout_s without work or
    `vcr pool down`. A later run starts compiling without the workers' start-up; the pool holds
    its GPU fractions and CPUs while it is up (sized from the cluster alone, not the tasks, as
    `vcr pool up` sizes it). With Ray started in-process it ends with it.
    gpu_sharing: how the compiles on one GPU share it: "time-slice" (CUDA's default) or "mps"
    (through each node's NVIDIA MPS daemon, started if the node runs none: `gpu_sharing`).
    """
    config = config or CompilationConfig()
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"device_type={device_type!r} is invalid: allowed 'cuda', 'cpu'")
    sized = gpus_per_compile is None and device_type == "cuda"
    if gpus_per_compile is None:
        gpus_per_compile = 0.0  # cuda: sized once connected
    if gpus_per_compile < 0 or cpus_per_compile < 0:
        raise ConfigError(f"gpus_per_compile={gpus_per_compile!r}, cpus_per_compile="
                          f"{cpus_per_compile!r} are invalid: must be >= 0")
    sharing = gpu_sharing_mode.check(gpu_sharing, device_type)
    tune_mode = _tune_mode(tune_gemms)
    if tune_mode and config.backend != "inductor":
        raise ConfigError(f"tune_gemms={tune_gemms!r} needs the inductor backend (GEMM autotuning "
                          f"is Inductor's), got backend={config.backend!r}: drop tune_gemms or use "
                          "backend='inductor'")
    if max_in_flight is not None and max_in_flight < 1:
        raise ConfigError(f"max_in_flight={max_in_flight!r} is invalid: must be >= 1")
    name = model if isinstance(model, str) else (model_name or type(model).__name__)
    if isinstance(model, str):
        intake.check(model)  # an unknown model fails before Ray starts
    else:
        model = ModelSpec(model, example_inputs)
    say = progress or (lambda line: None)
    request = _Request(float(gpus_per_compile), float(cpus_per_compile), dict(resources or {}))
    store = open_store(config)
    store.check_access(write=True)  # a wrong bucket or credentials fail here, not in every task
    owned = _connect(address, runtime_env)
    try:
        if sized:  # from the cluster now (the pool, the first worker), the tasks after capture
            sizing = cluster_sizing(request)
            request = dataclasses.replace(request, gpus=sizing.gpus_per_compile)
            if pool:
                say(sizing.describe())
        capacity = cluster_capacity(request)
        if "://" not in store.url or store.url.startswith("file://"):
            if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
                logger.warning("cache %s is a local path: every node must see the same "
                               "filesystem there (use s3:// or a shared mount)", store.url)
        if prestart is None:
            prestart = config.backend == "inductor"
        workers = min(max_in_flight or capacity, capacity) if prestart or pool else 0
        spec = None
        standing = [] if pool else compile_pool.names()
        if standing:
            logger.warning("%d compile workers of a standing pool hold their resources (%s...): "
                           "this run's tasks get what is left; use pool=True (--pool) to compile "
                           "in them, or stop them (`vcr pool down`)", len(standing), standing[0])
        if pool:
            if owned and not address and not os.environ.get("RAY_ADDRESS"):
                logger.warning("pool=True with Ray started in this process: the pool ends with "
                               "this call (give address= to keep it on a cluster)")
            spec = pool_spec(config, device_type, request.gpus, request.cpus, request.resources,
                             runtime_env, sharing)
        resize = sized and not pool
        return _warm(model, name, config, store, tp_size, num_layers, device_type, request,
                     max_in_flight if resize else max_in_flight or 2 * capacity, max_retries,
                     compile_retries, fingerprint, faults or Faults(), say, workers, tune_mode,
                     sharing, spec, pool_idle_timeout_s, resize)
    finally:
        if owned:
            if sharing == "mps":
                gpu_sharing_mode.stop_all()
            ray.shutdown()


def pool_spec(config: CompilationConfig, device_type: str = "cuda",
              gpus_per_compile: float | None = None, cpus_per_compile: float = 1.0,
              resources: dict[str, float] | None = None, runtime_env: dict | None = None,
              gpu_sharing: str = "time-slice") -> compile_pool.PoolSpec:
    """The spec of the pool workers that `warm(pool=True)` with these arguments compiles in, to
    start them ahead with `pool.up`. gpus_per_compile None on cuda: sized from the connected
    cluster, as `warm` sizes a pool."""
    gpu_sharing_mode.check(gpu_sharing, device_type)  # before asking the cluster
    if gpus_per_compile is None:
        gpus_per_compile = 0.0 if device_type != "cuda" else cluster_sizing(
            _Request(0.0, float(cpus_per_compile), dict(resources or {}))).gpus_per_compile
    return compile_pool.PoolSpec(device_type, config.backend, float(gpus_per_compile),
                                 float(cpus_per_compile), dict(resources or {}),
                                 dict(runtime_env or {}), gpu_sharing)


def _warm(model: str | ModelSpec, name: str, config: CompilationConfig, store: ArtifactStore,
          tp_size: int, num_layers: int | None, device_type: str, request: _Request,
          max_in_flight: int | None, max_retries: int, compile_retries: int,
          fingerprint: dict[str, str] | None, faults: Faults,
          say: Callable[[str], None], prestart: int, tune_mode: str | None, sharing: str,
          pool_spec: compile_pool.PoolSpec | None = None,
          pool_idle_timeout_s: float = compile_pool.DEFAULT_IDLE_TIMEOUT_S,
          resize: bool = False) -> WarmSummary:
    """resize: size the slots again with the plan's task count (`cluster_sizing`) before
    starting the workers; max_in_flight None then follows the slots."""
    run_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    # Created now, its process starts while the driver plans: the first compile tasks would
    # otherwise wait seconds for it (measured: 8 s on a busy 16-core GPU host).
    stats = get_stats_actor()
    # Worker start-ups, all at once, so Ray starts that many workers while the driver plans; the
    # first one's fingerprint keys the plan. They hold the compile slots, so each compile task
    # waits for a started worker to go idle and runs there (workers are reused: max_calls=0).
    # The first one reports as soon as it has the fingerprint, without the warm-up compile.
    # With a pool, its workers (started now, or already up) play that part. When resizing, only
    # that first one starts now; the rest once capture has counted the tasks (a worker keeps
    # the GPU of its start-up, so the start-ups must already ask for the final fraction).
    starts_at = time.time()
    members = compile_pool.up(pool_spec, prestart, pool_idle_timeout_s, faults.startup_sleep_s) \
        if pool_spec else None

    def start(count: int, first: bool) -> list[ray.ObjectRef]:
        return [start_worker_remote.options(name="vcr_start_worker", **request.options()).remote(
            config.backend, request.cpus, device_type,
            warm=not first or i > 0 or fingerprint is not None,
            delay_s=faults.startup_sleep_s, sharing=sharing) for i in range(count)]

    needed = 1 if fingerprint is None else 0
    starts = [] if members else start(needed if resize else max(prestart, needed), first=True)
    draft = _draft_plan(model, config, tp_size, num_layers, device_type, fingerprint)
    if resize:
        sizing = cluster_sizing(request, tasks=len(draft.tasks()))
        request = dataclasses.replace(request, gpus=sizing.gpus_per_compile)
        say(sizing.describe())
        max_in_flight = max_in_flight or sizing.slots
        wanted = min(max_in_flight, sizing.slots) if prestart else 0
        starts += start(max(0, wanted - len(starts)), first=not starts)
    start_refs = [ref for _, ref in members] if members else starts
    plan = draft if fingerprint is not None else _keyed(draft, config, device_type, start_refs[0])
    fp_id = plan.key_context.fingerprint_id
    tasks = plan.tasks()
    present = store.contains_many([t.key for t in tasks])
    todo = order_tasks([t for t in tasks if not present[t.key]])
    tunes, needs = gemm_tuning.tune_tasks(todo, device_type) if tune_mode else ([], {})
    plan_s = time.perf_counter() - t0
    summary = plan.summary()
    say(f"planned {name} tp={tp_size}: {summary['unique_pieces']} unique pieces x "
        f"{len(plan.shapes)} shapes = {len(tasks)} tasks; {len(tasks) - len(todo)} cached, "
        f"{len(todo)} to compile (fingerprint {fp_id}, run {run_id}, {plan_s:.1f}s)")
    if tunes:
        say(f"tuning {len(tunes)} unique GEMM problems x shapes "
            + ("first" if tune_mode == "ahead" else "alongside the compiles"))

    ctx = TaskContext(run_id, config, store, device_type, fp_id, compile_retries, faults,
                      sharing)
    rows: list[dict[str, Any]] = [{"name": t.name, "key": t.key, "code_id": t.code_id,
                                   "shape": str(t.shape), "status": "cached", "seconds": 0.0}
                                  for t in tasks if present[t.key]]
    start, phase_started_at = time.perf_counter(), time.time()
    ready = len(ray.wait(start_refs, num_returns=len(start_refs), timeout=0)[0]) \
        if start_refs else 0
    dispatcher = Dispatcher(ctx, stats, request.options(), max_retries, say)
    rows += dispatcher.run(todo, max_in_flight, tunes, needs, alongside=tune_mode == "alongside",
                           starts=starts, pool=members)
    tune_rows = dispatcher.tune_rows
    wall_s = time.perf_counter() - start if todo else 0.0
    prestarted = _started(start_refs, cancel=not members)

    snap = ray.get(stats.snapshot.remote(run_id))
    manifest_rows = _manifest_rows(store, plan, name, tp_size, rows)
    manifest.update_manifest(store, name, fp_id, manifest_rows)
    by_status = {s: [r for r in rows if r["status"] == s]
                 for s in ("compiled", "cached", "failed", "timed_out")}
    snap["summary"] = {"total": len(tasks), **{s: len(r) for s, r in by_status.items()}}
    store.put_file(manifest.stats_path(name, fp_id), json.dumps(snap, indent=1, default=str).encode())
    result = WarmSummary(
        model=name, tp_size=tp_size, fingerprint_id=fp_id, total=len(tasks),
        compiled=len(by_status["compiled"]), cached=len(by_status["cached"]),
        failed=len(by_status["failed"]), timed_out=len(by_status["timed_out"]),
        wall_s=round(wall_s, 3), plan_s=round(plan_s, 3),
        task_s_sum=round(sum(r.get("seconds", 0.0) for r in by_status["compiled"]), 3),
        run_id=run_id, unique_pieces=summary["unique_pieces"], shapes=list(plan.shapes),
        max_concurrent=snap["max_concurrent"], prestarted=len(prestarted),
        prestart_s=max((p["seconds"] for p in prestarted.values()), default=0.0),
        prestart_ready=ready,
        prestart_last_s=round(max((p["finished_at"] for p in prestarted.values()),
                                  default=phase_started_at) - phase_started_at, 3),
        prestart_rows=[{**{k: v for k, v in p.items() if k != "fingerprint"},
                        "submitted_at": starts_at} for p in prestarted.values()],
        ran_in_prestarted=sum(1 for r in by_status["compiled"] if r.get("pid") in prestarted),
        pool_reused=sum(1 for p in prestarted.values() if p.get("reused")),
        total_s=round(time.perf_counter() - t0, 3),
        manifest_path=f"{store.url}/{manifest.manifest_path(name, fp_id)}",
        stats_path=f"{store.url}/{manifest.stats_path(name, fp_id)}",
        errors={r["name"]: r.get("error", "") for r in by_status["failed"] + by_status["timed_out"]},
        rows=sorted(rows, key=lambda r: r["name"]),
        tuned=sum(1 for r in tune_rows if r["status"] == "tuned"),
        tune_failed=sum(1 for r in tune_rows if r["status"] != "tuned"),
        tune_s_sum=round(sum(r.get("seconds", 0.0) for r in tune_rows), 3),
        gemm_benchmarked=sum(r.get("gemm_benchmarked", 0) for r in by_status["compiled"]),
        tune_rows=sorted(tune_rows, key=lambda r: r["name"]), phase_started_at=phase_started_at)
    say(result.format())
    return result


def _tune_mode(tune_gemms: bool | str) -> str | None:
    """None (no GEMM tuning), "ahead" or "alongside" from `warm(tune_gemms=...)`."""
    modes = {False: None, "off": None, True: "ahead", "ahead": "ahead", "alongside": "alongside"}
    try:
        return modes[tune_gemms]
    except (KeyError, TypeError):
        raise ConfigError(f"tune_gemms={tune_gemms!r} is invalid: allowed False/'off', "
                          "True/'ahead', 'alongside'") from None


def _started(refs: list[ray.ObjectRef], cancel: bool = True) -> dict[int, dict[str, Any]]:
    """Pid -> `start_worker`'s result, of the workers whose start-up finished; one still running
    is cancelled with its worker unless `cancel` is False (a pool worker goes on starting for the
    next run); a failed one is logged: its cause shows again in the compiles.

    Not force=False: that raises KeyboardInterrupt wherever the start-up is, often mid-import,
    and the worker, which Ray reuses, keeps half-initialized modules (seen in CI: every later
    task in it failed with "partially initialized module 'setuptools' has no attribute 'dist'").
    A worker whose start-up never finished has served nothing; killing it loses nothing."""
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
    for ref in pending if cancel else ():
        ray.cancel(ref, force=True)
    started = {}
    for ref in done:
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as exc:
            logger.warning("a compile worker's start-up failed: %s", exc)
            continue
        started[out["pid"]] = out
    return started


def _manifest_rows(store: ArtifactStore, plan: Plan, model: str, tp_size: int,
                   rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for what this run compiled, plus cached artifacts the manifest does not list yet
    (their metadata is fetched: a one-time repair for artifacts published by other paths)."""
    ctx = plan.key_context
    listed = set(manifest.read_manifest(store, model, ctx.fingerprint_id).column("key").to_pylist())
    common = {"model": model, "tp_size": tp_size, "fingerprint": ctx.fingerprint,
              "fingerprint_id": ctx.fingerprint_id}
    out = [manifest.make_row(key=r["key"], piece=r["code_id"], shape=r["shape"], bytes=r["bytes"],
                             sha256=r["sha256"], compile_seconds=r["seconds"],
                             node=r.get("node_ip", ""), torch=r.get("torch", torch.__version__),
                             **common)
           for r in rows if r["status"] == "compiled"]
    unlisted = [r for r in rows if r["status"] == "cached" and r["key"] not in listed]
    if unlisted:
        found = store.fetch_many([r["key"] for r in unlisted])
        for r in unlisted:
            art = found.get(r["key"])
            if art is None:
                continue
            out.append(manifest.make_row(
                key=r["key"], piece=r["code_id"], shape=r["shape"], bytes=len(art.payload),
                sha256=hashlib.sha256(art.payload).hexdigest(),
                compile_seconds=float(art.meta.get("compile_seconds", 0.0)), node="",
                torch=str(art.meta.get("torch", "")), **common))
    return out
