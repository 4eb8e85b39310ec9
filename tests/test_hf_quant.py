"""Quantized checkpoints: FP8 block (DeepSeek-V3/R1, Qwen3 -FP8) and gpt-oss's MXFP4 experts.
Their config.json builds the quantized model (`planning/hf_quant.py`, ops in `models/fp8.py`
and `models/mxfp4.py`), which splits, compiles and matches the model with dequantized weights,
at tp_size 1 and over two gloo ranks, and loads the checkpoint's tensors as stored."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vllm_compile_ray as vcr
from vllm_compile_ray.errors import ConfigError, UnsupportedModelError
from vllm_compile_ray.models import fp8, int4, mxfp4
from vllm_compile_ray.planning import hf, intake
from vllm_compile_ray.runtime.api import plan_model

import hf_models

pytest.importorskip("transformers")

# Block 16 on the tiny models' 64-wide layers: several blocks per weight, shards on boundaries.
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
       "weight_block_size": [16, 16]}
ARCHS = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
         "deepseek_v3": "DeepseekV3ForCausalLM"}  # dense; fused experts; MLA + shared experts



def _compressed(weights: str, acts: str | None, **extra) -> dict:
    """A compressed-tensors "float-quantized" config (llm-compressor's FP8 checkpoints)."""
    group = {"targets": ["Linear"], "output_activations": None,
             "weights": {"num_bits": 8, "type": "float", "strategy": weights, "dynamic": False,
                         "symmetric": True, **extra},
             "input_activations": None if acts is None else {
                 "num_bits": 8, "type": "float", "strategy": acts, "symmetric": True,
                 "dynamic": acts != "tensor",
                 **({"group_size": extra["block_structure"][1]} if acts == "group" else {})}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quantization_status": "compressed"}


# Llama checkpoints as llm-compressor and FBGEMM write them: -FP8-dynamic, -FP8 (static
# activations), W8A16, -FP8-block, Llama 3.1 405B's FBGEMM.
SCHEMES = {"dynamic": _compressed("channel", "token"), "static": _compressed("tensor", "tensor"),
           "w8a16": _compressed("channel", None),
           "block": _compressed("block", "group", block_structure=[16, 16]),
           "fbgemm": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                      "modules_to_not_convert": ["lm_head"]}}
MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def _checkpoint(root: Path, name: str, **quant) -> str:
    return hf_models.save_config(name, root / name, ARCHS[name],
                                 quantization_config={**FP8, **quant})


def _gpt_oss(root: Path, **overrides) -> str:
    """A gpt-oss checkpoint's config.json, its experts in MXFP4 (as openai/gpt-oss-* ship)."""
    return hf_models.save_config("gpt_oss", root / "gpt_oss", "GptOssForCausalLM",
                                 quantization_config=MXFP4, **overrides)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _dequantized(model: nn.Module) -> nn.Module:
    """The reference: transformers' unquantized model holding the FP8 model's weights, each
    times its block scales."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if hasattr(module, "dequantized"):  # FP8 linear layers
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight = nn.Parameter(module.dequantized())
            linear.bias = module.bias
            ref.set_submodule(name, linear)
        elif hasattr(module, "vcr_fp8_scaled"):  # per-channel FP8 experts
            for attr in ("gate_up_proj", "down_proj"):
                w = getattr(module, attr).float() * getattr(module, f"{attr}_weight_scale")
                setattr(module, attr, nn.Parameter(w))
        elif hasattr(module, "vcr_int4"):  # AWQ / GPTQ experts: W [in, out] each
            scheme = module.vcr_int4[0]
            for attr in ("gate_up_proj", "down_proj"):
                parts = [getattr(module, f"{attr}_{leaf}") for leaf in ("qweight", "qzeros",
                                                                         "scales", "g_idx")]
                experts = module.down_proj_qweight.shape[0]
                parts[3] = parts[3] if parts[3].dim() == 2 else parts[3].expand(experts, -1)
                w = torch.stack([int4.dequantize(*(t[e] for t in parts), scheme.bits,
                                                 scheme.layout, scheme.zero_offset).T
                                 for e in range(experts)])
                module.register_parameter(attr, nn.Parameter(w.contiguous()))
        elif hasattr(module, "vcr_mxfp4"):  # gpt-oss: [E, in, out] as transformers holds them
            for attr in ("gate_up_proj", "down_proj"):
                w = mxfp4.dequantize(getattr(module, f"{attr}_blocks"),
                                     getattr(module, f"{attr}_scales"))
                module.register_parameter(attr, nn.Parameter(w.transpose(1, 2).contiguous()))
        elif isinstance(getattr(module, "vcr_fp8", None), tuple):  # fused experts
            block_n, block_k, _ = module.vcr_fp8
            for attr in ("gate_up_proj", "down_proj"):
                w = fp8.dequantize(getattr(module, attr), getattr(module, f"{attr}_scale_inv"),
                                   block_n, block_k)
                setattr(module, attr, nn.Parameter(w))
    ref.set_experts_implementation("eager")
    return ref


def _compiles_like_the_dequantized_model(model: nn.Module, tmp_path: Path,
                                         weight_only: bool) -> Any:
    """`model` compiled (eager adaptor) equals it eagerly and matches transformers' model with
    its dequantized weights: to float32 rounding when only weights are quantized, else (FP8
    activations: a few percent per element) in direction and within 15% of the largest logit."""
    reference = _dequantized(model)
    compiled = vcr.compile(hf.prepare(model), vcr.CompilationConfig(
        compile_sizes=[4], backend="eager", cache=vcr.CacheConfig(cache_dir=str(tmp_path / "c"))))
    for n in (4, 7):
        ids = hf_models.tokens(n, seed=n)
        got, want = _logits(compiled, ids), _logits(reference, ids)
        torch.testing.assert_close(got, _logits(model, ids), rtol=0, atol=0)
        if weight_only:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - want).abs().max() <= 0.15 * want.abs().max()
        assert torch.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.995
    return compiled


def test_the_linear_op_is_the_blockwise_w8a8_arithmetic() -> None:
    """`vcr::fp8_block_linear` = sum over column blocks of (x_q w_q^T) x_scale w_scale, with
    ragged edges (N, K not multiples of the block)."""
    torch.manual_seed(0)
    bn, bk = 16, 8
    w, x = torch.randn(37, 29), torch.randn(5, 29)
    q, scale = fp8.quantize(w, bn, bk)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 4)
    assert ((fp8.dequantize(q, scale, bn, bk) - w).abs() <= w.abs() / 8 + 1e-2).all()
    xq, xs = fp8.quantize_activations(x, bk)
    want = torch.zeros(5, 37, dtype=torch.float64)
    for kb in range(4):
        cols = slice(kb * bk, (kb + 1) * bk)
        part = xq[:, cols].double() @ q[:, cols].double().T
        want += part * xs[:, kb, None].double() * \
            scale[:, kb].double().repeat_interleave(bn)[None, :37]
    got = fp8.fp8_block_linear(x.to(torch.bfloat16), q, scale, bn, bk)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 37)
    torch.testing.assert_close(fp8.fp8_block_linear(x, q, scale, bn, bk), want.float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_fp8_checkpoint_builds_quantized_compiles_and_matches(name: str, tmp_path: Path) -> None:
    """Linear layers and experts hold float8 weights with block scales (not the head or the
    router); the compiled model equals the eager one and matches the dequantized reference;
    identical layers still share one piece."""
    model = intake.build(_checkpoint(tmp_path, name), device="cpu").module
    params = dict(model.named_parameters())
    quantized = {n for n, p in params.items() if p.dtype == torch.float8_e4m3fn}
    assert "lm_head.weight" not in quantized and "model.layers.1.mlp.gate.weight" not in quantized
    assert "model.layers.1.self_attn.o_proj.weight" in quantized
    for n in quantized:
        assert params[n.removesuffix(".weight") + ("_scale_inv" if not n.endswith(".weight")
                                                   else ".weight_scale_inv")].dtype == torch.float32
    if name != "qwen3":
        assert "model.layers.1.mlp.experts.gate_up_proj" in quantized
    compiled = _compiles_like_the_dequantized_model(model, tmp_path, weight_only=False)
    nodes = [str(n.target) for item in compiled.plan.items for n in item.graph.graph.nodes]
    assert any("fp8_block_linear" in t for t in nodes)
    assert len({p.code_id for p in compiled.plan.pieces}) < len(compiled.plan.pieces)


def test_gpt_oss_mxfp4_experts_build_as_stored_and_match(tmp_path: Path) -> None:
    """gpt-oss's experts hold MXFP4 blocks and scales in the checkpoint's shapes (the rest of the
    model unquantized); the compiled model matches the model with the dequantized experts to
    float32 rounding (weight-only: the values are exact)."""
    w = torch.randn(3, 8, 64)
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (3, 8, 2, 16) and blocks.dtype == torch.uint8 and scales.shape == (3, 8, 2)
    error = (mxfp4.dequantize(blocks, scales) - w).abs() / w.abs().unflatten(-1, (2, 32)).amax(
        -1).repeat_interleave(32, -1)
    assert error.max() <= 1 / 3  # e2m1's widest gap (4 to 6) over the group's scale
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(mxfp4.dequantize(blocks, scales))),
                       mxfp4.dequantize(blocks, scales))  # e2m1 values are fixed points
    model = intake.build(_gpt_oss(tmp_path), device="cpu").module
    params = dict(model.named_parameters())
    assert params["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 256, 2, 16)
    assert params["model.layers.0.mlp.experts.down_proj_scales"].shape == (4, 64, 4)
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    compiled = _compiles_like_the_dequantized_model(model, tmp_path, weight_only=True)
    nodes = [str(n.target) for item in compiled.plan.items for n in item.graph.graph.nodes]
    assert any("mxfp4_experts" in t for t in nodes)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_llm_compressor_and_fbgemm_fp8_checkpoints(scheme: str, tmp_path: Path) -> None:
    """Llama checkpoints in compressed-tensors' and FBGEMM's FP8 schemes build with their
    parameters (`weight_scale` per channel or tensor, `input_scale` where calibrated), compile,
    and match the model with dequantized weights; two ranks from the checkpoint match it."""
    ckpt = hf_models.save_config("llama", tmp_path / scheme, "LlamaForCausalLM",
                                 quantization_config=SCHEMES[scheme])
    model = intake.build(ckpt, device="cpu").module
    params = dict(model.named_parameters())
    o_proj = "model.layers.1.self_attn.o_proj."
    assert params[o_proj + "weight"].dtype == torch.float8_e4m3fn
    assert params["lm_head.weight"].dtype == torch.float32
    scale = {"dynamic": (64, 1), "static": (1,), "w8a16": (64, 1), "block": (4, 4),
             "fbgemm": (64, 1)}[scheme]
    assert params[o_proj + "weight_scale"].shape == scale
    assert (o_proj + "input_scale" in params) == (scheme == "static")
    assert (o_proj + "input_scale_ub" in params) == (scheme == "fbgemm")
    _compiles_like_the_dequantized_model(model, tmp_path, weight_only=scheme == "w8a16")
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in params.items()},
              os.path.join(ckpt, "model.safetensors"))
    whole = _logits(hf.prepare(intake.build(ckpt, device="cpu", weights=ckpt).module),
                    hf_models.tokens(7))
    mp.spawn(_rank, args=(2, {"llama+weights": ckpt}, str(tmp_path)), nprocs=2)
    for r in range(2):
        logits, sharded = torch.load(tmp_path / f"rank{r}.pt")["llama+weights"]
        # a rank quantizes a row-parallel layer's input per token over its own columns (as
        # vLLM's ranks do): per-token scales differ from the whole model's by rounding
        assert torch.cosine_similarity(logits.flatten(), whole.flatten(), dim=0) > 0.999
        if scheme == "w8a16":
            torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)
        assert sharded[o_proj + "weight"] == (64, 32)
        q_scale = sharded["model.layers.1.self_attn.q_proj.weight_scale"]
        assert q_scale == {"static": (1,), "block": (2, 4)}.get(scheme, (32, 1))


def test_a_warm_for_gpus_plans_fp8_on_meta_with_the_keys_of_a_cpu_rank(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "qwen3_moe")
    config = vcr.CompilationConfig(compile_sizes=[4], backend="eager")
    fingerprint = {"device_type": "cpu", "note": "test"}
    on_meta = intake.build_for_plan(ckpt, tp_size=1, device_type="cuda").module
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    on_cpu = intake.build(ckpt, device="cpu").module
    assert plan_model(on_meta, config, device_type="cpu", fingerprint=fingerprint).keys == \
        plan_model(on_cpu, config, device_type="cpu", fingerprint=fingerprint).keys


def _rank(rank: int, world: int, ckpts: dict[str, str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    try:
        got = {}
        for name, ckpt in ckpts.items():
            weights = ckpt if name.endswith("+weights") else None
            model = hf.prepare(intake.build(ckpt, tp_size=world, rank=rank, device="cpu",
                                            weights=weights).module)
            got[name] = (_logits(model, hf_models.tokens(7)),
                         {n: tuple(p.shape) for n, p in model.named_parameters()})
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_their_blocks_and_compute_the_whole_fp8_model(tmp_path: Path) -> None:
    """Each rank keeps the block scales of its weight slices (materialized alone: seeded values,
    or its slices of the checkpoint) and gives the whole FP8 model's logits (its activation groups fall on the same block boundaries; a partial sum's rounding
    can still move one activation to the next FP8 value, hence 1% and not bit equality)."""
    ckpts = {name: _checkpoint(tmp_path, name) for name in ("qwen3_moe", "deepseek_v3")}
    # gpt-oss: 96-wide experts (3 groups of 32), 48 columns a rank: rank 1's start inside group 1
    ckpts["gpt_oss"] = _gpt_oss(tmp_path, intermediate_size=96)
    # and from a checkpoint: each rank reads its slices (the experts' from each expert's tensors)
    stored = _checkpoint(tmp_path / "stored", "deepseek_v3")
    _save_checkpoint(intake.build(stored, device="cpu", seed=1).module, stored)
    ckpts["deepseek_v3+weights"] = stored
    mp.spawn(_rank, args=(2, ckpts, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, ckpt in ckpts.items():
        weights = ckpt if name.endswith("+weights") else None
        whole = hf.prepare(intake.build(ckpt, device="cpu", weights=weights).module)
        shapes = {n: tuple(p.shape) for n, p in whole.named_parameters()}
        want = _logits(whole, hf_models.tokens(7))
        if name == "gpt_oss":  # weight-only quantization: the ranks' sums, to rounding
            experts = "model.layers.1.mlp.experts."
            for r in range(2):
                logits, sharded = ranks[r][name]
                torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
                assert sharded[experts + "gate_up_proj_blocks"][1] == 96  # of 192 rows
                assert sharded[experts + "down_proj_blocks"][2] == 2  # groups [0, 2), [1, 3)
            continue
        for r in range(2):
            logits, sharded = ranks[r][name]
            assert (logits - want).abs().max() <= 0.01 * want.abs().max(), name
            assert torch.cosine_similarity(logits.flatten(), want.flatten(), dim=0) > 0.9999
        experts = "model.layers.1.mlp.experts.gate_up_proj"
        assert sharded[experts][1] == shapes[experts][1] // 2
        assert sharded[experts + "_scale_inv"][1] == shapes[experts + "_scale_inv"][1] // 2
        o_proj = "model.layers.1.self_attn.o_proj.weight_scale_inv"
        assert sharded[o_proj] == (shapes[o_proj][0], shapes[o_proj][1] // 2)


def test_schemes_and_shards_vcr_cannot_serve_are_refused(tmp_path: Path) -> None:
    for quant, field in (({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'"),
                         ({"quant_method": "hqq"}, "quant_method='hqq'"),
                         ({"activation_scheme": "static"}, "activation_scheme='static'"),
                         ({"weight_block_size": None}, "weight_block_size=None")):
        ckpt = _checkpoint(tmp_path / field.split("=")[0], "qwen3", **quant)
        with pytest.raises(UnsupportedModelError, match=rf"{field}.*supported: quant_method "
                                                        r'"fp8"'):
            intake.build(ckpt, device="cpu")
    for quant, field in (({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version='gemv'"),
                         ({"quant_method": "gptq", "bits": 3}, "bits=3"),
                         ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
                          "checkpoint_format='marlin'")):
        ckpt = hf_models.save_config("llama", tmp_path / "int4", "LlamaForCausalLM",
                                     quantization_config=quant)
        with pytest.raises(UnsupportedModelError, match=rf"{field} is not supported \(supported: "
                                                        r'quant_method "awq"'):
            intake.build(ckpt, device="cpu")
    int8 = _compressed("channel", "token")
    int8["config_groups"]["group_0"]["weights"]["type"] = "int"
    w4 = _compressed("group", None, group_size=128)
    w4["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    for quant, field in ((int8, r"weights='8-bit int'"), (w4, r"weights='4-bit float'"),
                         ({**SCHEMES["dynamic"], "kv_cache_scheme": {"num_bits": 8}},
                          r"kv_cache_scheme=\{'num_bits': 8\}"),
                         ({**SCHEMES["dynamic"], "format": "marlin-24"}, r"format='marlin-24'"),
                         ({**SCHEMES["dynamic"], "format": "pack-quantized"},
                          r"weights='8-bit float symmetric=True'")):
        ckpt = hf_models.save_config("llama", tmp_path / "ct", "LlamaForCausalLM",
                                     quantization_config=quant)
        with pytest.raises(UnsupportedModelError, match=rf"{field} is not supported \(supported"):
            intake.build(ckpt, device="cpu")
    moe = _checkpoint(tmp_path / "ct-moe", "qwen3_moe")
    moe_config = json.loads(Path(moe, "config.json").read_text())
    Path(moe, "config.json").write_text(json.dumps({**moe_config,
                                                    "quantization_config": SCHEMES["static"]}))
    with pytest.raises(UnsupportedModelError, match=r"fused experts of a compressed-tensors FP8 "
                                                    r"checkpoint are served with per-channel "
                                                    r"weights and per-token activations"):
        intake.build(moe, device="cpu")
    with pytest.raises(UnsupportedModelError, match=r"Qwen3ForCausalLM: an mxfp4 checkpoint "
                                                    r"quantizes fused experts.*gpt-oss"):
        intake.build(_checkpoint(tmp_path / "mx", "qwen3", quant_method="mxfp4"))
    ckpt = _checkpoint(tmp_path, "qwen3_moe")  # experts' 32 rows: 8 a rank at tp 4
    with pytest.raises(UnsupportedModelError, match=r"experts.gate_up_proj: a tensor-parallel "
                                                    r"shard of 8 rows does not fall on the FP8 "
                                                    r"checkpoint's blocks of 16"):
        intake.build(ckpt, tp_size=4, rank=0)
    # experts' 32 rows in blocks of 24:
    with pytest.raises(UnsupportedModelError, match=r"intermediate size 32 is not a multiple of "
                                                    r"the FP8 block 24"):
        intake.build(_checkpoint(tmp_path / "odd", "qwen3_moe", weight_block_size=[24, 16]))


# A fused experts parameter's suffix -> (each expert's stored tensor, the dim its gate and up
# halves lie on: output features; None: one tensor gate and up both store)
_STORED = {None: ("weight", 0), "scale_inv": ("weight_scale_inv", 0),
           "weight_scale": ("weight_scale", 0), "qweight": ("qweight", -1),
           "qzeros": ("qzeros", -1), "scales": ("scales", -1), "g_idx": ("g_idx", None)}


def _whole_and_two_ranks(ckpt: str, stored: dict[str, torch.Tensor], tmp_path: Path
                         ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, dict]]]:
    """The whole model built from checkpoint `ckpt` (its parameters `stored`, bit for bit) and
    its logits; what two gloo ranks building it from the checkpoint give: (logits, parameter
    shapes) each."""
    bits = lambda t: t.view(torch.uint8) if t.element_size() == 1 else t  # noqa: E731 float8
    whole = intake.build(ckpt, device="cpu", weights=ckpt).module
    assert all(torch.equal(bits(p), bits(stored[n])) for n, p in whole.named_parameters())
    want = _logits(hf.prepare(whole), hf_models.tokens(7))
    mp.spawn(_rank, args=(2, {"ckpt+weights": ckpt}, str(tmp_path)), nprocs=2)
    return want, [torch.load(tmp_path / f"rank{r}.pt")["ckpt+weights"] for r in range(2)]


def _save_checkpoint(model: nn.Module, directory: str) -> None:
    """`model`'s tensors as a MoE checkpoint stores them: each expert's gate, up and down
    projections apart (FP8 block and per-channel, AWQ, GPTQ), and its persistent buffers (a
    router's score correction)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tensors = {n: b.contiguous() for n, b in model.state_dict().items() if n not in params}
    for name, p in params.items():
        m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)(?:_(\w+))?$", name)
        if m is None:
            tensors[name] = p.detach().contiguous()
            continue
        prefix, proj, suffix = m.groups()
        leaf, dim = _STORED[suffix]
        for e in range(p.shape[0]):
            if proj == "down_proj":
                parts = {"down_proj": p[e]}
            elif dim is None:
                parts = {"gate_proj": p[e], "up_proj": p[e]}
            else:
                parts = dict(zip(("gate_proj", "up_proj"), p[e].chunk(2, dim=dim)))
            for part, t in parts.items():
                tensors[f"{prefix}.{e}.{part}.{leaf}"] = t.detach().clone()
    save_file(tensors, os.path.join(directory, "model.safetensors"))


