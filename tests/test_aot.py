"""Skipping dynamo at startup (`aot`): the first rank traces and publishes, the next restores.

Eager pieces (the logic, not Inductor); the restore runs in a fresh process, as a rank's would.
"""

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
    config = vcr.CompilationConfig(backend="eager", compile_sizes=[1, 4], cache_dir=sys.argv[1],
                                   on_miss="error")
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
    return vcr.CompilationConfig(backend="eager", compile_sizes=[1, 4], cache_dir=str(cache),
                                 on_miss="compile_and_publish")


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
    assert compiled.traced is None and len(compiled.backend.plans) == 2
    assert "outside the traced function's guards" in caplog.text


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


def test_transformers_models_trace_as_before(tmp_path) -> None:
    """Their traced code refers to module objects a restore cannot find: no AOT for them, one
    trace (not a failed AOT compile and a second trace)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import hf_models

    model = hf_models.build("llama")
    compiled = vcr.load(model, _config(tmp_path / "cache"), model_name="tiny-hf-llama")
    assert compiled.report.dynamo == "off: transformers model"
    assert len(compiled.backend.plans) == 1
