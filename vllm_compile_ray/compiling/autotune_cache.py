"""Inductor's GEMM autotune cache shared by the compile workers of a node: one benchmark of a
GEMM per node, and no worker's write dropping another's timings.

Inductor keeps GEMM timings in one JSON file per cache directory (op -> inputs key -> float32
matmul precision -> choice hash -> ms), beside other passes' cached decisions. With
`inductor.py` and `retarget.py`, the modules that read Inductor's internals.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import torch

# How long a compile waits for another worker's benchmark of the same GEMM before benchmarking
# it itself (one GEMM benchmarks in seconds; a stuck holder must not stall the node's compiles).
GEMM_LOCK_TIMEOUT_S = 120.0

# Seconds this process spent in shared GEMM lookups (`share_gemm_timings`): waiting for the lock
# (another worker benchmarking the same GEMM), and under it (a cache hit, or a benchmark here).
_LOOKUP_SECONDS = {"wait": 0.0, "select": 0.0}


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


def gemm_lookup_seconds() -> dict[str, float]:
    """Seconds this process has spent so far in GEMM selections shared with its node
    (`share_gemm_timings`): "wait", for another worker's benchmark of the same GEMM; "select",
    looking up or benchmarking under the GEMM's lock."""
    return dict(_LOOKUP_SECONDS)


def gemm_benchmarks() -> int:
    """GEMM selections this process has benchmarked so far (Inductor's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["select_algorithm_autotune"])
