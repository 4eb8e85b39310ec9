"""The warm driver's compile phase: keep compile tasks in flight, collect their rows, cancel the
ones running past `max_compile_time`, print a progress line per finished task."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from ..planning.plan import CompileTask
from . import metrics
from .compile_task import CompileTaskError, TaskContext, compile_remote

logger = logging.getLogger(__name__)

_POLL_S = 1.0  # how often the driver checks running tasks against max_compile_time
_RAY_TASK = object()  # a free slot for a compile as a Ray task (not a pool worker)


class Dispatcher:
    """Keeps up to `max_in_flight` compile tasks running, collects their rows, cancels the ones
    running past `max_compile_time`, and prints a progress line per finished task.

    One loop for both places a compile runs: a Ray task in a slot of `max_in_flight`, or a call
    on an idle worker of the standing pool (`pool.up`); `_Slots` says which."""

    def __init__(self, ctx: TaskContext, stats: ray.actor.ActorHandle, resources: dict[str, Any],
                 max_retries: int, say: Callable[[str], None]):
        self.ctx, self.stats, self.say = ctx, stats, say
        self.options = {"max_retries": max_retries, "retry_exceptions": False, **resources}
        self.node_ips: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.total = 0
        self.stranded = False  # the pool had no worker left for some tasks

    def run(self, todo: list[CompileTask], max_in_flight: int, starts: list[ray.ObjectRef] = (),
            pool: list[tuple[ray.actor.ActorHandle, ray.ObjectRef]] | None = None
            ) -> list[dict[str, Any]]:
        """Compile `todo` in order; returns the rows.

        starts: the worker start-ups (`start_worker`) still running. Each counts against
        `max_in_flight` until it ends (for at most `max_compile_time`): a task submitted while a
        slot is free but every started worker is busy starting up gets a new worker process from
        Ray, which pays its whole start-up inside the compile phase (measured on 4xH200: 3 of 33
        tasks began 15 s into the phase that way, while 3 started workers sat idle).

        pool: [(worker, its start-up)] of the standing pool (`pool.up`): compiles run there
        instead of as Ray tasks, one at a time per worker once its start-up has ended
        (`max_in_flight` and `starts` do not apply). A worker running a compile past
        `max_compile_time` is restarted (and starts again); one that dies past its restarts is
        left out."""
        run_id, self.total = self.ctx.run_id, len(todo)
        limit = self.ctx.config.max_compile_time  # for a start-up too, from its submission
        ctx_ref = ray.put(self.ctx)
        piece_refs = {t.code_id: ray.put(t.piece) for t in todo}  # once per piece, not per task
        queue = list(todo)
        slots = _Slots(max_in_flight, starts, pool, limit)
        in_flight: dict[ray.ObjectRef, CompileTask] = {}
        submitted: dict[ray.ObjectRef, float] = {}  # when each was submitted (time.time())
        metrics.set_remaining(run_id, len(todo))
        last_poll = time.perf_counter()
        while queue or in_flight:
            slots.refresh()
            if slots.exhausted(in_flight):
                self._no_workers(queue)
                break
            while queue and (worker := slots.take(len(in_flight))) is not None:
                task = queue.pop(0)
                ref = self._submit(task, worker, ctx_ref, piece_refs)
                slots.bind(ref, worker)
                in_flight[ref] = task
                submitted[ref] = time.time()
            ready, _ = ray.wait(list(in_flight) + slots.pending(), num_returns=1, timeout=_POLL_S)
            if ready and in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            else:
                ready = []
            for ref in ready:
                task = in_flight.pop(ref)
                row = _result(ref, task)
                if "task_id" not in row:  # Ray gave up on it (worker died past max_retries, ...)
                    slots.unbind(ref)
                    row = self._finish_here(ref, row)
                else:
                    slots.release(ref)
                row["submitted_at"] = submitted.pop(ref)
                self._record(task, row)
            if in_flight and time.perf_counter() - last_poll >= _POLL_S:
                last_poll = time.perf_counter()
                self._cancel_overdue(run_id, in_flight, submitted, slots, limit)
        return self.rows

    def _cancel_overdue(self, run_id: str, in_flight: dict[ray.ObjectRef, CompileTask],
                        submitted: dict[ray.ObjectRef, float], slots: _Slots,
                        limit: float) -> None:
        """Cancel the tasks running past `limit` seconds and record them as timed out."""
        for ref, task in _overdue(self.stats, run_id, in_flight, limit):
            if ray.wait([ref], timeout=0)[0]:
                continue  # finished meanwhile: collected next round
            slots.cancel(ref)
            del in_flight[ref]
            submitted.pop(ref)
            row = {**_identity(task), "status": "timed_out", "seconds": 0.0,
                   "error": f"cancelled after max_compile_time={limit:g}s"}
            self._record(task, self._finish_here(ref, row))

    def _submit(self, task: CompileTask, worker: Any, ctx_ref: ray.ObjectRef,
                piece_refs: dict[str, ray.ObjectRef]) -> ray.ObjectRef:
        """Start `task` as a Ray task (`_RAY_TASK`) or on the pool `worker`."""
        args = (piece_refs[task.code_id], ctx_ref, task.key, task.code_id, task.shape)
        if worker is _RAY_TASK:
            return compile_remote.options(name=task.name, **self.options).remote(*args)
        return worker.compile.options(name=task.name).remote(*args)

    def _no_workers(self, queue: list[CompileTask]) -> None:
        """Record every queued task as failed: no worker of the pool is left to run it."""
        limit = self.ctx.config.max_compile_time
        self.stranded = True
        for task in list(queue):
            row = {**_identity(task), "status": "failed", "seconds": 0.0,
                   "error": "no compile worker of the pool is left: none started within "
                            f"max_compile_time={limit:g}s, or all died (see `vcr pool status`)"}
            metrics.record_task("failed")
            self._record(task, row)
        queue.clear()

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
        detail = f" {row.get('error', '')}" if row["status"] in ("failed", "timed_out") else ""
        where = f"on node {node_id[:8] or '?'} ({row['node_ip'] or '?'})"
        self.rows.append(row)
        metrics.set_remaining(self.ctx.run_id, self.total - len(self.rows))
        word = {"compiled": "compiled", "cached": "cached", "failed": "FAILED",
                "timed_out": "TIMED OUT"}[row["status"]]
        self.say(f"{word} {len(self.rows)}/{self.total} {task.name} {row.get('seconds', 0.0):.1f}s "
                 f"{where}{detail}")


class _Slots:
    """Where the next compile may run: a Ray task slot (`max_in_flight`, less the worker
    start-ups still running: None as the worker) or, with a pool, an idle pool worker."""

    def __init__(self, max_in_flight: int, starts: list[ray.ObjectRef],
                 pool: list[tuple[ray.actor.ActorHandle, ray.ObjectRef]] | None, limit: float):
        self.max_in_flight, self.limit, self.is_pool = max_in_flight, limit, pool is not None
        now = time.perf_counter()
        self.starting, self.stop_waiting = list(starts), now + limit
        self.pool_starting = {ref: (worker, now + limit) for worker, ref in pool or ()}
        self.idle: list[ray.actor.ActorHandle] = []  # pool workers started and free
        self.places: dict[ray.actor.ActorHandle, tuple] = {}  # pool worker -> (node, GPUs)
        self.owner: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}  # pool worker of a call

    def refresh(self) -> None:
        """Take in the start-ups that ended."""
        if self.starting:
            self.starting = [] if time.perf_counter() > self.stop_waiting else \
                ray.wait(self.starting, num_returns=len(self.starting), timeout=0)[1]
        if self.pool_starting:
            self.idle = _spread(self.idle + _started_workers(self.pool_starting, self.places),
                                self.places)

    def exhausted(self, in_flight: dict) -> bool:
        """A pool with no worker left, started or starting, and nothing running."""
        return self.is_pool and not (self.idle or in_flight or self.pool_starting)

    def take(self, running: int) -> Any:
        """An idle pool worker, `_RAY_TASK` for a free task slot, or None: no place now."""
        if self.is_pool:
            return self.idle.pop(0) if self.idle else None
        return _RAY_TASK if running < self.max_in_flight - len(self.starting) else None

    def bind(self, ref: ray.ObjectRef, worker: Any) -> None:
        """The call `ref` runs on `worker` (from `take`)."""
        if worker is not _RAY_TASK:
            self.owner[ref] = worker

    def pending(self) -> list[ray.ObjectRef]:
        """Start-ups to wake up for."""
        return self.starting + list(self.pool_starting)

    def release(self, ref: ray.ObjectRef) -> None:
        """The call `ref` finished: its pool worker is free again."""
        worker = self.owner.pop(ref, None)
        if worker is not None:
            self.idle.append(worker)

    def unbind(self, ref: ray.ObjectRef) -> None:
        """The call `ref` failed in Ray itself: its pool worker is not taken back."""
        self.owner.pop(ref, None)

    def cancel(self, ref: ray.ObjectRef) -> None:
        """Stop the call `ref` (past max_compile_time). An actor's call cannot be force-cancelled:
        its pool worker restarts (and starts again; Ray retries the call there, which finds its
        row recorded and returns)."""
        worker = self.owner.pop(ref, None)
        if worker is None:
            ray.cancel(ref, force=True)
            return
        ray.kill(worker, no_restart=False)
        again = worker.start.options(name="vcr_start_worker").remote()
        self.pool_starting[again] = (worker, time.perf_counter() + self.limit)


def _spread(idle: list[ray.actor.ActorHandle], places: dict[ray.actor.ActorHandle, tuple]
            ) -> list[ray.actor.ActorHandle]:
    """Idle pool workers ordered to take turns across GPUs (and nodes): the longest compiles go
    first, and several on one GPU slow each other's GEMM benchmarks (measured on 4xH200: the
    pool's first nine workers, all on GPU 0, got the nine longest compiles; GEMM selection took
    4-6 s in them against 3 s spread out)."""
    turn: dict[tuple, int] = {}
    keyed = []
    for i, worker in enumerate(idle):
        place = places.get(worker, ())
        keyed.append((turn.get(place, 0), i, worker))
        turn[place] = turn.get(place, 0) + 1
    return [worker for _, _, worker in sorted(keyed, key=lambda k: k[:2])]


def _started_workers(starting: dict[ray.ObjectRef, tuple[ray.actor.ActorHandle, float]],
                     places: dict[ray.actor.ActorHandle, tuple]) -> list[ray.actor.ActorHandle]:
    """Pool workers whose start-up ended, taken out of `starting` (ref -> (worker, deadline as
    perf_counter)), their (node, GPUs) noted in `places`; a failed one is logged and left out, as
    is one still starting past its deadline."""
    done, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
    started = []
    for ref in done:
        worker, _ = starting.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as exc:
            logger.warning("a pool worker's start-up failed: %s", str(exc).splitlines()[0])
            continue
        places[worker] = (out.get("node_id", ""), tuple(out.get("gpu_ids", ())))
        started.append(worker)
    now = time.perf_counter()
    for ref in [r for r, (_, deadline) in starting.items() if now > deadline]:
        logger.warning("a pool worker did not start within max_compile_time: left out")
        del starting[ref]
    return started


def _identity(task: CompileTask) -> dict[str, Any]:
    """The fields naming a task in a row the driver writes for it."""
    return {"name": task.name, "key": task.key, "code_id": task.code_id, "shape": str(task.shape)}


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
    return {**_identity(task), "status": "failed", "seconds": 0.0, "error": error}


def _overdue(stats: ray.actor.ActorHandle, run_id: str,
             in_flight: dict[ray.ObjectRef, CompileTask], limit: float
             ) -> list[tuple[ray.ObjectRef, CompileTask]]:
    """In-flight tasks whose current attempt started more than `limit` seconds ago (queued tasks
    have not started and never count)."""
    running = ray.get(stats.running_since.remote(run_id))
    now = time.time()
    return [(ref, task) for ref, task in in_flight.items()
            if now - running.get(ref.task_id().hex(), now) > limit]
