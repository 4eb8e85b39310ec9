"""`CompilationCounter`: plain counts of what compilation did, with `expect(**deltas)` for tests."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class CompilationCounter:
    num_graphs_seen: int = 0
    num_piecewise_graphs_seen: int = 0
    num_piecewise_capturable_graphs_seen: int = 0
    num_backend_compilations: int = 0
    num_inductor_compiles: int = 0
    num_eager_compiles: int = 0
    num_cache_hits: int = 0
    num_cache_misses: int = 0
    num_cache_hits_memory: int = 0
    num_cache_hits_staging: int = 0
    num_artifacts_saved: int = 0
    num_artifacts_loaded: int = 0
    num_artifacts_rejected: int = 0
    num_artifacts_deleted: int = 0  # verified-wrong objects removed from the shared store
    num_fallback_eager_calls: int = 0
    num_on_demand_compiles: int = 0
    num_compile_failures: int = 0
    bytes_saved: int = 0
    bytes_loaded: int = 0

    def clone(self) -> CompilationCounter:
        return dataclasses.replace(self)

    def add(self, other: CompilationCounter) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def diff(self, before: CompilationCounter) -> dict[str, int]:
        return {f.name: getattr(self, f.name) - getattr(before, f.name)
                for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(before, f.name)}

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> CompilationCounter:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @contextlib.contextmanager
    def expect(self, **deltas: int) -> Iterator[None]:
        """Assert that the block changes each named counter by exactly the given amount."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(deltas) - names)
        if unknown:
            raise ValueError(f"unknown counter(s) {unknown}; known: {sorted(names)}")
        before = self.clone()
        yield
        for name, delta in deltas.items():
            actual = getattr(self, name) - getattr(before, name)
            assert actual == delta, f"{name} changed by {actual}, expected {delta}"
