"""Keys: identical layers share one; the same model in two processes gives the same keys; another
torch, device or compile option gives different ones."""

import json
import subprocess
import sys

import pytest
import torch

import vllm_compile_ray as vcr
from vllm_compile_ray.keys import piece_key
from vllm_compile_ray.runtime.api import example_args, plan_model
from vllm_compile_ray.torch_private import inductor

CPU_FP = None


def cpu_fingerprint() -> dict:
    global CPU_FP
    if CPU_FP is None:
        CPU_FP = inductor.environment_fingerprint("cpu")
    return CPU_FP


def meta_plan(config: vcr.CompilationConfig, fingerprint: dict | None = None, tokens: int = 8,
              num_layers: int = 4, **build):
    model = vcr.models.build("llama-tiny", device="meta", num_layers=num_layers, **build)
    return plan_model(model, config, device_type="cpu", fingerprint=fingerprint or cpu_fingerprint(),
                      args=example_args(tokens))


CFG = vcr.CompilationConfig(compile_sizes=[1, 2, 4])


def test_four_identical_layers_compile_once_per_shape() -> None:
    plan = meta_plan(CFG)
    assert len(plan.pieces) == 5  # 4 attention splits -> 5 compiled pieces
    assert len({p.code_id for p in plan.pieces}) == 3
    assert len(plan.tasks()) == 3 * len(CFG.shapes)
    middle = plan.pieces[1:4]
    assert middle[0].keys == middle[1].keys == middle[2].keys


def test_more_layers_add_no_tasks() -> None:
    assert meta_plan(CFG, num_layers=12).keys == meta_plan(CFG).keys


def test_trace_time_size_does_not_enter_the_key() -> None:
    assert meta_plan(CFG, tokens=8).keys == meta_plan(CFG, tokens=37).keys


def test_meta_plan_keys_equal_cpu_model_keys() -> None:
    model = vcr.models.build("llama-tiny", num_layers=4)
    plan = plan_model(model, CFG, device_type="cpu", fingerprint=cpu_fingerprint(),
                      args=example_args(5, device="cpu"))
    assert plan.keys == meta_plan(CFG).keys


def test_same_keys_in_a_fresh_process_elsewhere(tmp_path) -> None:
    """Another process, started in another working directory (a rank is rarely started where
    the warm was: on torch 2.13 Inductor's config holds the working directory as a path)."""
    code = (
        "import json, vllm_compile_ray as vcr\n"
        "from vllm_compile_ray.runtime.api import plan_model, example_args\n"
        "m = vcr.models.build('llama-tiny', device='meta', num_layers=4)\n"
        "p = plan_model(m, vcr.CompilationConfig(compile_sizes=[1, 2, 4]), device_type='cpu')\n"
        "print(json.dumps(p.keys))\n")
    # A bare environment: no CI variable (torch defaults some checks from it), another hash seed.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == meta_plan(CFG).keys


@pytest.mark.parametrize("change", [
    {"torch": "2.99.0"}, {"torch_key": "0" * 64}, {"device_type": "cuda", "device_name": "NVIDIA H200"},
    {"isa": "avx2"}, {"triton": "9.9"},
])
def test_other_environment_gives_other_keys(change: dict) -> None:
    other = {**cpu_fingerprint(), **change}
    assert set(meta_plan(CFG, other).keys).isdisjoint(meta_plan(CFG).keys)


def test_compile_options_and_levels_change_keys() -> None:
    base = set(meta_plan(CFG).keys)
    autotune = CFG.replace(inductor_compile_config={"max_autotune": True})
    assert base.isdisjoint(meta_plan(autotune).keys)
    once = meta_plan(CFG.replace(compilation_level="dynamo_once"))
    assert len(once.pieces) == 1 and len(once.tasks()) == len(CFG.shapes)
    eager = meta_plan(CFG.replace(backend="eager", use_inductor=False))
    assert base.isdisjoint(eager.keys)


def test_tp_shards_change_keys_but_ranks_share_them() -> None:
    tp2_rank0 = meta_plan(CFG, tp_size=2, rank=0).keys
    assert meta_plan(CFG, tp_size=2, rank=1).keys == tp2_rank0
    assert set(tp2_rank0).isdisjoint(meta_plan(CFG).keys)


def test_piece_key_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="'dynamic' or a positive int"):
        piece_key("code", [], 0, "c", "h", {}, [])


def test_dtype_changes_keys() -> None:
    assert set(meta_plan(CFG).keys).isdisjoint(meta_plan(CFG, dtype=torch.bfloat16).keys)
