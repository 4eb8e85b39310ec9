"""A node's compile workers share Inductor's GEMM autotune cache (`autotune_cache`), and
Inductor's failed autotune choices are counted, not logged (`inductor_metrics`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vllm_compile_ray.compiling import autotune_cache


class _Choice:
    """Stands in for an Inductor ChoiceCaller: the autotune cache keys choices by hash_key()."""

    def __init__(self, name: str) -> None:
        self.name = name

    def hash_key(self) -> str:
        return self.name


def test_failed_autotune_choices_are_counted_not_logged() -> None:
    """Inductor's `log.exception` per failed choice (a traceback each) is dropped and counted;
    its other records still log. The message is Inductor's: this fails when it moves."""
    import inspect
    import logging

    from torch._inductor import select_algorithm

    from vllm_compile_ray.compiling import inductor_metrics

    assert f'"{inductor_metrics.AUTOTUNE_FAILURE_MSG}"' in inspect.getsource(select_algorithm)
    assert select_algorithm.log.name == inductor_metrics.AUTOTUNE_FAILURE_LOGGER
    error = RuntimeError("No valid triton configs. OutOfResources: out of resource: shared memory"
                         "\nsecond line")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # torch's loggers do not propagate to pytest's caplog
    select_algorithm.log.addHandler(handler)
    level = select_algorithm.log.level
    select_algorithm.log.setLevel(logging.INFO)
    try:
        with inductor_metrics.autotune_failures() as failed:
            for choice in ("triton_mm_1", "triton_mm_2"):
                select_algorithm.log.exception(inductor_metrics.AUTOTUNE_FAILURE_MSG, error, choice,
                                               exc_info=error)
            select_algorithm.log.info("Precompiling benchmark choice %s took %.02fs", "mm", 0.1)
        with inductor_metrics.autotune_failures() as none:
            pass
    finally:
        select_algorithm.log.removeHandler(handler)
        select_algorithm.log.setLevel(level)
    assert failed == {"autotune_failed": 2, "autotune_error": "No valid triton configs. "
                      "OutOfResources: out of resource: shared memory"}
    assert none == {"autotune_failed": 0}
    assert [r.getMessage() for r in records] == ["Precompiling benchmark choice mm took 0.10s"]





def _lookup_in_process(cache_dir: str, key: str, choices: list[str], shared: bool, out: str,
                       local_cache: bool = True, lock_timeout: float | None = None,
                       asking: Any = None, entered: Any = None, release: Any = None) -> None:
    """A compile worker's GEMM lookup (in a process of its own: the locks are per process).

    Events instead of sleeps, so what the tests see does not hang on how processes get
    scheduled: `asking` is set just before the lookup, `entered` when it starts benchmarking, and
    the benchmark returns only once `release` is set."""
    import json
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import PersistentCache

    if lock_timeout is not None:
        autotune_cache.GEMM_LOCK_TIMEOUT_S = lock_timeout
    if shared:
        autotune_cache.share_gemm_timings()
    if key == "k2":  # another user of the same file, nested to another depth (pad_mm does this)
        from torch._inductor.codecache import LocalCache
        LocalCache().set_value("pad_mm", "some-key", value=True)
    benchmarked: list[str] = []

    def benchmark(chosen):
        benchmarked.append(key)
        if entered is not None:
            entered.set()
        if release is not None:
            assert release.wait(EVENT_TIMEOUT_S), "never released"
        return {c: float(len(c.name)) for c in chosen}

    if asking is not None:
        asking.set()
    with inductor_config.patch(max_autotune=True, autotune_local_cache=local_cache):
        timings = PersistentCache().lookup([_Choice(c) for c in choices], "mm", key, benchmark)
    with open(out, "w") as f:
        json.dump({"benchmarked": benchmarked, "timings": {c.name: t for c, t in timings.items()},
                   "seconds": autotune_cache.gemm_lookup_seconds()}, f)


# Generous bounds on waits for another process (spawn + torch import: seconds on a busy 2-core
# machine); hitting one is a failure (or a hang avoided), never a measurement.
EVENT_TIMEOUT_S = 120.0


