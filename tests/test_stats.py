"""CompileStats without Ray: dedup by task id, retries, peak concurrency, aggregation."""

from __future__ import annotations

import json

from vllm_compile_ray.compiling.counters import CompilationCounter
from vllm_compile_ray.compiling.monitor import PerformanceMonitor
from vllm_compile_ray.orchestration.stats import CompileStats, StatsActor


def _report(n: int = 1, seconds: float = 2.0) -> tuple[dict, dict]:
    counter = CompilationCounter(num_backend_compilations=n, num_artifacts_saved=n, bytes_saved=100 * n)
    monitor = PerformanceMonitor()
    monitor.record("compile", seconds)
    return counter.to_dict(), monitor.to_dict()


def test_finish_counts_each_task_id_once() -> None:
    stats = CompileStats("run")
    assert stats.start("t1") == 1
    assert stats.finish("t1", {"name": "compile[a/1]", "status": "compiled"}, *_report())
    # A retry after the worker died past `finish`: same task id, nothing counted twice.
    assert stats.start("t1") == 2
    assert not stats.finish("t1", {"name": "compile[a/1]", "status": "compiled"}, *_report())
    snap = stats.snapshot()
    assert snap["counter"]["num_backend_compilations"] == 1
    assert snap["counter"]["bytes_saved"] == 100
    assert snap["timings"]["compile"]["count"] == 1
    assert [(r["task_id"], r["retries"]) for r in snap["tasks"]] == [("t1", 1)]
    assert snap["retried_tasks"] == 1 and snap["running"] == 0


def test_crash_before_finish_counts_once_with_retry() -> None:
    stats = CompileStats()
    stats.start("t1")
    stats.start("t1")  # the first attempt's worker died mid-compile
    stats.finish("t1", {"name": "x", "status": "compiled"}, *_report())
    assert stats.recorded("t1")["retries"] == 1
    assert stats.max_concurrent == 1  # one task, not two attempts
    assert stats.snapshot()["counter"]["num_artifacts_saved"] == 1


def test_max_concurrent_and_status_counts() -> None:
    stats = CompileStats()
    for t in ("a", "b", "c"):
        stats.start(t, now=0.0)
    stats.finish("a", {"status": "compiled"})
    stats.start("d", now=1.0)
    stats.finish("b", {"status": "failed", "error": "boom"})
    stats.finish("c", {"status": "timed_out"})
    assert stats.max_concurrent == 3
    assert stats.running_since() == {"d": 1.0}
    assert stats.status_counts() == {"compiled": 1, "failed": 1, "timed_out": 1}
    json.dumps(stats.snapshot())  # the snapshot is written as JSON


def test_actor_class_keeps_runs_apart() -> None:
    actor = StatsActor()  # the plain class behind the Ray actor
    assert actor.start("r1", "t") == (1, None)
    row = actor.finish("r1", "t", {"status": "compiled"}, *_report())
    assert row["task_id"] == "t" and row["retries"] == 0
    assert actor.start("r1", "t") == (2, {**row, "retries": 1})
    actor.start("r2", "t")
    assert actor.snapshot("r2")["running"] == 1
    assert set(actor.snapshot()) == {"r1", "r2"}
    assert actor.runs_list() == ["r1", "r2"]


def test_snapshot_sums_the_compile_phases_over_tasks() -> None:
    """Compile rows carry Inductor's phase seconds; the snapshot says where a run's time went."""
    stats = CompileStats("run")
    for i, phases in enumerate([{"GraphLowering.run": 1.5, "mm_template_autotuning": 4.0},
                                {"GraphLowering.run": 0.5}, None]):
        stats.start(f"t{i}")
        stats.finish(f"t{i}", {"name": f"compile[a/{i}]", "status": "compiled",
                               **({"phases": phases, "cpu_s": 3.0 + i, "run_s": 1.0,
                                   "runq_s": 0.25} if phases else {})})
    snap = stats.snapshot()
    # and their CPU seconds (`cpu_time`): rows without them (cached, failed) count nothing
    assert snap["cpu"] == {"cpu_s": 7.0, "child_cpu_s": 0.0, "run_s": 2.0, "runq_s": 0.5}
    from vllm_compile_ray.orchestration.stats import cpu_sums
    assert all(isinstance(v, float) and v == 0.0 for v in cpu_sums([]).values())  # a cached run
    assert snap["phases"] == {"mm_template_autotuning": 4.0, "GraphLowering.run": 2.0}
    assert list(snap["phases"]) == ["mm_template_autotuning", "GraphLowering.run"]  # largest first
    many = [{"phases": {f"p{i}": float(i) for i in range(40)}}]
    from vllm_compile_ray.orchestration.stats import top_phases
    assert list(top_phases(many, top=3)) == ["p39", "p38", "p37"]