def test_an_fp8_checkpoints_weights_load_as_stored(tmp_path: Path) -> None:
    """--weights of an FP8 checkpoint: its float8 tensors and scales load as stored (each
    expert's gate/up/down merged), so the model computes what the checkpoint's model does; a
    missing or unknown tensor is an error naming it."""
    ckpt = _checkpoint(tmp_path, "deepseek_v3")
    source = intake.build(ckpt, device="cpu", seed=1).module
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"  # a buffer DeepSeek-V3 stores
    dict(source.named_buffers())[bias].copy_(torch.rand(4))
    _save_checkpoint(source, ckpt)
    loaded = intake.build(ckpt, device="cpu", weights=ckpt).module
    ids = hf_models.tokens(6)
    want = _logits(hf.prepare(source), ids)
    torch.testing.assert_close(_logits(hf.prepare(loaded), ids), want, rtol=0, atol=0)
    assert not torch.equal(_logits(hf.prepare(intake.build(ckpt, device="cpu").module), ids),
                           want)
    from safetensors.torch import load_file, save_file

    stored = load_file(os.path.join(ckpt, "model.safetensors"))
    scale = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    save_file({k: v for k, v in stored.items() if k != scale},
              os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ConfigError, match=r"checkpoint lacks model\.layers\.1\.mlp\.experts\.3\."
                                          r"up_proj\.weight_scale_inv, which DeepseekV3For"):
        intake.build(ckpt, device="cpu", weights=ckpt)
    save_file({**stored, "model.layers.1.mlp.experts.3.w9.weight": stored[scale].clone()},
              os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ConfigError, match=r"has no parameter for: model\.layers\.1\.mlp\."
                                          r"experts\.3\.w9\.weight"):
        intake.build(ckpt, device="cpu", weights=ckpt)


