"""What Inductor did in this process inside a block, read from its timers, logs and Triton's
compile listener: phase seconds of a compile, GEMM autotune choices that failed, and the kernel
compiles and autotunes of a rank's startup (0 when its artifacts were complete).

tests/test_torch_contract.py, tests/test_load.py and tests/test_inductor_cache.py fail when the
names it relies on move.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def phase_times() -> Iterator[dict[str, float]]:
    """Seconds Inductor's phase timers (`dynamo_timed`: lowering, scheduling, GEMM template
    precompiling and autotuning, wrapper codegen, saving ...) recorded in this process inside the
    block, by phase name; nested phases count in their parents too. Filled when the block ends."""
    from torch._dynamo.utils import compilation_time_metrics

    before = {name: len(times) for name, times in compilation_time_metrics.items()}
    out: dict[str, float] = {}
    try:
        yield out
    finally:
        for name, times in list(compilation_time_metrics.items()):
            new = times[before.get(name, 0):]
            if new:
                out[name] = round(sum(new), 4)


def gemm_benchmarks() -> int:
    """GEMM selections this process has benchmarked so far (Inductor's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["select_algorithm_autotune"])


# Inductor logs every GEMM template choice whose precompile failed with `log.exception`: on a GPU
# smaller than the templates assume ("No valid triton configs. OutOfResources: out of resource:
# shared memory ..."), dozens of full tracebacks per compile in a job log, though the choice is
# only skipped. Checked on torch 2.11 and 2.13 (select_algorithm.py, precompile's
# `wait_on_futures`); tests/test_inductor_metrics.py fails when the message moves.
AUTOTUNE_FAILURE_LOGGER = "torch._inductor.select_algorithm"
AUTOTUNE_FAILURE_MSG = "Exception %s for benchmark choice %s"


class _AutotuneFailures(logging.Filter):
    """Drops those records from the logger, counting them and keeping the last one's error."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.last = 0, ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != AUTOTUNE_FAILURE_MSG:
            return True
        self.count += 1
        error = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        self.last = (error.strip().splitlines() or [""])[0][:300]
        return False


@functools.cache
def _autotune_failure_filter() -> _AutotuneFailures:
    failures = _AutotuneFailures()
    logging.getLogger(AUTOTUNE_FAILURE_LOGGER).addFilter(failures)
    return failures


@contextmanager
def autotune_failures() -> Iterator[dict[str, Any]]:
    """GEMM autotune choices that failed to precompile inside the block ("autotune_failed") and
    the last one's error ("autotune_error", when any), counted instead of logged with their
    tracebacks; filled when the block ends."""
    failures = _autotune_failure_filter()
    before = failures.count
    out: dict[str, Any] = {}
    try:
        yield out
    finally:
        out["autotune_failed"] = failures.count - before
        if out["autotune_failed"]:
            out["autotune_error"] = failures.last


# What loaded artifacts still compile or tune when they run (a complete artifact does neither):
# the names of Inductor's phase timers for one C++ compiler run (cpp_builder.py) and for a Triton
# kernel's autotuning at its first call (runtime/triton_heuristics.py), checked on torch 2.11 and
# 2.13, and Triton's compile listener (`triton.knobs.compilation.listener`, Triton >= 3.4: called
# by every `triton.compile`, with cache_hit=False when it compiled). A process's first C++ kernel
# load also preprocesses the precompiled header once (codecache.py `_precompile_header`, a
# functools.cache: its misses), kernels built or not: not a kernel compile. tests/test_load.py
# fails when these move.
_KERNEL_BUILD_TIMERS = ("compile_file",)
_AUTOTUNE_TIMERS = ("CachingAutotuner.benchmark_all_configs",
                    "CachingAutotuner.coordinate_descent_tuning")
_GEMM_AUTOTUNE_TIMER_SUFFIX = "_template_autotuning"  # mm_, addmm_, bmm_ (select_algorithm.py)


class _TritonCompiles:
    """Counts the Triton compiles of this process that missed Triton's cache; calls the listener
    installed before it."""

    def __init__(self, before: Callable | None) -> None:
        self.before, self.count = before, 0

    def __call__(self, **kwargs: Any) -> None:
        if not kwargs.get("cache_hit", False):
            self.count += 1
        if self.before is not None:
            self.before(**kwargs)


@functools.cache
def _triton_compiles() -> _TritonCompiles | None:
    try:
        from triton import knobs
    except ImportError:  # no Triton (a CPU build), or one older than 3.4
        return None
    compilation = getattr(knobs, "compilation", None)
    if compilation is None or not hasattr(compilation, "listener"):
        return None
    listener = _TritonCompiles(compilation.listener)
    compilation.listener = listener
    return listener


def _header_preprocessings() -> int:
    from torch._inductor import codecache

    info = getattr(codecache._precompile_header, "cache_info", None)
    return info().misses if info is not None else 0


@contextmanager
def kernel_work() -> Iterator[dict[str, int]]:
    """Kernel compiles and autotunes in this process inside the block, filled when it ends:
    "kernel_compiles" (Triton compiles that missed Triton's cache, C++ kernel builds) and
    "autotunes" (Triton kernels benchmarked over their configs, coordinate descent runs, GEMM
    autotunes). Kernels compile in this process inside the block (compile_threads=1), where
    they are seen: Inductor's compile subprocesses would hide them."""
    from torch._dynamo.utils import compilation_time_metrics
    from torch._inductor import config as inductor_config

    def timed(names: tuple[str, ...]) -> int:
        return sum(len(compilation_time_metrics.get(name, ())) for name in names)

    def builds() -> int:  # C++ compiler runs, less the precompiled header's preprocessing
        return timed(_KERNEL_BUILD_TIMERS) - _header_preprocessings()

    def gemm_tunes() -> int:  # "<op>_template_autotuning" timers: a counter would not do, an
        # FX graph cache hit replays the counters its compile recorded (63 "autotunes" of a
        # loader that tuned nothing, measured)
        return sum(len(v) for k, v in compilation_time_metrics.items()
                   if k.endswith(_GEMM_AUTOTUNE_TIMER_SUFFIX))

    triton = _triton_compiles()
    built, tunes, gemms = builds(), timed(_AUTOTUNE_TIMERS), gemm_tunes()
    compiled = triton.count if triton else 0
    out: dict[str, int] = {}
    try:
        with inductor_config.patch(compile_threads=1):
            yield out
    finally:
        out["kernel_compiles"] = (builds() - built
                                  + ((triton.count if triton else 0) - compiled))
        out["autotunes"] = timed(_AUTOTUNE_TIMERS) - tunes + gemm_tunes() - gemms
