"""`CompilerManager`: load-or-compile each (piece, shape) through the three cache tiers.

Tiers, fastest first: loaded callables in process memory, the node-local staging directory, the
object store (the last two behind `ArtifactStore`). Counts go to `CompilationCounter`, times to
`PerformanceMonitor`.

A stored artifact this process refuses is a miss. It is deleted from the shared store only when
the refusal was verified against the object itself (checksum, signature, metadata naming another
environment, compiler or shape) and this process is about to publish its replacement. A failed
`compiler.load` (out of memory, no C++ compiler, ...) says nothing about the object: it stays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..cache.store import Artifact, ArtifactStore
from ..compiling.compiler_interface import CompileResult, CompilerInterface, Guard
from ..compiling.counters import CompilationCounter
from ..compiling.monitor import PerformanceMonitor
from ..config import CompilationConfig
from ..errors import ArtifactCorruptError, ArtifactNotFoundError, CompileError
from ..planning.canonical import CanonicalPiece
from .gc_pause import gc_resumed

logger = logging.getLogger(__name__)


@dataclass
class LoadedPiece:
    key: str
    shape: int | str
    fn: Callable
    guard: Guard
    source: str  # "memory" | "store" | "compiled"

    def covers(self, size: int) -> bool:
        lo, hi = self.guard
        return size >= lo and (hi is None or size <= hi)


class CompilerManager:
    def __init__(self, config: CompilationConfig, compiler: CompilerInterface,
                 store: ArtifactStore | None, device: str, fingerprint_id: str,
                 counter: CompilationCounter | None = None,
                 monitor: PerformanceMonitor | None = None):
        self.config = config
        self.compiler = compiler
        self.store = None if config.disable_compile_cache else store
        self.device = device
        self.fingerprint_id = fingerprint_id
        self.counter = counter if counter is not None else CompilationCounter()
        self.monitor = monitor if monitor is not None else PerformanceMonitor()
        self.loaded: dict[str, LoadedPiece] = {}
        self._fetched: dict[str, Artifact] = {}
        self.rejected: dict[str, str] = {}  # key -> why this process refused its stored artifact
        self.mismatched: set[str] = set()  # rejected keys whose stored object is verified wrong

    def artifact_meta(self, piece: CanonicalPiece, shape: int | str, result: CompileResult,
                      seconds: float) -> dict:
        return {"shape": shape, "guard": list(result.guard), "compiler": self.compiler.name,
                "fingerprint": self.fingerprint_id, "torch": torch.__version__,
                "compile_seconds": round(seconds, 4), **result.info}

    def prefetch(self, keys: Iterable[str]) -> set[str]:
        """Fetch the artifacts of `keys` in one batched request; returns the keys found."""
        wanted = [k for k in dict.fromkeys(keys)
                  if k not in self.loaded and k not in self._fetched and k not in self.rejected]
        if self.store is None or not wanted:
            return set(self.loaded) | set(self._fetched)
        bad: dict[str, ArtifactCorruptError] = {}
        with self.monitor.timed("fetch"):
            found = self.store.fetch_many(wanted, rejected=bad)
        for key, exc in bad.items():  # a corrupt object stays out of the batch, rejected here
            self._reject(key, str(exc), verified=True)
        self._fetched.update(found)
        return set(self.loaded) | set(self._fetched)

    def load(self, key: str, piece: CanonicalPiece, shape: int | str) -> LoadedPiece | None:
        """The loaded piece from memory or the store, or None on a miss or a rejected artifact
        (then `rejected[key]` says why)."""
        if key in self.loaded:
            self.counter.num_cache_hits_memory += 1
            return self.loaded[key]
        if self.store is None or key in self.rejected:  # refused once: not fetched again
            return None
        artifact = self._fetched.pop(key, None)
        if artifact is None:
            try:
                with self.monitor.timed("fetch"):
                    artifact = self.store.fetch(key)
            except ArtifactNotFoundError:
                return None
            except ArtifactCorruptError as exc:
                self._reject(key, str(exc), verified=True)
                return None
        meta = artifact.meta
        problem = self._meta_problem(meta, shape)
        if problem:
            self._reject(key, problem, verified=True)
            return None
        start = time.perf_counter()
        try:
            fn = self.compiler.load(artifact.payload, piece.graph, shape, self.device)
        except Exception as exc:  # noqa: BLE001 (a miss by policy; the object may be fine)
            self._reject(key, f"could not load ({type(exc).__name__}: {exc})", verified=False)
            return None
        self.monitor.record("load", time.perf_counter() - start)
        self.counter.num_cache_hits += 1
        self.counter.num_artifacts_loaded += 1
        self.counter.bytes_loaded += len(artifact.payload)
        lo, hi = meta["guard"]
        loaded = LoadedPiece(key, shape, fn, (int(lo), None if hi is None else int(hi)), "store")
        self.loaded[key] = loaded
        return loaded

    def _reject(self, key: str, why: str, verified: bool) -> None:
        """verified: the object itself is wrong (see the module docstring), not this process."""
        self.counter.num_artifacts_rejected += 1
        self.rejected[key] = why
        if verified:
            self.mismatched.add(key)
        logger.warning("rejected artifact %s: %s", key, why)

    def _delete_mismatched(self, key: str) -> None:
        """Delete the verified-wrong object at `key`; publish-once would otherwise keep it."""
        self.store.delete(key)
        self.mismatched.discard(key)
        self.counter.num_artifacts_deleted += 1
        logger.warning("deleted artifact %s from the store before publishing a fresh compile: %s",
                       key, self.rejected[key])

    def _meta_problem(self, meta: dict, shape: int | str) -> str:
        if meta.get("compiler") != self.compiler.name:
            return f"made by compiler {meta.get('compiler')!r}, expected {self.compiler.name!r}"
        if meta.get("fingerprint") != self.fingerprint_id:
            return (f"environment fingerprint {meta.get('fingerprint')!r} differs from this "
                    f"process's {self.fingerprint_id!r} (other torch or device)")
        if meta.get("shape") != shape:
            return f"compiled for shape {meta.get('shape')!r}, expected {shape!r}"
        if not isinstance(meta.get("guard"), list) or len(meta["guard"]) != 2:
            return "has no guard range"
        return ""

    def compile(self, key: str, piece: CanonicalPiece, shape: int | str, publish: bool,
                name: str = "") -> tuple[LoadedPiece, dict]:
        """Compile, optionally publish; returns the loaded piece and the artifact's metadata."""
        start = time.perf_counter()
        try:
            with gc_resumed():  # a startup pauses the collector (`load`), not its compiles
                result = self.compiler.compile(piece.graph, piece.input_specs, shape,
                                               self.device)
        except Exception as exc:
            self.counter.num_compile_failures += 1
            raise CompileError(f"compiling {name or key[:12]} for shape {shape!r} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        self.monitor.record("compile", seconds)
        self.counter.num_backend_compilations += 1
        if self.compiler.name == "eager":
            self.counter.num_eager_compiles += 1
        else:
            self.counter.num_inductor_compiles += 1
        meta = self.artifact_meta(piece, shape, result, seconds)
        meta["bytes"] = len(result.artifact)
        if publish and self.store is not None:
            if key in self.mismatched:
                self._delete_mismatched(key)
            with self.monitor.timed("publish"):
                if self.store.publish(key, result.artifact, meta):
                    self.counter.num_artifacts_saved += 1
                    self.counter.bytes_saved += len(result.artifact)
        loaded = LoadedPiece(key, shape, result.fn, result.guard, "compiled")
        self.loaded[key] = loaded
        return loaded, meta
