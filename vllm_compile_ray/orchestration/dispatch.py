"""The warm driver's compile phase: keep compile tasks in flight, collect their rows, cancel the
ones running past `max_compile_time`, print a progress line per finished task."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from ..compiling import autotune_cache
from ..planning.plan import CompileTask
from . import metrics
from .compile_task import CompileTaskError, TaskContext, compile_remote, tune_remote
from .gemm_tuning import TuneTask

logger = logging.getLogger(__name__)

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
            starts: list[ray.ObjectRef] = (),
            pool: list[tuple[ray.actor.ActorHandle, ray.ObjectRef]] | None = None
            ) -> list[dict[str, Any]]:
        """Compile `todo` with `tunes` (`needs`: compile key -> names of the tune tasks whose
        timings it wants; alongside: see the class); returns the compile rows (tune rows:
        `self.tune_rows`).

        starts: the worker start-ups (`start_worker`) still running. Each counts against
        `max_in_flight` until it ends (for at most `max_compile_time`): a task submitted while a
        slot is free but every started worker is busy starting up gets a new worker process from
        Ray, which pays its whole start-up inside the compile phase (measured on 4xH200: 3 of 33
        tasks began 15 s into the phase that way, while 3 started workers sat idle).

        pool: [(worker, its start-up)] of the standing pool (`pool.up`): compiles and tunes run
        there instead of as Ray tasks, one at a time per worker once its start-up has ended
        (`max_in_flight` and `starts` do not apply). A worker running a compile past
        `max_compile_time` is restarted (and starts again); one that dies past its restarts is
        left out."""
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
        limit = self.ctx.config.max_compile_time  # for a start-up too, from its submission
        pool_starting = {ref: (worker, last_poll + limit) for worker, ref in pool or ()}
        idle: list[ray.actor.ActorHandle] = []  # pool workers started and free
        places: dict[ray.actor.ActorHandle, tuple] = {}  # pool worker -> (node, GPUs)
        owner: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}  # pool worker of each in flight
        while queue or in_flight:
            if starting:
                starting = [] if time.perf_counter() > stop_waiting else \
                    ray.wait(starting, num_returns=len(starting), timeout=0)[1]
            if pool_starting:
                idle = _spread(idle + _started_workers(pool_starting, places), places)
            if pool is not None and not (idle or in_flight or pool_starting):
                self._no_workers(queue, waiting, timings)
                break
            while idle if pool is not None else len(in_flight) < max_in_flight - len(starting):
                task = next((t for t in queue
                             if isinstance(t, TuneTask) or not waiting[t.key]), None)
                if task is None:
                    break
                queue.remove(task)
                worker = idle.pop(0) if pool is not None else None
                ref = self._submit(task, worker, ctx_ref, piece_refs, alongside, timings, needs or {})
                if worker is not None:
                    owner[ref] = worker
                in_flight[ref] = task
                submitted[ref] = time.time()
            ready, _ = ray.wait(list(in_flight) + starting + list(pool_starting), num_returns=1,
                                timeout=_POLL_S)
            if ready and in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            else:
                ready = []
            for ref in ready:
                task = in_flight.pop(ref)
                row = _result(ref, task)
                worker = owner.pop(ref, None)
                if "task_id" not in row:  # Ray gave up on it (worker died past max_retries, ...)
                    row = self._finish_here(ref, row)
                elif worker is not None:
                    idle.append(worker)
                row["submitted_at"] = submitted.pop(ref)
                self._record(task, row, waiting, timings)
            if in_flight and time.perf_counter() - last_poll >= _POLL_S:
                last_poll = time.perf_counter()
                for ref, task in _overdue(self.stats, run_id, in_flight,
                                          self.ctx.config.max_compile_time):
                    if ray.wait([ref], timeout=0)[0]:
                        continue  # finished meanwhile: collected next round
                    if ref in owner:  # an actor's call cannot be force-cancelled: restart it
                        worker = owner.pop(ref)
                        ray.kill(worker, no_restart=False)
                        # Ray retries the call there, which finds this row recorded and returns.
                        again = worker.start.options(name="vcr_start_worker").remote()
                        pool_starting[again] = (worker, time.perf_counter() + limit)
                    else:
                        ray.cancel(ref, force=True)
                    del in_flight[ref]
                    submitted.pop(ref)
                    row = {**_identity(task), "status": "timed_out", "seconds": 0.0,
                           "error": f"cancelled after max_compile_time={limit:g}s"}
                    self._record(task, self._finish_here(ref, row), waiting, timings)
        return self.rows

    def _submit(self, task: CompileTask | TuneTask, worker: ray.actor.ActorHandle | None,
                ctx_ref: ray.ObjectRef, piece_refs: dict[str, ray.ObjectRef], alongside: bool,
                timings: dict[str, dict[str, Any]], needs: dict[str, list[str]]) -> ray.ObjectRef:
        """Start `task` in the pool `worker`, or as a Ray task when None; a compile gets the
        timings of the tunes it `needs`."""
        if isinstance(task, TuneTask):
            args = (task.problem, task.shape, ctx_ref)
            if worker is not None:
                return worker.tune.options(name=task.name).remote(*args, shared=alongside)
            # A tune is optional: one attempt (a crash is not worth a new worker).
            return tune_remote.options(name=task.name, **{**self.options, "max_retries": 0}
                                       ).remote(*args, shared=alongside)
        args = (piece_refs[task.code_id], ctx_ref, task.key, task.code_id, task.shape,
                _merged(timings, needs.get(task.key, ())))
        if worker is not None:
            return worker.compile.options(name=task.name).remote(*args)
        return compile_remote.options(name=task.name, **self.options).remote(*args)

    def _no_workers(self, queue: list[CompileTask | TuneTask], waiting: dict[str, set[str]],
                    timings: dict[str, dict[str, Any]]) -> None:
        """Record every queued task as failed: no worker of the pool is left to run it."""
        limit = self.ctx.config.max_compile_time
        for task in list(queue):
            row = {**_identity(task), "status": "failed", "seconds": 0.0,
                   "error": "no compile worker of the pool is left: none started within "
                            f"max_compile_time={limit:g}s, or all died (see `vcr pool status`)"}
            if not isinstance(task, TuneTask):
                metrics.record_task("failed")
            self._record(task, row, waiting, timings)
        queue.clear()

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
