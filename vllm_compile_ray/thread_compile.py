"""The final Triton kernels of a compile, compiled on threads while codegen goes on.

With one compile thread (a Ray compile task of one CPU), Inductor compiles each kernel of the
generated code in turn as the wrapper module loads: 3–5 s of a 14–16 s max-autotune compile of
a layer piece on an H200 host, and that compile bounds a warm run. With more compile threads
it sends every kernel to a pool of processes as codegen defines it, but it also sends GEMM
template choices there (which, with one thread, compile on as many threads as the node has
cores) and only uses the pool once the pool has answered a first job.

`use_codegen_threads(n)` keeps everything else as with one compile thread and hands only the
kernels that codegen defines to n threads of this process, ready at once: each compiles its
kernel from a module of its own, as a pool process would, and the main thread finishes it as it
does a pool's result. Triton's front end holds the GIL; its LLVM passes and ptxas do not.
Measured in `benchmarks/RESULTS.md` (session 9). CUDA only: CPU kernels are C++.

This is the one module that replaces part of Inductor; `inductor.py` holds the other calls.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# warm()'s default: measured on a 4×H200 host with 33 compiles at once, 4 threads shortened the
# longest compile (17.0 → 14.9 s) and 8 lengthened it (RESULTS.md, session 9).
DEFAULT_THREADS = 4

_lock = threading.Lock()
_state = threading.local()  # .codegen: this thread is inside TritonScheduling.define_kernel
_installed: "CodegenThreads | None" = None
_originals: dict[str, Any] = {}


class CodegenThreads:
    """What `AsyncCompile.process_pool()` returns once installed: `submit` and `shutdown`."""

    def __init__(self, threads: int, replaced_compile_threads: int | None) -> None:
        self.threads = threads
        self.replaced_compile_threads = replaced_compile_threads  # restored when turned off
        self.kernels = 0  # kernels handed to the threads (tests and benchmarks read it)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="vcr-codegen-compile")

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
    kernel name and source) from a module of its own, and return it as a pool process would
    (after `prepare_for_pickle`). extra_env and extra_config carry the main process's values to
    a pool process; a thread already shares them."""
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


def _patch() -> None:
    """Once per process: Inductor's pool is used only inside TritonScheduling.define_kernel."""
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.codegen.triton import TritonScheduling

    if _originals:
        return
    _originals.update(process_pool=AsyncCompile.__dict__["process_pool"],
                      use_process_pool=AsyncCompile.__dict__["use_process_pool"],
                      define_kernel=TritonScheduling.define_kernel)
    use_pool = _originals["use_process_pool"].__func__

    def use_process_pool(cls: type) -> bool:
        if _installed is None:
            return use_pool(cls)
        return bool(getattr(_state, "codegen", False)) and use_pool(cls)

    @functools.wraps(_originals["define_kernel"])
    def define_kernel_in_threads(self: Any, *args: Any, **kwargs: Any) -> Any:
        before, _state.codegen = getattr(_state, "codegen", False), True
        try:
            return _originals["define_kernel"](self, *args, **kwargs)
        finally:
            _state.codegen = before

    @functools.lru_cache(1)  # Inductor calls cache_clear() on it after a fork
    def process_pool() -> Any:
        return _installed if _installed is not None else _originals["process_pool"].__func__()

    AsyncCompile.use_process_pool = classmethod(use_process_pool)
    AsyncCompile.process_pool = staticmethod(process_pool)
    TritonScheduling.define_kernel = define_kernel_in_threads


def use_codegen_threads(threads: int) -> CodegenThreads | None:
    """Compile the kernels that codegen defines on `threads` threads of this process (see the
    module doc); 0 turns it off (Inductor's own behaviour and compile threads again).
    Sets Inductor's `compile_threads` above one while on (it is left out of the environment
    fingerprint: keys do not change). Returns the installed pool. Raises ValueError for a
    negative or non-int count."""
    global _installed
    from torch._inductor import config as inductor_config
    from torch._inductor.async_compile import AsyncCompile

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"codegen compile threads must be an int >= 0, got {threads!r}")
    if threads == 0 and _installed is None:
        return None  # nothing to undo; Inductor stays unpatched where it was never on
    if _installed is not None and _installed.threads == threads:
        if inductor_config.compile_threads < 2:  # set since by someone else
            inductor_config.compile_threads = max(2, threads)
        return _installed
    with _lock:
        _patch()
        previous, _installed = _installed, None
        AsyncCompile.process_pool.cache_clear()
        AsyncCompile._ready_future = None
    if previous is not None:
        previous.shutdown(wait=False)
        inductor_config.compile_threads = previous.replaced_compile_threads
    if threads == 0:
        return None
    pool = CodegenThreads(threads, inductor_config.compile_threads)
    inductor_config.compile_threads = max(2, threads)  # > 1: Inductor waits on the futures
    ready: Future = Future()
    ready.set_result("ready")
    with _lock:
        _installed = pool
        AsyncCompile._ready_future = ready  # no first job to wait for: threads are ready
    return pool


def installed() -> CodegenThreads | None:
    """The pool `use_codegen_threads` installed in this process, if any."""
    return _installed
