"""Runtime dispatch: each compiled piece runs the artifact for the exact num_tokens, else the
dynamic artifact inside its guard range, else the configured fallback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..compiling.counters import CompilationCounter
from ..planning.canonical import CanonicalPiece
from .manager import LoadedPiece


class PieceRunner:
    """Stands in for one compiled submodule of the split graph."""

    def __init__(self, name: str, piece: CanonicalPiece, static: dict[int, LoadedPiece],
                 dynamic: LoadedPiece | None, fallback: str, counter: CompilationCounter,
                 compile_on_demand: Callable[[int], LoadedPiece] | None = None):
        self.name = name
        self.piece = piece
        self.static = dict(static)
        self.dynamic = dynamic
        self.fallback = fallback
        self.counter = counter
        self.compile_on_demand = compile_on_demand
        self.locator = piece.shape_locator()

    def size_of(self, args: tuple[Any, ...]) -> int | None:
        if self.locator is None:
            return None
        index, dim = self.locator
        return int(args[index]) if dim < 0 else int(args[index].shape[dim])

    def select(self, size: int | None) -> LoadedPiece | None:
        if size is None:  # no symbolic dim: one static shape serves every call
            return self.dynamic or next(iter(self.static.values()), None)
        entry = self.static.get(size)
        if entry is None and self.dynamic is not None and self.dynamic.covers(size):
            entry = self.dynamic
        if entry is None and self.fallback == "compile" and self.compile_on_demand is not None:
            entry = self.static[size] = self.compile_on_demand(size)
            self.counter.num_on_demand_compiles += 1
        return entry

    def __call__(self, *args: Any) -> Any:
        entry = self.select(self.size_of(args))
        args = (*args, *self.piece.constants)  # the piece's lifted tensor constants
        if entry is None:
            self.counter.num_fallback_eager_calls += 1
            out = self.piece.graph(*args)
        else:
            out = entry.fn(*args)
        return out[0] if self.piece.single_output else tuple(out)
