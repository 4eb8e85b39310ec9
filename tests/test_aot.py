"""Skipping dynamo at startup (`aot`): the first rank traces and publishes, the next restores.

Eager pieces (the logic, not Inductor); the restore runs in a fresh process, as a rank's would.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vllm_compile_ray as vcr
from vllm_compile_ray import models
from vllm_compile_ray.runtime import aot

pytestmark = pytest.mark.skipif(not aot.SUPPORTED, reason="torch without AOT compile")

REPO = Path(__file__).resolve().parents[1]
RANK = textwrap.dedent("""
    import json, sys, torch
    import vllm_compile_ray as vcr
    from vllm_compile_ray import models
    config = vcr.CompilationConfig(backend="eager", compile_sizes=[1, 4], on_miss="error",
                                   cache=vcr.CacheConfig(cache_dir=sys.argv[1]))
    model = models.build(models.get_config("llama-tiny"), num_layers=4, seed=3)
    compiled = vcr.load(model, config, model_name="llama-tiny")
    diffs = []
    for n in (1, 4, 7):
        ids, pos = torch.randint(0, 100, (n,)), torch.arange(n)
        diffs.append(float((compiled(ids, pos) - model(ids, pos)).abs().max()))
    print(json.dumps({"dynamo": compiled.report.dynamo, "diffs": diffs,
                      "plans": len(compiled.backend.plans)}))
