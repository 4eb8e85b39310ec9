"""Cluster-wide compile statistics: a plain `CompileStats` and a thin named Ray actor around it.

Compile tasks report `start` and `finish` to the actor; Ray re-runs a task after a worker crash
with the same task id, so both are deduplicated by task id and a retried task counts once.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from ..compiling.counters import CompilationCounter
from ..compiling.monitor import PerformanceMonitor

STATS_ACTOR_NAME = "vcr_stats"
STATS_NAMESPACE = "vllm_compile_ray"
_MAX_RUNS = 32  # the detached actor outlives runs: keep the newest ones only
_TOP_PHASES = 16


class CompileStats:
    """Statistics of one warm run: counters, timings, one row per task, peak concurrency."""

    def __init__(self, run_id: str = "") -> None:
        self.run_id = run_id
        self.counter = CompilationCounter()
        self.monitor = PerformanceMonitor()
        self.rows: dict[str, dict[str, Any]] = {}  # task id -> row
        self.attempts: dict[str, int] = {}  # task id -> attempts started
        self.running: dict[str, float] = {}  # task id -> wall time the current attempt started
        self.max_concurrent = 0
        self.created_at = time.time()

    def start(self, task_id: str, now: float | None = None) -> int:
        """A task attempt started; returns its attempt number (1 first, 2 after one retry)."""
        self.attempts[task_id] = self.attempts.get(task_id, 0) + 1
        if task_id not in self.rows:
            self.running[task_id] = time.time() if now is None else now
            self.max_concurrent = max(self.max_concurrent, len(self.running))
        return self.attempts[task_id]

    def finish(self, task_id: str, row: dict[str, Any], counter: dict[str, int] | None = None,
               monitor: dict[str, list[float]] | None = None) -> bool:
        """Record a task's outcome once; False (and nothing recorded) if already recorded."""
        self.running.pop(task_id, None)
        if task_id in self.rows:
            return False
        self.rows[task_id] = {**row, "task_id": task_id}
        if counter:
            self.counter.add(CompilationCounter.from_dict(counter))
        if monitor:
            self.monitor.merge(PerformanceMonitor.from_dict(monitor))
        return True

    def recorded(self, task_id: str) -> dict[str, Any] | None:
        """The row recorded for `task_id` with its retry count, or None if not finished yet."""
        if task_id not in self.rows:
            return None
        return {**self.rows[task_id], "retries": max(0, self.attempts.get(task_id, 1) - 1)}

    def running_since(self) -> dict[str, float]:
        return dict(self.running)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row.get("status", "?")] = counts.get(row.get("status", "?"), 0) + 1
        return counts

    def snapshot(self) -> dict[str, Any]:
        rows = sorted((self.recorded(t) for t in self.rows), key=lambda r: (r.get("name", ""), r["task_id"]))
        return {"run_id": self.run_id, "created_at": self.created_at, "counter": self.counter.to_dict(),
                "timings": self.monitor.summary(), "status": self.status_counts(),
                "max_concurrent": self.max_concurrent, "running": len(self.running),
                "retried_tasks": sum(1 for r in rows if r["retries"]),
                "phases": top_phases(rows), "cpu": cpu_sums(rows), "tasks": rows}


def top_phases(rows: list[dict[str, Any]], top: int = _TOP_PHASES) -> dict[str, float]:
    """Where the compiles' seconds went: each Inductor phase (the rows' "phases") summed over
    the rows, the `top` largest, largest first. Nested phases count in their parents too."""
    sums: dict[str, float] = {}
    for row in rows:
        for name, seconds in (row.get("phases") or {}).items():
            sums[name] = sums.get(name, 0.0) + float(seconds)
    largest = sorted(sums.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(seconds, 3) for name, seconds in largest}


CPU_FIELDS = ("cpu_s", "child_cpu_s", "run_s", "runq_s")  # of a compile row: `cpu_time`


def cpu_sums(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The compiles' CPU seconds summed over the rows (`cpu_time`): their processes', their
    child processes', their compile threads' on a core and waiting for one."""
    return {k: round(sum((float(r.get(k, 0.0)) for r in rows), 0.0), 3) for k in CPU_FIELDS}


class StatsActor:
    """Holds a `CompileStats` per run id. Wrapped by `ray.remote` in `get_stats_actor`."""

    def __init__(self) -> None:
        self.runs: dict[str, CompileStats] = {}
        self.startup: list[dict[str, Any]] = []

    def _run(self, run_id: str) -> CompileStats:
        if run_id not in self.runs:
            if len(self.runs) >= _MAX_RUNS:
                oldest = min(self.runs, key=lambda r: self.runs[r].created_at)
                del self.runs[oldest]
            self.runs[run_id] = CompileStats(run_id)
        return self.runs[run_id]

    def start(self, run_id: str, task_id: str) -> tuple[int, dict[str, Any] | None]:
        """(attempt number, the row already recorded for this task id or None)."""
        stats = self._run(run_id)
        return stats.start(task_id), stats.recorded(task_id)

    def finish(self, run_id: str, task_id: str, row: dict[str, Any],
               counter: dict[str, int] | None = None,
               monitor: dict[str, list[float]] | None = None) -> dict[str, Any]:
        """Record once; returns the row kept for the task (the first one reported)."""
        stats = self._run(run_id)
        stats.finish(task_id, row, counter, monitor)
        return stats.recorded(task_id)

    def running_since(self, run_id: str) -> dict[str, float]:
        return self._run(run_id).running_since()

    def snapshot(self, run_id: str | None = None) -> dict[str, Any]:
        """One run's snapshot, or {run_id: snapshot} of every run kept when run_id is None."""
        if run_id is not None:
            return self._run(run_id).snapshot()
        return {rid: stats.snapshot() for rid, stats in self.runs.items()}

    def add_startup_report(self, report: dict[str, Any]) -> None:
        """A TP rank's startup report (load.StartupReport.to_dict()); the newest _MAX_RUNS kept."""
        self.startup.append(dict(report))
        del self.startup[:-_MAX_RUNS * 64]

    def startup_reports(self) -> list[dict[str, Any]]:
        return list(self.startup)

    def runs_list(self) -> list[str]:
        return sorted(self.runs, key=lambda r: self.runs[r].created_at)


def get_stats_actor() -> ray.actor.ActorHandle:
    """The cluster's stats actor, created on first use (detached: it outlives the driver).

    A detached actor keeps the code of the job that created it; restart it (`ray.kill`) after
    changing this module on a long-lived cluster.
    """
    return ray.remote(StatsActor).options(
        name=STATS_ACTOR_NAME, namespace=STATS_NAMESPACE, lifetime="detached",
        get_if_exists=True, num_cpus=0, max_restarts=-1).remote()


def snapshot(run_id: str | None = None) -> dict[str, Any]:
    """Snapshot of one run (or all kept runs) from the stats actor of the connected cluster."""
    return ray.get(get_stats_actor().snapshot.remote(run_id))
