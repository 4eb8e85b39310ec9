"""`warm`: compile every unique (piece, shape) of a model into the shared cache with Ray.

The driver plans on the meta device (no weights, no GPU; a CPU target on CPU tensors it never
writes: `intake.build_for_plan`), drops what the cache already has,
submits the rest longest-expected-first with a bounded number in flight, and writes the manifest
and the stats snapshot. Bytes go from the compile tasks straight to the store.

Its steps, in order: `_checked` (the arguments), `_on_cluster` (sized from the connected
cluster: `warm_cluster`), `_plan` (`warm_plan`; worker start-ups meanwhile), `_dispatch`
(`dispatch.Dispatcher`) and `warm_record.record_run` (manifest, stats, summary).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import ray
import torch

from ..cache.store import ArtifactStore
from ..config import CompilationConfig
from ..experimental import gpu_sharing as gpu_sharing_mode
from ..planning import intake
from ..planning.inputs import ExampleInputs
from ..planning.intake import ModelSpec
from ..runtime.api import open_store
from .options import ComputeOptions, RetryOptions, from_keywords
from . import pool as compile_pool
from . import trace_task
from .compile_task import Faults, TaskContext, start_worker_remote
from .dispatch import Dispatcher
from .stats import get_stats_actor
from .warm_cluster import TaskRequest as _Request
from .warm_cluster import cluster_capacity, cluster_sizing, pool_spec  # noqa: F401 (re-exported)
from .warm_cluster import connect as _connect
from .warm_plan import draft_plan, keyed, order_tasks
from .warm_record import Dispatched, Planned, record_run, started_workers
from .warm_summary import WarmSummary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Run:
    """One warm run's settings, checked: `warm`'s arguments as its steps use them."""

    model: str | ModelSpec
    name: str
    config: CompilationConfig
    store: ArtifactStore
    tp_size: int
    num_layers: int | None
    device_type: str
    max_retries: int
    compile_retries: int
    fingerprint: dict[str, str] | None
    faults: Faults
    say: Callable[[str], None]
    sharing: str
    pool_idle_timeout_s: float
    compute: ComputeOptions


def warm(model: str | torch.nn.Module, config: CompilationConfig | None = None, *,
         tp_size: int = 1, num_layers: int | None = None, model_name: str | None = None,
         example_inputs: ExampleInputs | None = None, compute: ComputeOptions | None = None,
         retry: RetryOptions | None = None, progress: Callable[[str], None] | None = print,
         fingerprint: dict[str, str] | None = None, faults: Faults | None = None,
         **deprecated: Any) -> WarmSummary:
    """Compile every unique (piece, shape) of `model` at `tp_size` into `config.cache`.

    model: a preset name, a config.json or its directory, an entry point "package.module:function"
    (built on meta; see `intake`) or an nn.Module (named by `model_name`; a transformers model
    works as it is). example_inputs(num_tokens, device) makes a call of an nn.Module (default
    `inputs.default_example_inputs`).
    compute: what the compiles run on (`ComputeOptions`: device, GPU and CPU per compile, the
    Ray cluster, the standing pool); by default CUDA compiles sized from the cluster (3 per 4
    CPU cores of each GPU node, within its memory and the task count: measured fastest on one
    H200 host). retry: `RetryOptions`. progress: gets each progress line (None: quiet).
    fingerprint: the target environment fingerprint; None asks a compile node for it.
    faults: test hooks (see `compile_task.Faults`).
    The keyword arguments of earlier releases (device_type=, max_in_flight=, gpus_per_compile=,
    ..., max_retries=, compile_retries=) still work for this release, with a DeprecationWarning.
    """
    compute, retry = from_keywords(compute, retry, deprecated)
    config = config or CompilationConfig()
    sized = compute.gpus_per_compile is None and compute.device_type == "cuda"
    request = _Request(compute.gpus_per_compile or 0.0, compute.cpus_per_compile,
                       dict(compute.resources))  # gpus 0 when None: on cuda sized once connected
    name = model if isinstance(model, str) else (model_name or type(model).__name__)
    if isinstance(model, str):
        intake.check(model, tp_size)  # an unknown model fails before Ray starts
    else:
        model = ModelSpec(model, example_inputs)
    store = open_store(config)
    store.check_access(write=True)  # a wrong bucket or credentials fail here, not in every task
    run = _Run(model, name, config, store, tp_size, num_layers, compute.device_type,
               retry.max_retries, retry.compile_retries, fingerprint, faults or Faults(),
               progress or (lambda line: None), compute.gpu_sharing, compute.pool_idle_timeout_s,
               compute)
    runtime_env = dict(compute.runtime_env) if compute.runtime_env is not None else None
    owned = _connect(compute.address, runtime_env)
    try:
        ends_here = owned and not compute.address and not os.environ.get("RAY_ADDRESS")
        return _on_cluster(run, request, sized, compute.max_in_flight, compute.prestart,
                           compute.pool, runtime_env, ends_here)
    finally:
        if owned:
            if compute.gpu_sharing == "mps":
                gpu_sharing_mode.stop_all()
            ray.shutdown()


def _on_cluster(run: _Run, request: _Request, sized: bool, max_in_flight: int | None,
                prestart: bool | None, pool: bool, runtime_env: dict | None,
                ends_here: bool) -> WarmSummary:
    """Size the compile slots from the connected cluster and warn about what holds it, then
    `_warm`. ends_here: Ray was started in this process (a pool ends with it)."""
    if sized:  # from the cluster now (the pool, the first worker), the tasks after capture
        sizing = cluster_sizing(request)
        request = dataclasses.replace(request, gpus=sizing.gpus_per_compile)
        if pool:
            run.say(sizing.describe())
    capacity = cluster_capacity(request)
    if "://" not in run.store.url or run.store.url.startswith("file://"):
        if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            logger.warning("cache %s is a local path: every node must see the same "
                           "filesystem there (use s3:// or a shared mount)", run.store.url)
    if prestart is None:
        prestart = run.config.backend == "inductor"
    workers = min(max_in_flight or capacity, capacity) if prestart or pool else 0
    spec = None
    standing = [] if pool else compile_pool.names()
    if standing:
        logger.warning("%d compile workers of a standing pool hold their resources (%s...): "
                       "this run's tasks get what is left; use pool=True (--pool) to compile "
                       "in them, or stop them (`vcr pool down`)", len(standing), standing[0])
    if pool:
        if ends_here:
            logger.warning("pool=True with Ray started in this process: the pool ends with "
                           "this call (give address= to keep it on a cluster)")
        spec = pool_spec(run.config, run.compute.replace(gpus_per_compile=request.gpus,
                                                         runtime_env=runtime_env))
    resize = sized and not pool
    return _warm(run, request, max_in_flight if resize else max_in_flight or 2 * capacity,
                 workers, spec, resize)


def _warm(run: _Run, request: _Request, max_in_flight: int | None, prestart: int,
          spec: compile_pool.PoolSpec | None = None, resize: bool = False) -> WarmSummary:
    """Plan, compile and record. prestart: compile workers to start ahead (in the pool of
    `spec` when given). resize: size the slots again with the plan's task count
    (`cluster_sizing`) before starting the workers; max_in_flight None then follows the slots."""
    run_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    # Created now, its process starts while the driver plans: the first compile tasks would
    # otherwise wait seconds for it (measured: 8 s on a busy 16-core GPU host).
    stats = get_stats_actor()
    starts_at = time.time()
    members = compile_pool.up(spec, prestart, run.pool_idle_timeout_s,
                              run.faults.startup_sleep_s) if spec else None
    planned = _plan(run, request, max_in_flight, prestart, members, resize, run_id, t0)
    traced, tracer = _trace(run, request, members, planned)  # while the compiles run
    done = _dispatch(run, planned, stats, members, run_id)
    wait_s = 0.0 if done.stranded else trace_task.WAIT_S  # its worker is as stuck as the rest
    run.say(f"traced model for the ranks: {trace_task.outcome(traced, wait_s, tracer)}")
    snap = ray.get(stats.snapshot.remote(run_id))
    result = record_run(run.store, run.name, run.tp_size, run_id, planned, done, snap, starts_at,
                        t0)
    run.say(result.format())
    return result


def _trace(run: _Run, request: _Request, members: list | None, planned: Planned
           ) -> tuple[ray.ObjectRef | str, ray.actor.ActorHandle | None]:
    """The task that traces the model for its ranks (`trace_task`), or why there is none; and
    the pool worker running it. With a pool, whose workers may hold every compile slot, its
    last worker (the one the compiles reach last) runs it."""
    if not isinstance(run.model, str):
        return "off: the model is an nn.Module (its ranks trace)", None
    args = (run.model, run.config, run.store, run.tp_size, run.num_layers, run.device_type,
            frozenset(t.key for t in planned.tasks))
    if members:
        worker = members[-1][0]
        return worker.trace.options(name="vcr_trace_model").remote(*args), worker
    return trace_task.publish_traced_remote.options(
        name="vcr_trace_model", **request.options()).remote(*args), None


def _start_workers(run: _Run, request: _Request, count: int, first: bool) -> list[ray.ObjectRef]:
    """`count` compile worker start-ups; the first of the `first` batch reports as soon as it
    has the fingerprint (no warm-up compile) when the run has none yet."""
    return [start_worker_remote.options(name="vcr_start_worker", **request.options()).remote(
        run.config.backend, request.cpus, run.device_type,
        warm=not first or i > 0 or run.fingerprint is not None,
        delay_s=run.faults.startup_sleep_s, sharing=run.sharing) for i in range(count)]


def _plan(run: _Run, request: _Request, max_in_flight: int | None, prestart: int,
          members: list | None, resize: bool, run_id: str, t0: float) -> Planned:
    """Start the workers and plan meanwhile; what is left to compile, in order."""
    # Worker start-ups, all at once, so Ray starts that many workers while the driver plans; the
    # first one's fingerprint keys the plan. They hold the compile slots, so each compile task
    # waits for a started worker to go idle and runs there (workers are reused: max_calls=0).
    # The first one reports as soon as it has the fingerprint, without the warm-up compile.
    # With a pool, its workers (started now, or already up) play that part. When resizing, only
    # that first one starts now; the rest once capture has counted the tasks (a worker keeps
    # the GPU of its start-up, so the start-ups must already ask for the final fraction).
    needed = 1 if run.fingerprint is None else 0
    starts = [] if members else _start_workers(
        run, request, needed if resize else max(prestart, needed), first=True)
    draft = draft_plan(run.model, run.config, run.tp_size, run.num_layers, run.device_type,
                       run.fingerprint)
    if resize:
        sizing = cluster_sizing(request, tasks=len(draft.tasks()))
        request = dataclasses.replace(request, gpus=sizing.gpus_per_compile)
        run.say(sizing.describe())
        max_in_flight = max_in_flight or sizing.slots
        wanted = min(max_in_flight, sizing.slots) if prestart else 0
        starts += _start_workers(run, request, max(0, wanted - len(starts)), first=not starts)
    start_refs = [ref for _, ref in members] if members else starts
    plan = draft if run.fingerprint is not None else keyed(draft, run.config, run.device_type,
                                                           start_refs[0])
    tasks = plan.tasks()
    present = run.store.contains_many([t.key for t in tasks])
    todo = order_tasks([t for t in tasks if not present[t.key]])
    plan_s = time.perf_counter() - t0
    summary = plan.summary()
    run.say(f"planned {run.name} tp={run.tp_size}: {summary['unique_pieces']} unique pieces x "
            f"{len(plan.shapes)} shapes = {len(tasks)} tasks; {len(tasks) - len(todo)} cached, "
            f"{len(todo)} to compile (fingerprint {plan.key_context.fingerprint_id}, run "
            f"{run_id}, {plan_s:.1f}s)")
    return Planned(plan, summary, tasks, present, todo, plan_s, request,
                   max_in_flight, starts, start_refs)


def _dispatch(run: _Run, planned: Planned, stats: ray.actor.ActorHandle, members: list | None,
              run_id: str) -> Dispatched:
    """Compile (and tune) what is left, a bounded number in flight; every task's row."""
    ctx = TaskContext(run_id, run.config, run.store, run.device_type,
                      planned.plan.key_context.fingerprint_id, run.compile_retries, run.faults,
                      run.sharing)
    rows = [{"name": t.name, "key": t.key, "code_id": t.code_id, "shape": str(t.shape),
             "status": "cached", "seconds": 0.0} for t in planned.tasks if planned.present[t.key]]
    start, phase_started_at = time.perf_counter(), time.time()
    refs = planned.start_refs
    ready = len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0
    dispatcher = Dispatcher(ctx, stats, planned.request.options(), run.max_retries, run.say)
    rows += dispatcher.run(planned.todo, planned.max_in_flight, starts=planned.starts,
                           pool=members)
    wall_s = time.perf_counter() - start if planned.todo else 0.0
    prestarted = started_workers(refs, cancel=not members)
    return Dispatched(rows, wall_s, phase_started_at, ready, prestarted, dispatcher.stranded)
