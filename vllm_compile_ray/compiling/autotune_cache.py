"""Inductor's GEMM autotune cache: timings a tune task measured, installed where a compile's
GEMM selections look, and shared by the compile workers of a node.

Inductor keeps GEMM timings in one JSON file per cache directory (op -> inputs key -> float32
matmul precision -> choice hash -> ms), beside other passes' cached decisions. With
`inductor.py` and `retarget.py`, the modules that read Inductor's internals.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import torch

# How long a compile waits for another worker's benchmark of the same GEMM before benchmarking
# it itself (one GEMM benchmarks in seconds; a stuck holder must not stall the node's compiles).
GEMM_LOCK_TIMEOUT_S = 120.0

# Seconds this process spent in shared GEMM lookups (`share_gemm_timings`): waiting for the lock
# (another worker benchmarking the same GEMM), and under it (a cache hit, or a benchmark here).
_LOOKUP_SECONDS = {"wait": 0.0, "select": 0.0}


def gemm_timings(compile_fn: Callable[[], Any], private: bool = True
                 ) -> tuple[dict[str, Any], int]:
    """Run `compile_fn` (one compile) in a fresh, private Inductor cache; return the GEMM autotune
    timings Inductor recorded there (its local autotune cache: op -> inputs key -> float32
    matmul precision -> choice hash -> ms) and how many GEMM selections it benchmarked.

    private=False compiles in this process's Inductor cache instead, shared with the node's
    compile workers (`share_gemm_timings`): the timings stay there, where their GEMM lookups
    read them, and none are returned."""
    from torch._inductor.codecache import PersistentCache
    from torch._inductor.utils import fresh_cache

    before = gemm_benchmarks()
    if not private:
        share_gemm_timings()
        compile_fn()
        return {}, gemm_benchmarks() - before
    with fresh_cache():
        compile_fn()
        timings = PersistentCache().get_local_cache()
    return timings, gemm_benchmarks() - before


def install_gemm_timings(timings: dict[str, Any]) -> int:
    """Merge `gemm_timings` results into this process's Inductor autotune cache, where the next
    compile's GEMM selections look first; returns how many choice timings were new."""
    from torch._inductor.codecache import PersistentCache

    cache = PersistentCache()
    local = cache.get_local_cache()
    added = merge_timings(local, timings)
    if added:
        cache.update_local_cache(local)
    return added


def merge_timings(into: dict[str, Any], timings: dict[str, Any]) -> int:
    """Add the choice timings of `timings` missing from `into` (both `gemm_timings` results);
    returns how many were added."""
    added = 0
    for op, by_inputs in timings.items():
        for inputs, by_precision in by_inputs.items():
            for precision, by_choice in by_precision.items():
                have = into.setdefault(op, {}).setdefault(inputs, {}).setdefault(precision, {})
                new = {c: t for c, t in by_choice.items() if c not in have}
                have.update(new)
                added += len(new)
    return added


def share_gemm_timings() -> None:
    """Make GEMM autotuning in this process cooperate with every process sharing its Inductor
    cache directory (the compile workers of one node). Idempotent.

    Inductor keeps GEMM timings in one file per cache directory and rewrites it whole from the
    writer's own view, so concurrent compiles drop each other's timings, and two compiles that
    need the same GEMM at the same shape (the layer and the last piece share three) both
    benchmark it. With this, a lookup that would benchmark holds a lock per GEMM and input key and
    re-reads the file first: the second compile waits for the first one's timings instead of
    benchmarking again on the same GPU, as a single process would find them in its cache; and
    each write to that file (GEMM timings and Inductor's other cached decisions) merges into
    what it holds, under a lock of its own.
    """
    from filelock import FileLock, Timeout
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import CacheBase, PersistentCache, get_lock_dir

    if getattr(PersistentCache, "_vcr_shared", False):
        return
    lookup, update = PersistentCache.lookup, CacheBase.update_local_cache

    def shared_lookup(self: Any, choices: Any, op: str, inputs: str, benchmark: Any,
                      hint_override: int | None = None) -> Any:
        # A cache check only, or no file to share through: nothing to wait for.
        if benchmark is None or not inductor_config.autotune_local_cache:
            return lookup(self, choices, op, inputs, benchmark, hint_override)
        key = hashlib.sha256(repr((op, inputs, hint_override,
                                   torch.get_float32_matmul_precision())).encode()).hexdigest()
        lock = FileLock(os.path.join(get_lock_dir(), f"vcr-gemm-{key[:32]}.lock"))
        asked = time.perf_counter()
        try:
            lock.acquire(timeout=GEMM_LOCK_TIMEOUT_S)
        except Timeout:  # the holder is stuck: benchmark here rather than wait on
            return lookup(self, choices, op, inputs, benchmark, hint_override)
        got = time.perf_counter()
        _LOOKUP_SECONDS["wait"] += got - asked
        try:
            return lookup(self, choices, op, inputs, benchmark, hint_override)
        finally:
            lock.release()
            _LOOKUP_SECONDS["select"] += time.perf_counter() - got

    def merged_update(self: Any, local_cache: dict[str, Any]) -> None:
        # The file also holds other passes' entries (pad_mm, fusion decisions: CacheBase's
        # other users), nested to other depths: merge generically, the writer's values win.
        with FileLock(os.path.join(get_lock_dir(), "vcr-local-cache.lock")):
            current = self.get_local_cache()
            _merge_nested(current, local_cache)
            update(self, current)

    PersistentCache.lookup = shared_lookup
    CacheBase.update_local_cache = merged_update
    PersistentCache._vcr_shared = True


def _merge_nested(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge_nested(into[key], value)
        else:
            into[key] = value


def count_timings(timings: dict[str, Any]) -> int:
    """How many choice timings a `gemm_timings` result holds."""
    return sum(len(by_choice) for by_inputs in timings.values()
               for by_precision in by_inputs.values() for by_choice in by_precision.values())


def gemm_lookup_seconds() -> dict[str, float]:
    """Seconds this process has spent so far in GEMM selections shared with its node
    (`share_gemm_timings`): "wait", for another worker's benchmark of the same GEMM; "select",
    looking up or benchmarking under the GEMM's lock."""
    return dict(_LOOKUP_SECONDS)


def gemm_benchmarks() -> int:
    """GEMM selections this process has benchmarked so far (Inductor's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["select_algorithm_autotune"])
