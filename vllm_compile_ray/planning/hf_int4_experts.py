"""Fused experts of AWQ and GPTQ MoE checkpoints (Qwen3-30B-A3B-GPTQ-Int4, Mixtral AWQ / GPTQ):
every expert's gate, up and down projections in the checkpoint's packed layout, stacked like
transformers' fused experts, through `vcr::int4_experts`.

A checkpoint stores `experts.{e}.gate_proj.qweight` and the like; the module holds
`gate_up_proj_qweight` [E, ...] (gate and up concatenated along their output features, as
transformers concatenates the unquantized weights), `..._qzeros`, `..._scales` and, for GPTQ,
`..._g_idx` (gate's and up's are one: they quantize the same input), and the same for
`down_proj`. At tp_size > 1 each rank keeps its slice of every expert's intermediate features:
gate/up output columns in whole packed words, down input rows with every group's scales.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import fp8, int4
from . import hf_shards
from .quant_schemes import Int4

IMPLEMENTATION = "vcr_int4"


def quantize(name: str, module: nn.Module, scheme: Int4) -> None:
    """Transformers' fused experts `module` holding the checkpoint's packed tensors, in place."""
    layout = {"has_gate": True, "is_concatenated": True, "is_transposed": False,
              "has_bias": False, "has_post_expert_norm": False}
    odd = [f"{k}={getattr(module, k)}" for k, v in layout.items() if getattr(module, k, v) != v]
    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None)
    if odd or act not in fp8.ACTIVATIONS or scheme.layout == "ct":
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}): {scheme.layout.upper()} experts are served for "
            f"AWQ and GPTQ checkpoints with gate|up-concatenated, untransposed experts without "
            f"bias or norm and activation in {sorted(fp8.ACTIVATIONS)}; this module has "
            f"{', '.join(odd) or f'activation {act!r}'}")
    experts, hidden, inner = module.down_proj.shape[0], module.down_proj.shape[1], \
        module.down_proj.shape[2]
    per, device = 32 // scheme.bits, module.down_proj.device
    groups = {}
    for proj, k, n in (("gate_up_proj", hidden, 2 * inner), ("down_proj", inner, hidden)):
        group = scheme.group if scheme.group > 0 else k
        if k % group or (n // 2 if proj == "gate_up_proj" else n) % per or k % per:
            raise UnsupportedModelError(f"{name}.{proj}: {k} inputs x {n} outputs do not hold "
                                        f"whole groups of {group} and words of {per} values")
        groups[proj] = group
        rows = (k, n // per) if scheme.layout == "awq" else (k // per, n)
        delattr(module, proj)
        shapes = {"qweight": (rows, torch.int32), "qzeros": ((k // group, n // per), torch.int32),
                  "scales": ((k // group, n), torch.float16)}
        if scheme.layout == "gptq":
            shapes["g_idx"] = ((k,), torch.int32)
        for leaf, (shape, dtype) in shapes.items():
            module.register_parameter(f"{proj}_{leaf}", nn.Parameter(
                torch.zeros((experts, *shape), dtype=dtype, device=device), requires_grad=False))
        if scheme.layout == "awq":  # consecutive groups: a buffer, not in the checkpoint
            hf_shards.buffer(module, f"{proj}_g_idx", _groups(k, group), device)
    module.vcr_int4 = (scheme, groups, act, inner)
    whole = {f"{proj}_g_idx": (experts, hidden if proj == "gate_up_proj" else inner, group)
             for proj, group in groups.items()}
    module.whole_values = lambda leaf: _groups(*whole[leaf][1:]).expand(
        whole[leaf][0], -1).contiguous() if leaf in whole else None


def _groups(k: int, group: int, start: int = 0, length: int | None = None) -> torch.Tensor:
    """The group of each of `k` input features (rows [start, start + length))."""
    return (torch.arange(k) // group)[start:None if length is None else start + length].to(
        torch.int32)


def forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface entry for packed integer experts."""
    scheme, _, act, _ = module.vcr_int4
    experts = module.down_proj_qweight.shape[0]
    tensors = []
    for proj in ("gate_up_proj", "down_proj"):
        g_idx = getattr(module, f"{proj}_g_idx")
        tensors += [getattr(module, f"{proj}_qweight"), getattr(module, f"{proj}_qzeros"),
                    getattr(module, f"{proj}_scales"),
                    g_idx if g_idx.dim() == 2 else g_idx.expand(experts, -1)]
    return int4.int4_experts(hidden_states, top_k_index, top_k_weights.to(torch.float32),
                             *tensors, scheme.bits, scheme.layout, scheme.zero_offset, act)


def shard(module: nn.Module, name: str, tp_size: int, rank: int) -> None:
    """Rank's slice of every expert's intermediate features (see the module docstring)."""
    scheme, _, _, inner = module.vcr_int4
    per = 32 // scheme.bits
    local = inner // tp_size
    if inner % tp_size or local % per:
        raise UnsupportedModelError(f"{name}: experts' intermediate size {inner} does not split "
                                    f"into {tp_size} slices of whole words of {per} values")
    start = rank * local
    awq = scheme.layout == "awq"
    # gate|up: output columns of each half; AWQ packs them in words (qweight, qzeros)
    for leaf, dim, unit in (("qweight", 2, per if awq else 1), ("qzeros", 2, per),
                            ("scales", 2, 1)):
        half = 2 * inner // unit // 2
        _keep(module, f"gate_up_proj_{leaf}", dim, [h * half + start // unit for h in (0, 1)],
              local // unit)
    # down: input rows; GPTQ packs rows in words; every group's scales and zero points stay
    _keep(module, "down_proj_qweight", 1, [start // (1 if awq else per)],
          local // (1 if awq else per))
    if awq:
        group = module.vcr_int4[1]["down_proj"]
        hf_shards.buffer(module, "down_proj_g_idx", _groups(inner, group, start, local),
                         module.down_proj_qweight.device)
    else:
        _keep(module, "down_proj_g_idx", 1, [start], local)
    module.vcr_int4 = (*module.vcr_int4[:3], local)


def _keep(module: nn.Module, attr: str, dim: int, starts: list[int], length: int) -> None:
    t = getattr(module, attr)
    step = ("slice", dim, starts, length, t.shape[dim])
    with torch.no_grad():
        setattr(module, attr, hf_shards.keep(t, hf_shards.cut(t.detach(), [step]).clone(), step))