def _start(spawn, tmp_path, i: int, key: str, choices: list[str], shared: bool, **kwargs):
    proc = spawn.Process(target=_lookup_in_process, args=(
        str(tmp_path / "inductor"), key, choices, shared, str(tmp_path / f"out{i}.json")),
        kwargs=kwargs)
    proc.start()
    return proc


def _finished(proc, timeout: float = EVENT_TIMEOUT_S) -> bool:
    proc.join(timeout)
    return proc.exitcode == 0


@pytest.mark.parametrize("shared", [True, False])
def test_workers_of_a_node_benchmark_a_gemm_once_and_keep_each_others_timings(tmp_path, shared):
    """Three worker processes share an Inductor cache dir. The first benchmarks GEMM key k1 and
    is held there; meanwhile a second looks up another key (and writes another kind of entry)
    and a third the same k1. Shared: k2 does not wait for k1's lock, the third waits for the
    first's timings instead of benchmarking k1 again, and the file keeps every entry. Inductor
    alone: both benchmark k1. Asserted on what each benchmarked, not on seconds."""
    import json
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    entered, release, asking = spawn.Event(), spawn.Event(), spawn.Event()
    choices = {"k1": ["a", "bb"], "k2": ["ccc"]}
    first = _start(spawn, tmp_path, 0, "k1", choices["k1"], shared, entered=entered,
                   release=release)
    try:
        assert entered.wait(EVENT_TIMEOUT_S)  # the first benchmarks k1 (under its lock if shared)
        assert _finished(_start(spawn, tmp_path, 1, "k2", choices["k2"], shared))
        third = _start(spawn, tmp_path, 2, "k1", choices["k1"], shared, asking=asking)
        if shared:  # it cannot finish before the first does: it waits for k1's lock
            assert asking.wait(EVENT_TIMEOUT_S)
            third.join(1.0)
            assert third.is_alive()
        else:  # it benchmarks k1 itself, the first still benchmarking it
            assert _finished(third)
    finally:
        release.set()
    assert _finished(first) and _finished(third)
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(3)]
    keys = ["k1", "k2", "k1"]
    assert all(o["timings"] == {c: float(len(c)) for c in choices[k]} for k, o in zip(keys, outs))
    benchmarked = [o["benchmarked"] for o in outs]
    [path] = (tmp_path / "inductor" / "cache").iterdir()  # Inductor's one timings file
    on_disk = json.loads(path.read_text())["cache"]
    precision = torch.get_float32_matmul_precision()
    if shared:
        assert benchmarked == [["k1"], ["k2"], []]
        assert set(on_disk["mm"]) == {"k1", "k2"} and on_disk["pad_mm"] == {"some-key": True}
        assert on_disk["mm"]["k1"][precision] == {"a": 1.0, "bb": 2.0}
        # the first held k1's lock while the third was seen waiting (at least that 1 s)
        assert outs[0]["seconds"]["select"] >= 1.0
    else:
        assert benchmarked == [["k1"], ["k2"], ["k1"]]


@pytest.mark.parametrize("case", ["no local cache", "stuck holder"])
def test_a_compile_does_not_wait_where_waiting_cannot_help(tmp_path, case):
    """With Inductor's local cache off there is no file to share timings through, and a holder
    past GEMM_LOCK_TIMEOUT_S is taken for stuck: in both cases the second compile benchmarks the
    GEMM itself and finishes while the first is still benchmarking it (held until then)."""
    import json
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    entered, release = spawn.Event(), spawn.Event()
    extra = {"local_cache": False} if case == "no local cache" else {"lock_timeout": 0.5}
    first = _start(spawn, tmp_path, 0, "k1", ["a"], True, entered=entered, release=release,
                   **extra)
    try:
        assert entered.wait(EVENT_TIMEOUT_S)
        assert _finished(_start(spawn, tmp_path, 1, "k1", ["a"], True, **extra))
        assert first.is_alive()
    finally:
        release.set()
    assert _finished(first)
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [o["benchmarked"] for o in outs] == [["k1"], ["k1"]]
