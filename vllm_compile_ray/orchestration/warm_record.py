"""What a warm run leaves behind: its manifest rows (and the ones the manifest lacked), its stats
snapshot and its WarmSummary, made from the results of its steps (`Planned`, `Dispatched`)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from ..cache import manifest
from ..cache.store import ArtifactStore
from ..planning.plan import CompileTask, Plan
from .warm_cluster import TaskRequest
from .warm_summary import WarmSummary

logger = logging.getLogger(__name__)

_STATUSES = ("compiled", "cached", "failed", "timed_out")


@dataclass(frozen=True)
class Planned:
    """warm's planning step: the keyed plan, what is left to compile, the compile slots as
    sized for it, and the worker start-ups in flight."""

    plan: Plan
    summary: dict[str, Any]  # plan.summary()
    tasks: list[CompileTask]
    present: dict[str, bool]  # key -> in the store already
    todo: list[CompileTask]  # longest expected first
    plan_s: float
    request: TaskRequest
    max_in_flight: int | None
    starts: list[ray.ObjectRef]  # start_worker tasks this run submitted
    start_refs: list[ray.ObjectRef]  # those, or the pool members' start-ups


@dataclass(frozen=True)
class Dispatched:
    """warm's compile step: every task's row and the workers started ahead."""

    rows: list[dict[str, Any]]
    wall_s: float
    phase_started_at: float  # time.time() when the compile phase began
    ready: int  # workers started by then
    prestarted: dict[int, dict[str, Any]]  # pid -> start_worker's result
    stranded: bool = False  # no worker of the pool was left for some tasks


def started_workers(refs: list[ray.ObjectRef], cancel: bool = True) -> dict[int, dict[str, Any]]:
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


def record_run(store: ArtifactStore, name: str, tp_size: int, run_id: str, planned: Planned,
               done: Dispatched, snap: dict[str, Any], starts_at: float, t0: float) -> WarmSummary:
    """Write the manifest rows and the stats snapshot `snap` (the stats actor's, of this run);
    the run's WarmSummary. t0: perf_counter() at the run's start; starts_at: time.time() when
    the worker start-ups were submitted."""
    fp_id = planned.plan.key_context.fingerprint_id
    manifest.update_manifest(store, name, fp_id,
                             manifest_rows(store, planned.plan, name, tp_size, done.rows))
    by_status = {s: [r for r in done.rows if r["status"] == s] for s in _STATUSES}
    snap["summary"] = {"total": len(planned.tasks), **{s: len(r) for s, r in by_status.items()}}
    store.put_file(manifest.stats_path(name, fp_id), json.dumps(snap, indent=1, default=str).encode())
    return _summary(store, name, tp_size, run_id, planned, done, by_status, snap, starts_at, t0)


def _summary(store: ArtifactStore, name: str, tp_size: int, run_id: str, planned: Planned,
             done: Dispatched, by_status: dict[str, list[dict[str, Any]]], snap: dict[str, Any],
             starts_at: float, t0: float) -> WarmSummary:
    fp_id = planned.plan.key_context.fingerprint_id
    prestarted = done.prestarted
    return WarmSummary(
        model=name, tp_size=tp_size, fingerprint_id=fp_id, total=len(planned.tasks),
        compiled=len(by_status["compiled"]), cached=len(by_status["cached"]),
        failed=len(by_status["failed"]), timed_out=len(by_status["timed_out"]),
        wall_s=round(done.wall_s, 3), plan_s=round(planned.plan_s, 3),
        task_s_sum=round(sum(r.get("seconds", 0.0) for r in by_status["compiled"]), 3),
        run_id=run_id, unique_pieces=planned.summary["unique_pieces"],
        shapes=list(planned.plan.shapes),
        max_concurrent=snap["max_concurrent"], prestarted=len(prestarted),
        prestart_s=max((p["seconds"] for p in prestarted.values()), default=0.0),
        prestart_ready=done.ready,
        prestart_last_s=round(max((p["finished_at"] for p in prestarted.values()),
                                  default=done.phase_started_at) - done.phase_started_at, 3),
        prestart_rows=[{**{k: v for k, v in p.items() if k != "fingerprint"},
                        "submitted_at": starts_at} for p in prestarted.values()],
        ran_in_prestarted=sum(1 for r in by_status["compiled"] if r.get("pid") in prestarted),
        pool_reused=sum(1 for p in prestarted.values() if p.get("reused")),
        total_s=round(time.perf_counter() - t0, 3),
        manifest_path=f"{store.url}/{manifest.manifest_path(name, fp_id)}",
        stats_path=f"{store.url}/{manifest.stats_path(name, fp_id)}",
        errors={r["name"]: r.get("error", "") for r in by_status["failed"] + by_status["timed_out"]},
        rows=sorted(done.rows, key=lambda r: r["name"]),
        gemm_benchmarked=sum(r.get("gemm_benchmarked", 0) for r in by_status["compiled"]),
        phase_started_at=done.phase_started_at)


def manifest_rows(store: ArtifactStore, plan: Plan, model: str, tp_size: int,
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
