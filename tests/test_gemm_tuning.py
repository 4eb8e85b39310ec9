"""GEMM tuning fan-out without Ray: problems found in pieces, tune tasks, Inductor's cache contract.

The speed-up itself needs a GPU (CPU compiles of pieces that take weights as inputs have one GEMM
choice, so nothing is benchmarked): `benchmarks/bench_gemm_tuning.py` and `bench_warm.py`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vllm_compile_ray import CompilationConfig, models

from vllm_compile_ray.compiling import autotune_cache

from vllm_compile_ray.orchestration import gemm_tuning
from vllm_compile_ray.runtime.api import example_args, key_context
from vllm_compile_ray.compiling.compiler_interface import make_compiler
from vllm_compile_ray.planning.plan import capture, plan_graph


def llama_tasks(sizes: tuple[int, ...] = (8, 16), dynamic: bool = True, layers: int = 3):
    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=sizes,
                               compile_dynamic=dynamic)
    module = models.build("llama-tiny", 1, 0, device="meta", num_layers=layers)
    plan = plan_graph(capture(module, example_args(device="meta")), config,
                      key_context(config, make_compiler(config), "cuda", {"fp": "test"}), "cuda")
    return plan.tasks()


def test_every_matmul_of_a_piece_becomes_a_one_op_problem() -> None:
    pieces = {t.code_id: t.piece for t in llama_tasks()}
    found = {code_id: gemm_tuning.gemm_problems(piece, "cuda") for code_id, piece in pieces.items()}
    counts = sorted(len(p) for p in found.values())
    # first piece: qkv; last: o_proj, gate_up, down (+ o_proj and down with their residual add);
    # a layer piece: all four (+ the two residual adds)
    assert counts == [1, 5, 6]
    layer = max(found.values(), key=len)
    for problem in layer:
        body = [line.strip() for line in problem.piece.code.strip().splitlines()[1:-1]]
        assert body[0].startswith("linear = torch._C._nn.linear(arg0, arg1")
        assert len(body) in (1, 2) and (len(body) == 1 or body[1].startswith("add = linear + arg2"))
        x, w = problem.piece.input_specs[:2]
        assert x.shape[0] == "s0" and isinstance(w.shape[0], int)  # tokens stay symbolic
        assert {s.device_type for s in problem.piece.input_specs} == {"cuda"}
    # the same GEMM in two pieces is one problem
    ids = [{p.problem_id for p in problems} for problems in found.values()]
    assert set.intersection(*sorted(ids, key=len)[1:]) and len(set.union(*ids)) == 6


def test_problem_ids_are_stable_across_plans() -> None:
    first = {p.problem_id for t in llama_tasks() for p in gemm_tuning.gemm_problems(t.piece, "cuda")}
    again = {p.problem_id for t in llama_tasks(layers=4)
             for p in gemm_tuning.gemm_problems(t.piece, "cuda")}
    assert first == again


def test_tune_tasks_are_unique_biggest_first_and_skip_small_sizes() -> None:
    todo = llama_tasks(sizes=(1, 4, 8, 16))
    tunes, needs = gemm_tuning.tune_tasks(todo, "cuda")
    names = [t.name for t in tunes]
    assert len(names) == len(set(names)) == 6 * 3  # 6 problems x (dynamic, 16, 8)
    assert [t.shape for t in tunes[:6]] == ["dynamic"] * 6 and tunes[-1].shape == 8
    assert {t.shape for t in tunes} == {"dynamic", 16, 8}  # below MIN_TUNED_SIZE: not tuned
    for task in todo:
        wanted = needs.get(task.key, [])
        if isinstance(task.shape, int) and task.shape < gemm_tuning.MIN_TUNED_SIZE:
            assert wanted == []
        else:
            assert wanted and all(n.endswith(f"/{task.shape}]") for n in wanted)
            assert set(wanted) <= set(names)


def test_a_piece_without_matmuls_has_no_problems() -> None:
    class NoGemm(torch.nn.Module):
        def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return (ids * 2 + positions).float().relu()

    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(8,))
    plan = plan_graph(capture(NoGemm(), example_args(device="meta")), config,
                      key_context(config, make_compiler(config), "cpu", {"fp": "test"}), "cpu")
    tunes, needs = gemm_tuning.tune_tasks(plan.tasks(), "cpu")
    assert tunes == [] and all(v == [] for v in needs.values())


class _Choice:
    """Stands in for an Inductor ChoiceCaller: the autotune cache keys choices by hash_key()."""

    def __init__(self, name: str) -> None:
        self.name = name

    def hash_key(self) -> str:
        return self.name


def test_installed_timings_are_what_inductors_gemm_lookup_reads() -> None:
    """Inductor's own lookup finds installed timings and never calls its benchmark; a choice
    without a timing makes it benchmark (the compile then tunes that GEMM itself)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import PersistentCache

    precision = torch.get_float32_matmul_precision()
    shipped = {"mm": {"inputs-a": {precision: {"c1": 0.5, "c2": 0.25}}}}
    calls: list[int] = []

    def benchmark(choices):
        calls.append(len(choices))
        return {c: 1.0 for c in choices}

    def compile_fn() -> None:
        assert autotune_cache.install_gemm_timings(shipped) == 2
        assert autotune_cache.install_gemm_timings(shipped) == 0  # already there
        with inductor_config.patch(max_autotune=True, autotune_local_cache=True):
            cache = PersistentCache()
            hit = cache.lookup([_Choice("c1"), _Choice("c2")], "mm", "inputs-a", benchmark)
            assert {c.name: t for c, t in hit.items()} == {"c1": 0.5, "c2": 0.25}
            assert calls == []
            cache.lookup([_Choice("c1"), _Choice("c3")], "mm", "inputs-a", benchmark)
            assert calls == [2]

    timings, _ = autotune_cache.gemm_timings(compile_fn)
    # what a tune task would ship: every timing of its private cache; on a partial miss Inductor
    # re-benchmarked the whole choice set (c1 measured again) and added c3
    assert autotune_cache.count_timings(timings) == 3
    assert timings["mm"]["inputs-a"][precision] == {"c1": 1.0, "c2": 0.25, "c3": 1.0}


