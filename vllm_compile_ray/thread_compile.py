"""Inductor's parallel Triton compiles on threads of the compiling process.

With more than one compile thread, Inductor compiles kernels ahead of need through `AsyncCompile`:
GEMM template choices, the fused kernels it benchmarks while choosing epilogue fusions, and every
kernel of the generated code as codegen defines it. It sends them to a pool of processes, which
it only uses once the pool has answered a first job, and which a compile task of one CPU cannot
afford. With one compile thread, the template choices still compile on threads (select_algorithm
has its own thread pool) but the fusion candidates and the final kernels compile one by one in the
main thread: 3–5 s of a 16 s max-autotune compile of a layer piece on an H200 host.

`use_compile_threads(n)` hands `AsyncCompile` a pool of n threads of this process instead, ready
at once: Triton's front end holds the GIL, but its LLVM passes and ptxas run in parallel (the same
reason select_algorithm precompiles templates on threads). A job compiles its kernel from a
module of its own, as a process-pool worker would, so kernels that Inductor loads and benchmarks
in the main thread are never touched by a compile thread. CUDA only: CPU kernels are C++ and go
through `AsyncCompile`'s own thread pool already.

This is the one module that replaces part of Inductor; `inductor.py` holds the other calls.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_lock = threading.Lock()
_installed: "ThreadCompilePool | None" = None
_original_process_pool: Any = None


class ThreadCompilePool:
    """What `AsyncCompile.process_pool()` returns once installed: `submit` and `shutdown`."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.kernels = 0  # Triton compiles submitted (tests and benchmarks read it)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="vcr-kernel-compile")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        from torch._inductor.runtime.compile_tasks import _worker_compile_triton

        if fn is _worker_compile_triton:
            fn = _compile_triton_apart
            with _lock:
                self.kernels += 1
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, **_: Any) -> None:
        self._executor.shutdown(wait=wait)


def _compile_triton_apart(load_kernel: functools.partial, extra_env: dict[str, str],
                          extra_config: dict[str, Any]) -> tuple[Any, int]:
    """`_worker_compile_triton` on a thread: compile the kernel of `load_kernel` (a partial of
    kernel name and source) from a module of its own, and return it as a worker would (after
    `prepare_for_pickle`, so the main thread finishes it as it does a worker's result).

    extra_env and extra_config carry the main process's own values to a worker process; a thread
    already shares them (and patching Inductor's config from several threads would race)."""
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.runtime.compile_tasks import _reload_python_module, _set_triton_ptxas_path

    kernel_name, source_code = load_kernel.args
    key, path = PyCodeCache.write(source_code)
    kernel = getattr(_reload_python_module(key, path, set_sys_modules=False), kernel_name)
    start = time.time_ns()
    _set_triton_ptxas_path()
    kernel.precompile(warm_cache_only=True)
    elapsed_us = (time.time_ns() - start) // 1000
    kernel.prepare_for_pickle()
    return kernel, elapsed_us


def use_compile_threads(threads: int) -> ThreadCompilePool | None:
    """Inductor's Triton compiles in this process on `threads` threads (see the module doc);
    1 restores Inductor's own behaviour with one compile thread. Returns the installed pool.

    Sets Inductor's `compile_threads` (left out of the environment fingerprint, so keys do not
    change). Raises ValueError for fewer than one thread.
    """
    global _installed, _original_process_pool
    from torch._inductor import config as inductor_config
    from torch._inductor.async_compile import AsyncCompile

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"kernel compile threads must be an int >= 1, got {threads!r}")
    if _installed is not None and _installed.threads == threads:
        return _installed
    with _lock:
        previous, _installed = _installed, None
    if previous is not None:
        AsyncCompile.process_pool = _original_process_pool
        AsyncCompile._ready_future = None
        previous.shutdown(wait=False)
    inductor_config.compile_threads = threads
    if threads == 1:
        return None
    pool = ThreadCompilePool(threads)
    if _original_process_pool is None:
        _original_process_pool = AsyncCompile.__dict__["process_pool"]

    @functools.lru_cache(1)  # Inductor calls cache_clear() on it after a fork
    def process_pool() -> ThreadCompilePool:
        return pool

    AsyncCompile.process_pool = staticmethod(process_pool)
    ready: Future = Future()
    ready.set_result("ready")
    AsyncCompile._ready_future = ready  # no first job to wait for: threads are ready
    with _lock:
        _installed = pool
    return pool


def installed() -> ThreadCompilePool | None:
    """The pool `use_compile_threads` installed in this process, if any."""
    return _installed
