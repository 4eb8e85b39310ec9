"""GPU benchmarks take turns on each GPU among a node's processes (`gpu_turns`)."""

import multiprocessing
import time
import uuid

import pytest
from torch._inductor.runtime import benchmarking

from vllm_compile_ray import gpu_turns


def _hold_turns(gpu: str, times: int, hold_s: float, out) -> None:
    spans = []
    for _ in range(times):
        with gpu_turns.hold(gpu):
            began = time.time()
            time.sleep(hold_s)
            spans.append((began, time.time()))
    out.put(spans)


def _spans(gpus: list[str]) -> list[list[tuple[float, float]]]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hold_turns, args=(gpu, 3, 0.3, out)) for gpu in gpus]
    for p in procs:
        p.start()
    spans = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return spans


def _overlaps(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def test_processes_take_turns_on_one_gpu_and_not_across_gpus() -> None:
    one = f"test-{uuid.uuid4()}"
    same = _spans([one, one])
    assert not _overlaps(*same), same
    apart = _spans([f"test-{uuid.uuid4()}", f"test-{uuid.uuid4()}"])
    assert _overlaps(*apart), apart  # the same processes do run at once on two GPUs


def test_a_turn_is_reentrant_and_counts_its_wait() -> None:
    gpu = f"test-{uuid.uuid4()}"
    before = gpu_turns.wait_seconds()
    with gpu_turns.hold(gpu), gpu_turns.hold(gpu):  # benchmark helpers nest
        assert gpu_turns._lock(gpu).is_locked
    assert not gpu_turns._lock(gpu).is_locked
    assert gpu_turns.wait_seconds() >= before


@pytest.fixture
def fake_gpu(monkeypatch):
    gpu = f"test-{uuid.uuid4()}"
    monkeypatch.setattr(gpu_turns, "_current_gpu", lambda: gpu)
    yield gpu


def test_turns_go_through_torchs_benchmark_lock_hook(fake_gpu) -> None:
    previous = benchmarking.set_gpu_benchmark_lock_context(None)
    try:
        gpu_turns.take_turns(True)
        with benchmarking.maybe_gpu_benchmark_lock():
            assert gpu_turns._lock(fake_gpu).is_locked
        gpu_turns.take_turns(False)
        with benchmarking.maybe_gpu_benchmark_lock():
            assert not gpu_turns._lock(fake_gpu).is_locked
    finally:
        benchmarking.set_gpu_benchmark_lock_context(previous)


def test_without_the_hook_the_benchmarker_is_wrapped(fake_gpu, monkeypatch) -> None:
    """Torch before 2.13 (the GPU machine's 2.11) has no hook: benchmark_gpu takes the turn."""

    class Benchmarker:
        def benchmark_gpu(self, fn):
            return fn()

    monkeypatch.delattr(benchmarking, "set_gpu_benchmark_lock_context")
    monkeypatch.setattr(benchmarking, "benchmarker", Benchmarker())
    held = lambda: gpu_turns._lock(fake_gpu).is_locked  # noqa: E731
    gpu_turns.take_turns(True)
    assert benchmarking.benchmarker.benchmark_gpu(held) is True
    gpu_turns.take_turns(False)
    assert benchmarking.benchmarker.benchmark_gpu(held) is False
    gpu_turns.take_turns(True)  # wrapped once, switched back on
    assert benchmarking.benchmarker.benchmark_gpu(held) is True
