"""Ray metrics of warm runs, exported by every node at its metrics export port (`ray_` prefix).

    vcr_compiles{status}      counter: finished compile tasks by status (compiled, cached, failed, timed_out)
    vcr_compile_seconds       histogram: seconds per successful compile
    vcr_tasks_remaining{run}  gauge: tasks of a run not finished yet (set by the driver)
    vcr_bytes_published       counter: artifact bytes this cluster published to the store
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ray.util import metrics

COMPILE_SECONDS_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]


@dataclass(frozen=True)
class WarmMetrics:
    compiles: metrics.Counter
    compile_seconds: metrics.Histogram
    tasks_remaining: metrics.Gauge
    bytes_published: metrics.Counter


@functools.cache
def warm_metrics() -> WarmMetrics:
    """This process's metric objects (Ray wants each created once per process)."""
    return WarmMetrics(
        compiles=metrics.Counter("vcr_compiles", "Finished compile tasks by status.",
                                 tag_keys=("status",)),
        compile_seconds=metrics.Histogram("vcr_compile_seconds", "Seconds per successful compile.",
                                          boundaries=COMPILE_SECONDS_BOUNDARIES),
        tasks_remaining=metrics.Gauge("vcr_tasks_remaining", "Compile tasks of a warm run not finished yet.",
                                      tag_keys=("run",)),
        bytes_published=metrics.Counter("vcr_bytes_published", "Artifact bytes published to the store."),
    )


def record_task(status: str, seconds: float = 0.0, published_bytes: int = 0) -> None:
    m = warm_metrics()
    m.compiles.inc(1, tags={"status": status})
    if status == "compiled":
        m.compile_seconds.observe(seconds)
    if published_bytes:
        m.bytes_published.inc(published_bytes)


def set_remaining(run_id: str, remaining: int) -> None:
    warm_metrics().tasks_remaining.set(remaining, tags={"run": run_id})
