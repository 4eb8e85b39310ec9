"""`PerformanceMonitor`: compile and load timings with summary statistics."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class PerformanceMonitor:
    """Named series of durations in seconds (e.g. "compile", "load", "fetch", "trace")."""

    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def record(self, name: str, seconds: float) -> None:
        self.samples[name].append(float(seconds))

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - start)

    def merge(self, other: PerformanceMonitor) -> None:
        for name, values in other.samples.items():
            self.samples[name].extend(values)

    def stats(self, name: str) -> dict[str, float]:
        values = sorted(self.samples.get(name, []))
        if not values:
            return {"count": 0, "total": 0.0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
        return {"count": len(values), "total": sum(values), "mean": statistics.fmean(values),
                "p50": pick(0.5), "p90": pick(0.9), "max": values[-1]}

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: self.stats(name) for name in sorted(self.samples)}

    def to_dict(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in self.samples.items()}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> PerformanceMonitor:
        monitor = cls()
        for name, values in data.items():
            monitor.samples[name].extend(float(v) for v in values)
        return monitor
