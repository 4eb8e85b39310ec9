"""Inductor's GPU benchmarks take turns on each GPU among the processes of a node.

Several compile workers share a GPU (a fraction each), and max-autotune benchmarks on it: GEMM
template choices, epilogue fusions, the runtime autotuning of the first call. Without MPS a GPU
runs one process's context at a time, in time slices, so a benchmark's short kernels and its
synchronizations wait through the other contexts' slices and its timings take theirs in.
Measured on 4xH200 (`profile_compile.py`, the layer piece of llama-3-8b at 512, max-autotune, one
compile thread): alone 8.5 s, GEMM benchmarks 0.3-0.6 s each; nine at once on one GPU 24.4-26.4 s,
GEMM benchmarks 1.5-6.0 s each and Scheduler.__init__ (fusion benchmarks) 16.5 s instead of 2.2 s;
the same nine spread over four GPUs 13.6-15.3 s.

With turns, each benchmark call (one choice: tens of milliseconds) holds a node-wide lock of its
GPU, so it runs with the GPU to itself, as in a process alone: the other processes go on with
their CPU work (lowering, Triton compiles, code generation) and queue only for the GPU. Torch
2.13 has a hook for exactly this (`set_gpu_benchmark_lock_context`); older torch gets the same
lock around its benchmarker's `benchmark_gpu`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A benchmark call takes milliseconds; a holder this late is stuck (its process is not: a dead
# process's lock is released by the kernel), and a compile benchmarks without its turn.
TURN_TIMEOUT_S = 120.0

LOCK_DIR = os.path.join(tempfile.gettempdir(), "vllm_compile_ray-gpu-turns")

_SECONDS = {"wait": 0.0}  # this process's seconds waiting for turns (`wait_seconds`)
_uuids: dict[int, str] = {}  # CUDA device index -> the GPU's UUID
_locks: dict[str, Any] = {}  # GPU UUID -> its FileLock


def take_turns(enabled: bool = True) -> None:
    """From now on, this process's Inductor GPU benchmarks take turns with the node's other
    processes on their GPU (enabled), or do not. Cheap; a worker calls it before each compile."""
    from torch._inductor.runtime import benchmarking

    hook = getattr(benchmarking, "set_gpu_benchmark_lock_context", None)
    if hook is not None:
        hook(_turn if enabled else None)
        return
    # torch < 2.13 (the GPU machine runs 2.11) has no hook: wrap the benchmarker's benchmark_gpu,
    # through which its benchmark() and the autotuners' calls go.
    bench = benchmarking.benchmarker
    if not hasattr(bench, "_vcr_benchmark_gpu"):
        inner = bench.benchmark_gpu

        def benchmark_gpu(*args: Any, **kwargs: Any) -> Any:
            with _turn() if bench._vcr_turns else nullcontext():
                return inner(*args, **kwargs)

        bench._vcr_benchmark_gpu = inner
        bench.benchmark_gpu = benchmark_gpu
    bench._vcr_turns = enabled


def wait_seconds() -> float:
    """Seconds this process has waited so far for its turns on a GPU."""
    return _SECONDS["wait"]


@contextmanager
def _turn() -> Iterator[None]:
    """Hold the current CUDA device's turn."""
    with hold(_current_gpu()):
        yield


@contextmanager
def hold(gpu: str) -> Iterator[None]:
    """Hold the turn of the GPU with UUID `gpu` on this node (re-entrant within a thread)."""
    from filelock import Timeout

    lock = _lock(gpu)
    asked = time.perf_counter()
    try:
        lock.acquire(timeout=TURN_TIMEOUT_S)
    except Timeout:
        logger.warning("no GPU benchmark turn within %.0f s (%s): benchmarking without it",
                       TURN_TIMEOUT_S, lock.lock_file)
        yield
        return
    _SECONDS["wait"] += time.perf_counter() - asked
    try:
        yield
    finally:
        lock.release()


def _current_gpu() -> str:
    """The UUID of this process's current CUDA device (processes of a node see their GPUs under
    other indices)."""
    index = torch.cuda.current_device()
    if index not in _uuids:
        _uuids[index] = str(torch.cuda.get_device_properties(index).uuid)
    return _uuids[index]


def _lock(gpu: str) -> Any:
    from filelock import FileLock

    if gpu not in _locks:
        os.makedirs(LOCK_DIR, exist_ok=True)
        _locks[gpu] = FileLock(os.path.join(LOCK_DIR, f"gpu-{gpu}.lock"))
    return _locks[gpu]