def test_merge_keeps_existing_timings() -> None:
    into = {"mm": {"k": {"highest": {"a": 1.0}}}}
    added = autotune_cache.merge_timings(into, {"mm": {"k": {"highest": {"a": 9.0, "b": 2.0}}},
                                          "addmm": {"j": {"highest": {"c": 3.0}}}})
    assert added == 2
    assert into == {"mm": {"k": {"highest": {"a": 1.0, "b": 2.0}}},
                    "addmm": {"j": {"highest": {"c": 3.0}}}}


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


@pytest.mark.inductor
def test_tune_compiles_the_problem_and_reports(tmp_path, monkeypatch) -> None:
    """A real Inductor compile of one problem on CPU: a row, no exception; CPU has one choice
    for a matmul whose weight is an input, so nothing was benchmarked. A private tune ("ahead")
    leaves the process's Inductor cache as it was; a shared one ("alongside") compiles there,
    with the node's GEMM lookups shared, so its timings stay where the compiles look."""
    from torch._inductor.codecache import PersistentCache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "node"))
    todo = llama_tasks(sizes=(8,), dynamic=False, layers=2)
    tunes, _ = gemm_tuning.tune_tasks(todo, "cpu")
    plain = next(t for t in tunes if len(t.problem.piece.input_specs) == 2)
    compiler = make_compiler(CompilationConfig(inductor_compile_config={"max_autotune": True}))
    row = gemm_tuning.tune(plain.problem, 8, compiler.options, "cpu")
    assert row["status"] == "tuned", row["error"]
    assert row["benchmarked"] == 0 and row["choices"] == 0 and row["seconds"] > 0
    assert not [p for p in (tmp_path / "node").rglob("*") if p.is_file()]

    row = gemm_tuning.tune(plain.problem, 8, compiler.options, "cpu", shared=True)
    assert row["status"] == "tuned", row["error"]
    assert any((tmp_path / "node" / "fxgraph").iterdir())
    assert getattr(PersistentCache, "_vcr_shared", False)


def test_a_failing_tune_returns_a_failed_row() -> None:
    tunes, _ = gemm_tuning.tune_tasks(llama_tasks(sizes=(8,), dynamic=False, layers=2), "cpu")

    def boom() -> None:
        raise RuntimeError("injected")

    row = gemm_tuning.tune(tunes[0].problem, 8, {}, "cpu", before=boom)
    assert row["status"] == "failed" and row["error"] == "RuntimeError: injected"
    assert row["timings"] == {}


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
