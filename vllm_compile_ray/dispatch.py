"""The warm driver's compile phase: keep compile tasks in flight, collect their rows, cancel the
ones running past `max_compile_time`, print a progress line per finished task."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from . import metrics
from .compile_task import CompileTaskError, TaskContext, compile_remote
from .plan import CompileTask

_POLL_S = 1.0  # how often the driver checks running tasks against max_compile_time


class Dispatcher:
    """Keeps up to `max_in_flight` compile tasks submitted, collects their rows, cancels the ones
    running past `max_compile_time`, and prints a progress line per finished task."""

    def __init__(self, ctx: TaskContext, stats: ray.actor.ActorHandle, resources: dict[str, Any],
                 max_retries: int, say: Callable[[str], None]):
        self.ctx, self.stats, self.say = ctx, stats, say
        self.options = {"max_retries": max_retries, "retry_exceptions": False, **resources}
        self.node_ips: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.total = 0

    def run(self, todo: list[CompileTask], max_in_flight: int) -> list[dict[str, Any]]:
        run_id, self.total = self.ctx.run_id, len(todo)
        ctx_ref = ray.put(self.ctx)
        piece_refs = {t.code_id: ray.put(t.piece) for t in todo}  # once per piece, not per task
        pending = list(todo)
        in_flight: dict[ray.ObjectRef, CompileTask] = {}
        metrics.set_remaining(run_id, len(todo))
        last_poll = time.perf_counter()
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                task = pending.pop(0)
                ref = compile_remote.options(name=task.name, **self.options).remote(
                    piece_refs[task.code_id], ctx_ref, task.key, task.code_id, task.shape)
                in_flight[ref] = task
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=_POLL_S)
            if ready:
                ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            for ref in ready:
                task = in_flight.pop(ref)
                row = _result(ref, task)
                if "task_id" not in row:  # Ray gave up on it (worker died past max_retries, ...)
                    row = self._finish_here(ref, row)
                self._record(task, row)
            if in_flight and time.perf_counter() - last_poll >= _POLL_S:
                last_poll = time.perf_counter()
                for ref, task in _overdue(self.stats, run_id, in_flight,
                                          self.ctx.config.max_compile_time):
                    if ray.wait([ref], timeout=0)[0]:
                        continue  # finished meanwhile: collected next round
                    ray.cancel(ref, force=True)
                    del in_flight[ref]
                    limit = self.ctx.config.max_compile_time
                    row = {"name": task.name, "key": task.key, "code_id": task.code_id,
                           "shape": str(task.shape), "status": "timed_out", "seconds": 0.0,
                           "error": f"cancelled after max_compile_time={limit:g}s"}
                    self._record(task, self._finish_here(ref, row))
        return self.rows

    def _finish_here(self, ref: ray.ObjectRef, row: dict[str, Any]) -> dict[str, Any]:
        """Report a row the task itself could not; returns the row the stats actor kept (the
        task's own, if it finished after all)."""
        kept = ray.get(self.stats.finish.remote(self.ctx.run_id, ref.task_id().hex(), row))
        if kept["status"] == row["status"]:
            metrics.record_task(row["status"])
        return kept

    def _record(self, task: CompileTask, row: dict[str, Any]) -> None:
        node_id = row.get("node_id", "")
        if node_id and node_id not in self.node_ips:  # the address Ray advertises for the node
            self.node_ips.update((n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes())
        row["node_ip"] = self.node_ips.get(node_id, "")
        self.rows.append(row)
        metrics.set_remaining(self.ctx.run_id, self.total - len(self.rows))
        word = {"compiled": "compiled", "cached": "cached", "failed": "FAILED",
                "timed_out": "TIMED OUT"}[row["status"]]
        detail = f" {row['error']}" if row["status"] in ("failed", "timed_out") else ""
        self.say(f"{word} {len(self.rows)}/{self.total} {task.name} {row.get('seconds', 0.0):.1f}s "
                 f"on node {node_id[:8] or '?'} ({row['node_ip'] or '?'}){detail}")


def _result(ref: ray.ObjectRef, task: CompileTask) -> dict[str, Any]:
    """The task's row; a failure of Ray itself (worker died past max_retries, unschedulable)
    becomes a "failed" row naming the error."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, CompileTaskError):
            return exc.cause.row
        error = f"{type(exc.cause).__name__}: {exc.cause}"
    except ray.exceptions.RayError as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        error = f"{type(exc).__name__}: {first_line}"
    return {"name": task.name, "key": task.key, "code_id": task.code_id, "shape": str(task.shape),
            "status": "failed", "seconds": 0.0, "error": error}


def _overdue(stats: ray.actor.ActorHandle, run_id: str, in_flight: dict[ray.ObjectRef, CompileTask],
             limit: float) -> list[tuple[ray.ObjectRef, CompileTask]]:
    """In-flight tasks whose current attempt started more than `limit` seconds ago (queued tasks
    have not started and never count)."""
    running = ray.get(stats.running_since.remote(run_id))
    now = time.time()
    return [(ref, task) for ref, task in in_flight.items()
            if now - running.get(ref.task_id().hex(), now) > limit]