def test_a_gpt_oss_checkpoints_mxfp4_weights_load_as_stored(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ckpt = _gpt_oss(tmp_path)
    source = intake.build(ckpt, device="cpu", seed=1).module
    save_file({n: p.detach().contiguous() for n, p in source.named_parameters()},
              os.path.join(ckpt, "model.safetensors"))
    loaded = intake.build(ckpt, device="cpu", weights=ckpt).module
    ids = hf_models.tokens(6)
    torch.testing.assert_close(_logits(hf.prepare(loaded), ids), _logits(hf.prepare(source), ids),
                               rtol=0, atol=0)


def test_vcr_plan_of_an_fp8_checkpoint_from_the_cli(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "deepseek_v3")
    out = subprocess.run([sys.executable, "-m", "vllm_compile_ray", "plan", "--model", ckpt,
                          "--device", "cpu", "--sizes", "1,8", "--tp", "2"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DeepseekV3" in out.stdout + out.stderr


def _awq_packed(q: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packer: word c of row k holds columns 8c + order[i] at nibble i."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for c in range(q.shape[1] // 8):
        for i in range(8):
            words[:, c] |= q[:, 8 * c + order[i]].long() << (4 * i)
    return words.to(torch.int32)


def _gptq_packed(q: torch.Tensor, dim: int) -> torch.Tensor:
    """GPTQ's packer: 8 consecutive values of `dim` in a word, the first in the lowest bits."""
    q = q.long() if dim == 0 else q.long().T
    words = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64)
    for row in range(q.shape[0] // 8):
        for j in range(8):
            words[row] |= q[8 * row + j] << (4 * j)
    words = words.to(torch.int32)
    return words if dim == 0 else words.T.contiguous()


def test_awq_and_gptq_layouts_dequantize_as_their_packers_wrote_them() -> None:
    """Weights packed by AutoAWQ's and GPTQ's algorithms (written out here, word by word)
    dequantize to (q - zero) * scale of each element's group, in activation order too."""
    from vllm_compile_ray.models import int4

    torch.manual_seed(0)
    k, n, g = 64, 16, 16
    # zero points from 1: the original GPTQ format stores each minus one and cannot hold 0
    q, zeros = torch.randint(0, 16, (k, n)), torch.randint(1, 16, (k // g, n))
    scales = torch.rand(k // g, n) + 0.5
    g_idx = torch.arange(k) // g
    want = (q - zeros[g_idx]).float() * scales[g_idx]
    awq = int4.dequantize(_awq_packed(q), _awq_packed(zeros), scales, g_idx, 4, "awq", 0)
    torch.testing.assert_close(awq, want, rtol=0, atol=0)
    for offset in (1, 0):  # "gptq" stores each zero minus one; "gptq_v2" as it is
        stored = _gptq_packed((zeros - offset) % 16, 1)
        gptq = int4.dequantize(_gptq_packed(q, 0), stored, scales, g_idx, 4, "gptq", offset)
        torch.testing.assert_close(gptq, want, rtol=0, atol=0)
    signed = torch.randint(-8, 8, (n, k))  # compressed-tensors: [out, in], q + 8 stored
    ct_scales = torch.rand(n, k // g) + 0.5
    ct = int4.dequantize(_gptq_packed(signed + 8, 1), signed[:0], ct_scales, g_idx, 4, "ct", 8)
    torch.testing.assert_close(ct, (signed.float() * ct_scales[:, g_idx]).T, rtol=0, atol=0)
    shuffled = g_idx[torch.randperm(k)]  # desc_act: each row's own group
    gptq = int4.dequantize(_gptq_packed(q, 0), _gptq_packed(zeros - 1, 1), scales, shuffled, 4,
                           "gptq", 1)
    torch.testing.assert_close(gptq, (q - zeros[shuffled]).float() * scales[shuffled],
                               rtol=0, atol=0)


W4A16 = _compressed("group", None, group_size=16)
W4A16["format"] = "pack-quantized"
W4A16["config_groups"]["group_0"]["weights"].update(type="int", num_bits=4)
INT4 = {"awq": {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True,
                "version": "gemm"},
        "w4a16": W4A16,
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                 "sym": True, "checkpoint_format": "gptq"}}


@pytest.mark.parametrize("method", sorted(INT4))
def test_awq_and_gptq_checkpoints_build_load_and_shard(method: str, tmp_path: Path) -> None:
    """A Llama AWQ / GPTQ / compressed-tensors w4a16 checkpoint builds with its packed parameters, compiles, matches the
    model with the dequantized weights, loads its weights as stored, and two ranks from the
    checkpoint (row-parallel layers keeping every group's scales) give its logits."""
    ckpt = hf_models.save_config("llama", tmp_path / method, "LlamaForCausalLM",
                                 quantization_config=INT4[method])
    model = intake.build(ckpt, device="cpu").module
    params = dict(model.named_parameters())
    o_proj = "model.layers.1.self_attn.o_proj."
    weight, scales = ("weight_packed", "weight_scale") if method == "w4a16" else \
        ("qweight", "scales")
    packed = {"awq": (64, 8), "gptq": (8, 64), "w4a16": (64, 8)}[method]
    group_scales = (64, 4) if method == "w4a16" else (4, 64)  # [out, groups] / [groups, out]
    assert params[o_proj + weight].shape == packed
    assert params[o_proj + scales].shape == group_scales
    assert (o_proj + "g_idx" in params) == (method == "gptq")
    _compiles_like_the_dequantized_model(model, tmp_path, weight_only=True)
    from safetensors.torch import save_file

    stored = {n: p.detach().contiguous() for n, p in params.items()}
    if method == "gptq":  # activation order: groups shuffled over the input rows
        for name in [n for n in stored if n.endswith("g_idx")]:
            stored[name] = stored[name][torch.randperm(len(stored[name]))].contiguous()
    save_file(stored, os.path.join(ckpt, "model.safetensors"))
    want, ranks = _whole_and_two_ranks(ckpt, stored, tmp_path)
    for logits, sharded in ranks:
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        assert sharded[o_proj + scales] == group_scales  # row-parallel: every group
        q_scales = sharded["model.layers.1.self_attn.q_proj." + scales]
        assert q_scales == ((32, 4) if method == "w4a16" else (4, 32))  # column-parallel


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_and_gptq_moe_experts(method: str, tmp_path: Path) -> None:
    """A Qwen3-MoE AWQ / GPTQ checkpoint: its fused experts hold every expert's packed tensors,
    compile and match the dequantized experts; each expert's stored tensors load into them, and
    two ranks (each its slice of every expert) from the checkpoint give the whole model's
    logits."""
    ckpt = hf_models.save_config("qwen3_moe", tmp_path / method, "Qwen3MoeForCausalLM",
                                 quantization_config=INT4[method])
    model = intake.build(ckpt, device="cpu").module
    params = dict(model.named_parameters())
    experts = "model.layers.1.mlp.experts."
    assert params[experts + "gate_up_proj_scales"].shape == (4, 4, 64)  # [E, 64/16, 2 x 32]
    assert "model.layers.1.mlp.gate.weight" in params  # the router: unquantized
    _compiles_like_the_dequantized_model(model, tmp_path, weight_only=True)
    _save_checkpoint(model, ckpt)
    want, ranks = _whole_and_two_ranks(ckpt, params, tmp_path)
    for logits, sharded in ranks:
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        assert sharded[experts + "gate_up_proj_scales"] == (4, 4, 32)
        assert sharded[experts + "down_proj_scales"] == (4, 2, 64)  # every group


def test_fp8_dynamic_moe_experts(tmp_path: Path) -> None:
    """A Qwen3-MoE "-FP8-dynamic" checkpoint (compressed-tensors, per-channel weights, per-token
    activations): its fused experts hold float8 weights and channel scales, compile and match
    the dequantized experts; each expert's stored tensors load, and two ranks from the
    checkpoint give the whole model's logits."""
    ckpt = hf_models.save_config("qwen3_moe", tmp_path / "moe", "Qwen3MoeForCausalLM",
                                 quantization_config=SCHEMES["dynamic"])
    model = intake.build(ckpt, device="cpu").module
    params = dict(model.named_parameters())
    experts = "model.layers.1.mlp.experts."
    assert params[experts + "gate_up_proj"].dtype == torch.float8_e4m3fn
    assert params[experts + "gate_up_proj_weight_scale"].shape == (4, 64, 1)
    _compiles_like_the_dequantized_model(model, tmp_path, weight_only=False)
    _save_checkpoint(model, ckpt)
    want, ranks = _whole_and_two_ranks(ckpt, params, tmp_path)
    for logits, sharded in ranks:
        assert torch.cosine_similarity(logits.flatten(), want.flatten(), dim=0) > 0.999
        assert sharded[experts + "gate_up_proj_weight_scale"] == (4, 32, 1)
        assert sharded[experts + "down_proj_weight_scale"] == (4, 64, 1)
