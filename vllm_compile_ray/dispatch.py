"""The warm driver's compile phase: keep compile tasks in flight, collect their rows, cancel the
ones running past `max_compile_time`, print a progress line per finished task."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from . import autotune_cache, metrics
from .compile_task import CompileTaskError, TaskContext, compile_remote, tune_remote
from .gemm_tuning import TuneTask
from .plan import CompileTask

_POLL_S = 1.0  # how often the driver checks running tasks against max_compile_time


class Dispatcher:
    """Keeps up to `max_in_flight` tasks submitted, collects their rows, cancels the ones running
    past `max_compile_time`, and prints a progress line per finished task.

    With GEMM tuning (`gemm_tuning`), each compile is queued after its tune tasks. "ahead": a
    compile is submitted once every tune task it needs has finished (tuned, failed or timed out),
    with the timings they found, so it starts as soon as its GEMMs are tuned and never holds a
    slot waiting. "alongside": compiles do not wait; the tunes benchmark in their node's Inductor
    cache, where the compiles' GEMM lookups wait for them (`autotune_cache.share_gemm_timings`)."""

    def __init__(self, ctx: TaskContext, stats: ray.actor.ActorHandle, resources: dict[str, Any],
                 max_retries: int, say: Callable[[str], None]):
        self.ctx, self.stats, self.say = ctx, stats, say
        self.options = {"max_retries": max_retries, "retry_exceptions": False, **resources}
        self.node_ips: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.tune_rows: list[dict[str, Any]] = []
        self.total = 0

    def run(self, todo: list[CompileTask], max_in_flight: int, tunes: list[TuneTask] = (),
            needs: dict[str, list[str]] | None = None, alongside: bool = False,
            starts: list[ray.ObjectRef] = ()) -> list[dict[str, Any]]:
        """Compile `todo` with `tunes` (`needs`: compile key -> names of the tune tasks whose
        timings it wants; alongside: see the class); returns the compile rows (tune rows:
        `self.tune_rows`).

        starts: the worker start-ups (`start_worker`) still running. Each counts against
        `max_in_flight` until it ends (for at most `max_compile_time`): a task submitted while a
        slot is free but every started worker is busy starting up gets a new worker process from
        Ray, which pays its whole start-up inside the compile phase (measured on 4xH200: 3 of 33
        tasks began 15 s into the phase that way, while 3 started workers sat idle)."""
        run_id, self.total = self.ctx.run_id, len(todo)
        ctx_ref = ray.put(self.ctx)
        piece_refs = {t.code_id: ray.put(t.piece) for t in todo}  # once per piece, not per task
        queue = _queue(todo, tunes, needs or {})
        waiting = {t.key: set() if alongside else set((needs or {}).get(t.key, ()))
                   for t in todo}  # unfinished tunes
        timings: dict[str, dict[str, Any]] = {}  # tune name -> its timings
        in_flight: dict[ray.ObjectRef, CompileTask | TuneTask] = {}
        submitted: dict[ray.ObjectRef, float] = {}  # when each was submitted (time.time())
        metrics.set_remaining(run_id, len(todo))
        last_poll = time.perf_counter()
        starting, stop_waiting = list(starts), last_poll + self.ctx.config.max_compile_time
        while queue or in_flight:
            if starting:
                starting = [] if time.perf_counter() > stop_waiting else \
                    ray.wait(starting, num_returns=len(starting), timeout=0)[1]
            while len(in_flight) < max_in_flight - len(starting):
                task = next((t for t in queue
                             if isinstance(t, TuneTask) or not waiting[t.key]), None)
                if task is None:
                    break
                queue.remove(task)
                if isinstance(task, TuneTask):
                    # A tune is optional: one attempt (a crash is not worth a new worker).
                    ref = tune_remote.options(name=task.name, **{**self.options,
                                                                 "max_retries": 0}).remote(
                        task.problem, task.shape, ctx_ref, shared=alongside)
                else:
                    ref = compile_remote.options(name=task.name, **self.options).remote(
                        piece_refs[task.code_id], ctx_ref, task.key, task.code_id, task.shape,
                        _merged(timings, (needs or {}).get(task.key, ())))
                in_flight[ref] = task
                submitted[ref] = time.time()
            ready, _ = ray.wait(list(in_flight) + starting, num_returns=1, timeout=_POLL_S)
            if ready and in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            else:
                ready = []
            for ref in ready:
                task = in_flight.pop(ref)
                row = _result(ref, task)
                if "task_id" not in row:  # Ray gave up on it (worker died past max_retries, ...)
                    row = self._finish_here(ref, row)
                row["submitted_at"] = submitted.pop(ref)
                self._record(task, row, waiting, timings)
            if in_flight and time.perf_counter() - last_poll >= _POLL_S:
                last_poll = time.perf_counter()
                for ref, task in _overdue(self.stats, run_id, in_flight,
                                          self.ctx.config.max_compile_time):
                    if ray.wait([ref], timeout=0)[0]:
                        continue  # finished meanwhile: collected next round
                    ray.cancel(ref, force=True)
                    del in_flight[ref]
                    submitted.pop(ref)
                    limit = self.ctx.config.max_compile_time
                    row = {**_identity(task), "status": "timed_out", "seconds": 0.0,
                           "error": f"cancelled after max_compile_time={limit:g}s"}
                    self._record(task, self._finish_here(ref, row), waiting, timings)
        return self.rows

    def _finish_here(self, ref: ray.ObjectRef, row: dict[str, Any]) -> dict[str, Any]:
        """Report a row the task itself could not; returns the row the stats actor kept (the
        task's own, if it finished after all)."""
        kept = ray.get(self.stats.finish.remote(self.ctx.run_id, ref.task_id().hex(), row))
        if kept["status"] == row["status"] and row.get("kind") != "tune":
            metrics.record_task(row["status"])
        return kept

    def _record(self, task: CompileTask | TuneTask, row: dict[str, Any],
                waiting: dict[str, set[str]], timings: dict[str, dict[str, Any]]) -> None:
        node_id = row.get("node_id", "")
        if node_id and node_id not in self.node_ips:  # the address Ray advertises for the node
            self.node_ips.update((n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes())
        row["node_ip"] = self.node_ips.get(node_id, "")
        detail = f" {row.get('error', '')}" if row["status"] in ("failed", "timed_out") else ""
        where = f"on node {node_id[:8] or '?'} ({row['node_ip'] or '?'})"
        if isinstance(task, TuneTask):
            timings[task.name] = row.pop("timings", None) or {}
            for names in waiting.values():
                names.discard(task.name)
            self.tune_rows.append(row)
            word = {"tuned": "tuned", "failed": "TUNE FAILED", "timed_out": "TUNE TIMED OUT"}
            self.say(f"{word[row['status']]} {task.name} {row.get('seconds', 0.0):.1f}s "
                     f"{where}{detail}")
            return
        self.rows.append(row)
        metrics.set_remaining(self.ctx.run_id, self.total - len(self.rows))
        word = {"compiled": "compiled", "cached": "cached", "failed": "FAILED",
                "timed_out": "TIMED OUT"}[row["status"]]
        self.say(f"{word} {len(self.rows)}/{self.total} {task.name} {row.get('seconds', 0.0):.1f}s "
                 f"{where}{detail}")


def _identity(task: CompileTask | TuneTask) -> dict[str, Any]:
    """The fields naming a task in a row the driver writes for it."""
    if isinstance(task, TuneTask):
        return {"name": task.name, "kind": "tune", "problem_id": task.problem.problem_id,
                "shape": str(task.shape)}
    return {"name": task.name, "key": task.key, "code_id": task.code_id, "shape": str(task.shape)}


def _queue(todo: list[CompileTask], tunes: list[TuneTask], needs: dict[str, list[str]]
           ) -> list[CompileTask | TuneTask]:
    """Submission order: each compile (longest first) after those of its tunes not queued yet,
    then any tune no compile names."""
    by_name = {t.name: t for t in tunes}
    queue: list[CompileTask | TuneTask] = []
    for task in todo:
        for name in needs.get(task.key, ()):
            tune = by_name.pop(name, None)
            if tune is not None:
                queue.append(tune)
        queue.append(task)
    return queue + list(by_name.values())


def _merged(timings: dict[str, dict[str, Any]], names: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        autotune_cache.merge_timings(out, timings.get(name, {}))
    return out


def _result(ref: ray.ObjectRef, task: CompileTask | TuneTask) -> dict[str, Any]:
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
    return {**_identity(task), "status": "failed", "seconds": 0.0, "error": error}


def _overdue(stats: ray.actor.ActorHandle, run_id: str,
             in_flight: dict[ray.ObjectRef, CompileTask | TuneTask], limit: float
             ) -> list[tuple[ray.ObjectRef, CompileTask | TuneTask]]:
    """In-flight tasks whose current attempt started more than `limit` seconds ago (queued tasks
    have not started and never count)."""
    running = ray.get(stats.running_since.remote(run_id))
    now = time.time()
    return [(ref, task) for ref, task in in_flight.items()
            if now - running.get(ref.task_id().hex(), now) > limit]
