"""`thread_compile` on CPU: which of Inductor's compile paths get the codegen threads. The Triton
compiles themselves need a GPU (`benchmarks/profile_compile.py --codegen-threads N --check` on the
GPU host; `benchmarks/RESULTS.md`, session 9)."""

from __future__ import annotations

import pytest

from vllm_compile_ray import thread_compile


@pytest.fixture()
def inductor_state():
    from torch._inductor import config
    from torch._inductor.async_compile import AsyncCompile

    before = config.compile_threads
    yield config, AsyncCompile
    thread_compile.use_codegen_threads(0)
    config.compile_threads = before


def test_only_codegen_uses_the_threads(inductor_state) -> None:
    from torch._inductor.codegen.triton import TritonScheduling

    config, async_compile = inductor_state
    config.compile_threads = 1
    pool = thread_compile.use_codegen_threads(3)
    assert thread_compile.installed() is pool and pool.threads == 3
    assert config.compile_threads > 1  # else Inductor never waits on the kernels' futures
    assert async_compile.process_pool() is pool
    # GEMM template choices and fusion benchmarks ask outside codegen: as with one thread
    assert not async_compile.use_process_pool()
    seen = []

    def define_kernel(self, src_code, node_schedule, kernel):  # asks as Inductor's does
        seen.append(async_compile.use_process_pool())
        return "kernel_0"

    original, thread_compile._originals["define_kernel"] = (
        thread_compile._originals["define_kernel"], define_kernel)
    try:
        assert TritonScheduling.define_kernel(None, "src", [], None) == "kernel_0"
    finally:
        thread_compile._originals["define_kernel"] = original
    assert seen == [True] and not async_compile.use_process_pool()
    assert pool.submit(sum, [1, 2]).result() == 3 and pool.kernels == 0  # not a Triton job

    thread_compile.use_codegen_threads(0)
    assert thread_compile.installed() is None and config.compile_threads == 1
    assert thread_compile.use_codegen_threads(0) is None


@pytest.mark.parametrize("bad", [-1, True, 2.0, "4"])
def test_bad_thread_counts_are_refused(inductor_state, bad) -> None:
    with pytest.raises(ValueError, match=r"codegen compile threads must be an int >= 0, got"):
        thread_compile.use_codegen_threads(bad)
    assert thread_compile.installed() is None


def test_compile_tasks_use_the_threads_on_cuda_only(inductor_state) -> None:
    from vllm_compile_ray.compile_task import set_compile_threads

    config, _ = inductor_state
    set_compile_threads(1.0, "cuda", 4)  # installs without a GPU: nothing compiles here
    assert thread_compile.installed().threads == 4 and config.compile_threads == 4
    config.compile_threads = 1  # as `inductor.set_compile_threads(1)` would, between two tasks
    set_compile_threads(1.0, "cuda", 4)
    assert config.compile_threads == 4  # else Inductor would bypass the threads
    set_compile_threads(2.0, "cpu", 4)  # CPU kernels are C++: the task's CPUs decide
    assert thread_compile.installed() is None and config.compile_threads == 2
    set_compile_threads(1.0, "cuda", 0)
    assert thread_compile.installed() is None and config.compile_threads == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_warm_refuses_bad_codegen_threads_before_starting_ray(tmp_path, bad) -> None:
    from vllm_compile_ray import CompilationConfig
    from vllm_compile_ray.errors import ConfigError
    from vllm_compile_ray.warm import warm

    config = CompilationConfig(backend="eager", use_inductor=False, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"codegen_threads=.* is invalid: an int >= 0"):
        warm("llama-tiny", config, device_type="cpu", codegen_threads=bad, progress=None)
    assert not list(tmp_path.iterdir())  # nothing written