""")


def _config(cache) -> vcr.CompilationConfig:
    return vcr.CompilationConfig(backend="eager", compile_sizes=[1, 4],
                                 on_miss="compile_and_publish",
                                 cache=vcr.CacheConfig(cache_dir=str(cache)))


def test_the_next_rank_restores_what_the_first_traced(tmp_path) -> None:
    model = models.build(models.get_config("llama-tiny"), num_layers=4, seed=3)
    first = vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")
    assert first.report.dynamo == "traced+published"
    ids = torch.randint(0, 100, (5,))
    torch.testing.assert_close(first(ids, torch.arange(5)), model(ids, torch.arange(5)))

    done = subprocess.run([sys.executable, "-c", RANK, str(tmp_path / "cache")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank = json.loads(done.stdout.strip().splitlines()[-1])
    assert rank["dynamo"] == "restored"
    assert rank["plans"] == 1  # the restored graph was split once; no call traced again
    assert max(rank["diffs"]) < 1e-5


def test_a_call_outside_the_guards_traces_again(tmp_path, caplog) -> None:
    model = models.build(models.get_config("llama-tiny"), num_layers=2)
    compiled = vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")
    assert compiled.traced is not None and len(compiled.backend.plans) == 1
    ids = torch.randint(0, 100, (6,), dtype=torch.int32)  # the trace saw int64 ids
    torch.testing.assert_close(compiled(ids, torch.arange(6)), model(ids.long(), torch.arange(6)))
    assert len(compiled.backend.plans) == 2  # dynamo traced that call
    assert "outside the traced function's guards" in caplog.text
    # calls within the guards still run the traced function: no third plan, same outputs
    assert compiled.traced is not None
    torch.testing.assert_close(compiled(ids.long(), torch.arange(6)),
                               model(ids.long(), torch.arange(6)))
    torch.testing.assert_close(compiled(ids, torch.arange(6)), model(ids.long(), torch.arange(6)))
    assert len(compiled.backend.plans) == 2


def test_sliced_inputs_stay_within_the_guards(tmp_path, caplog) -> None:
    """A slice of a wider tensor (other strides than the trace's) runs the traced function."""
    model = models.build(models.get_config("llama-tiny"), num_layers=2)
    compiled = vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")
    wide = torch.randint(0, 100, (12,))
    ids, pos = wide[::2], torch.arange(12)[::2]
    assert not ids.is_contiguous()
    torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    assert compiled._guard_misses == 0 and len(compiled.backend.plans) == 1
    assert "outside the traced function's guards" not in caplog.text


def test_the_cpu_thread_count_is_no_guard_but_global_state_is(tmp_path, caplog) -> None:
    """A process with another CPU thread count (a Ray worker, a rank under OMP_NUM_THREADS)
    runs the traced function; other global state (here deterministic algorithms) goes through
    dynamo, with the same outputs."""
    model = models.build(models.get_config("llama-tiny"), num_layers=2)
    compiled = vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")
    ids, pos = torch.randint(0, 100, (5,)), torch.arange(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    finally:
        torch.set_num_threads(threads)
    assert compiled._guard_misses == 0 and len(compiled.backend.plans) == 1
    torch.use_deterministic_algorithms(True)
    try:
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    finally:
        torch.use_deterministic_algorithms(False)
    assert compiled._guard_misses == 1 and len(compiled.backend.plans) == 2
    assert "global state" in caplog.text


def test_a_restore_that_fails_traces_and_says_so(tmp_path, monkeypatch, caplog) -> None:
    model = models.build(models.get_config("llama-tiny"), num_layers=2)
    vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")

    def broken(*args, **kwargs):
        raise RuntimeError("unpickling failed")

    monkeypatch.setattr(aot, "restore", broken)
    again = vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")
    assert again.report.dynamo == "traced+published"  # the stored object stays as it was
    assert "restoring the traced model" in caplog.text and "unpickling failed" in caplog.text
    ids = torch.randint(0, 100, (3,))
    torch.testing.assert_close(again(ids, torch.arange(3)), model(ids, torch.arange(3)))


def test_a_restore_rebuilds_only_the_values_the_planner_reads(tmp_path, monkeypatch) -> None:
    """The saved graph keeps the fake values of the pieces' inputs and outputs (and of the
    graph's inputs and sizes) only; the restore plans the same keys from them without
    propagating values through the graph."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from vllm_compile_ray.runtime import backend as backend_mod

    model = models.build(models.get_config("llama-tiny"), num_layers=4, seed=3)
    first = vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")
    assert first.report.dynamo == "traced+published"

    def refuse(*args, **kwargs):
        raise AssertionError("the restore propagated values through the graph")

    graphs = []

    def plan_graph(gm, *args, **kwargs):
        graphs.append([n for n in gm.graph.nodes if n.op not in ("placeholder", "output")])
        return plan(gm, *args, **kwargs)

    plan = backend_mod.plan_graph
    monkeypatch.setattr(FakeTensorProp, "propagate_dont_convert_inputs", refuse)
    monkeypatch.setattr(backend_mod, "plan_graph", plan_graph)
    again = vcr.load(model, _config(tmp_path / "cache"), model_name="llama-tiny")
    assert again.report.dynamo == "restored"
    assert again.backend.plans[0].keys == first.backend.plans[0].keys
    with_values = [n for n in graphs[0] if "example_value" in n.meta]
    assert 0 < len(with_values) < len(graphs[0]) / 3
    assert all(n.meta.get("vcr_piece_io") or not isinstance(n.meta["example_value"], torch.Tensor)
               for n in with_values)
    ids = torch.randint(0, 100, (5,))
    torch.testing.assert_close(again(ids, torch.arange(5)), model(ids, torch.arange(5)))


def test_the_key_follows_code_parameters_and_call() -> None:
    model = models.build(models.get_config("llama-tiny"), num_layers=2, device="meta")
    ids, pos = torch.zeros(8, dtype=torch.long), torch.arange(8)
    key = lambda m, *a, env="e": aot.dynamo_key(m, a, {}, [(0, 0), (1, 0)], env)  # noqa: E731
    base = key(model, ids, pos)
    assert key(model, ids[:3], pos[:3]) == base  # the dynamic dim is not in the key
    assert key(model, ids.int(), pos) != base
    assert key(model, ids, pos, env="other") != base
    deeper = models.build(models.get_config("llama-tiny"), num_layers=3, device="meta")
    assert key(deeper, ids, pos) != base


HF_RANK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    import hf_models
    import vllm_compile_ray as vcr
    config = vcr.CompilationConfig(backend="eager", compile_sizes=[4], on_miss="error",
                                   cache=vcr.CacheConfig(cache_dir=sys.argv[1]))
    compiled = vcr.load(hf_models.build("llama"), config, model_name="tiny-hf-llama")
    outs = [compiled(input_ids=hf_models.tokens(n, seed=n)).logits.tolist() for n in (1, 4, 9)]
    print(json.dumps({"dynamo": compiled.report.dynamo, "plans": len(compiled.backend.plans),
                      "guard_misses": compiled._guard_misses,
                      "compiles": compiled.report.compiles, "outs": outs,
                      "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}))
""")


def test_a_transformers_model_traced_in_one_process_restores_in_another(tmp_path) -> None:
    """Its traced bytecode loads a global dynamo installed while tracing (the collections
    module, to rebuild the ModelOutput): saved with the function, the restore finds it."""
    tests = str(Path(__file__).parent)
    sys.path.insert(0, tests)
    import hf_models

    model = hf_models.build("llama")
    config = vcr.CompilationConfig(backend="eager", compile_sizes=[4],
                                   on_miss="compile_and_publish",
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    first = vcr.load(model, config, model_name="tiny-hf-llama")
    assert first.report.dynamo == "traced+published"
    traced = [first(input_ids=hf_models.tokens(n, seed=n)).logits for n in (1, 4, 9)]

    done = subprocess.run([sys.executable, "-c", HF_RANK, str(tmp_path), tests], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank = json.loads(done.stdout.strip().splitlines()[-1])
    assert rank["dynamo"] == "restored", done.stderr[-3000:]
    assert rank["graphs"] == 0 and rank["compiles"] == 0  # no trace, every piece from the cache
    assert rank["plans"] == 1 and rank["guard_misses"] == 0  # split once, 1 token in its guards
    for want, got in zip(traced, rank["outs"]):
        torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["phi3", "gpt_oss"])
def test_one_token_calls_stay_within_the_traced_guards(arch: str, tmp_path) -> None:
    """Their attention gets q/k/v whose strides (a fused qkv split, rotary) make merging heads
    depend on T == 1: merged in traced code, the guards refused 1 token, so the warm-up and
    every decode step traced again. Traced here, as a restore would run it (same guards)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import hf_models

    config = vcr.CompilationConfig(backend="eager", compile_sizes=[4],
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)),
                                   on_miss="compile_and_publish")
    compiled = vcr.load(hf_models.build(arch, num_hidden_layers=2), config, model_name=arch)
    assert compiled.traced is not None and compiled.report.warm_sizes == (8, 4)  # 8: dynamic
    reference = hf_models.build(arch, attn="eager", num_hidden_layers=2)
    for n in (1, 8):
        ids = hf_models.tokens(n, seed=n)
        with torch.no_grad():
            want = reference(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, want)
    assert compiled._guard_misses == 0 and len(compiled.backend.plans) == 1

def test_a_config_value_is_in_the_key() -> None:
    """Constants the traced code holds (an eps) are in no kept guard: a model that differs only
    in one must not restore another's traced function."""
    sys.path.insert(0, str(Path(__file__).parent))
    import hf_models

    ids = torch.zeros(1, 8, dtype=torch.long)
    key = lambda m: aot.dynamo_key(m, (), {"input_ids": ids}, [(0, 1)], "e")  # noqa: E731
    base = key(hf_models.build("llama", device="meta"))
    assert key(hf_models.build("llama", device="meta")) == base
    assert key(hf_models.build("llama", device="meta", rms_norm_eps=0.5)) != base
    ours = lambda eps, **kw: models.build(  # noqa: E731
        dataclasses.replace(models.get_config("llama-tiny"), rms_norm_eps=eps), num_layers=2,
        device="meta", **kw)
    assert key(ours(1e-5)) != key(ours(0.5))
    assert key(ours(1e-5, tp_size=2, rank=0)) == key(ours(1e-5, tp_size=2, rank=1))
