"""A transformers model built from a quantized checkpoint's config.json, as the checkpoint
serves: its quantized layers hold the stored low-precision tensors, under the checkpoint's names,
and run through `models.fp8`, `models.mxfp4` and `models.int4`'s ops.

    vcr plan --model /ckpt/Qwen3-8B-FP8 --device cpu --sizes 1,8
    vcr warm --model deepseek-ai/DeepSeek-V3 --tp 8 ...   # quant_method "fp8"
    vcr plan --model openai/gpt-oss-120b --tp 2 ...        # quant_method "mxfp4"

Supported `quantization_config`s (`spec`):
- `quant_method: "fp8"` (transformers' FineGrainedFP8Config) with `fmt: "e4m3"`, dynamic
  activations and a `weight_block_size`. What is quantized follows transformers' FP8 quantizer:
  every `nn.Linear` and fused experts module, except the output head and the modules the
  config's `modules_to_not_convert` names; a MoE router stays unquantized, as vLLM keeps it.
- `quant_method: "mxfp4"` (gpt-oss): the experts, in MXFP4 blocks; everything else as stored.
- compressed-tensors and FBGEMM FP8 (`hf_compressed`); AWQ, GPTQ and compressed-tensors'
  packed integers (`hf_int4`).
The model is quantized on meta; `hf_shards` then gives each parameter its values: the
checkpoint's tensors as stored (each expert's gate/up/down merged into the fused experts as
transformers merges them; a rank reads its slices) or seeded values. At tp_size > 1 `hf_tp`
slices the block scales with their weights; an FP8 shard that does not start and end on a block
boundary is refused, as vLLM refuses it; an MXFP4 rank keeps the 32-groups its columns fall in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import fp8, mxfp4
from . import hf, hf_compressed, hf_int4, hf_shards
from .quant_schemes import Fp8Block, Fp8Scaled, Int4, Mxfp4

SUPPORTED = ('quant_method "fp8" (fmt "e4m3", activation_scheme "dynamic", weight_block_size '
             '[n, k]: DeepSeek-V3/R1, Qwen3 -FP8); quant_method "mxfp4" (gpt-oss experts); '
             f'{hf_compressed.SUPPORTED}; {hf_int4.SUPPORTED}')
EXPERTS_IMPLEMENTATION = "vcr_fp8"
MXFP4_IMPLEMENTATION = "vcr_mxfp4"


def spec(qc: Any) -> Any:
    """The scheme of config.json's `quantization_config` `qc`; UnsupportedModelError naming the
    field when vcr cannot build it."""
    qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
    method = qc.get("quant_method")
    if method == "mxfp4":
        return Mxfp4()
    if method in ("compressed-tensors", "fbgemm_fp8"):
        return hf_compressed.spec(qc)
    if method in ("awq", "gptq"):
        return hf_int4.spec(qc)
    checks = (("quant_method", method, "fp8"), ("fmt", qc.get("fmt", "e4m3"), "e4m3"),
              ("activation_scheme", str(qc.get("activation_scheme", "dynamic")).lower(),
               "dynamic"), ("scale_fmt", qc.get("scale_fmt") or "float", "float"),
              ("expert_dtype", qc.get("expert_dtype") or "fp8", "fp8"))
    for field, value, wanted in checks:
        if value != wanted:
            raise UnsupportedModelError(f"quantization_config {field}={value!r} is not supported "
                                        f"(supported: {SUPPORTED})")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and
            all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedModelError(f"quantization_config weight_block_size={block!r}: vcr "
                                    f"serves block-quantized FP8 only (supported: {SUPPORTED})")
    if qc.get("modules_to_convert"):
        raise UnsupportedModelError("quantization_config modules_to_convert is not supported "
                                    "(modules_to_not_convert is)")
    return Fp8Block(block[0], block[1], tuple(qc.get("modules_to_not_convert") or ()))


class Fp8BlockLinear(nn.Linear):
    """A linear layer of an FP8 block-quantized checkpoint: `weight` float8 [out, in],
    `weight_scale_inv` [ceil(out/bn), ceil(in/bk)] (transformers' FP8Linear names)."""

    def __init__(self, linear: nn.Linear, block: Fp8Block):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_n, self.block_k = block.block_n, block.block_k
        self.scale_name = block.scale_name
        q, scale = fp8.quantize(linear.weight.detach(), block.block_n, block.block_k)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_parameter(block.scale_name, nn.Parameter(scale, requires_grad=False))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8.fp8_block_linear(x, self.weight, getattr(self, self.scale_name), self.block_n,
                                 self.block_k)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return fp8.dequantize(self.weight, getattr(self, self.scale_name), self.block_n,
                              self.block_k)


def quantize(model: nn.Module, block: Any) -> nn.Module:
    """`model` (transformers', unquantized, whole) made the checkpoint's model, in place."""
    if isinstance(block, Mxfp4):
        return _quantize_mxfp4(model)
    routers = {f"{n}.{child}" if n else child for n, m in model.named_modules()
               if hasattr(m, "experts") for child in ("gate", "router", "shared_expert_gate")}
    if isinstance(block, Fp8Scaled):
        return hf_compressed.quantize(model, block, routers)
    if isinstance(block, Int4):  # AWQ, GPTQ, compressed-tensors' packed integers
        return hf_int4.quantize(model, block, routers)
    head = model.get_output_embeddings()
    experts = hf.fused_experts(model)
    if experts and block.scale_name != "weight_scale_inv":
        raise UnsupportedModelError(f"{experts[0][0]}: fused experts in a compressed-tensors FP8 "
                                    "block checkpoint are not supported (quant_method \"fp8\" "
                                    "checkpoints' experts are)")
    for name, module in experts:
        _quantize_experts(name, module, block)
    if experts:
        hf.use_experts(model, EXPERTS_IMPLEMENTATION, experts_forward)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head and name not in routers and \
                not hf_compressed.ignored(name, block.skip):
            model.set_submodule(name, Fp8BlockLinear(module, block))
    model.vcr_quant = f"FP8 blocks {block.block_n}x{block.block_k}"
    return model


def _quantize_mxfp4(model: nn.Module) -> nn.Module:
    experts = hf.fused_experts(model)
    if not experts:
        raise UnsupportedModelError(f"{type(model).__name__}: an mxfp4 checkpoint quantizes fused "
                                    "experts, and this model has none (mxfp4 is served for "
                                    "gpt-oss)")
    for name, module in experts:
        layout = {"has_gate": True, "is_concatenated": False, "is_transposed": True,
                  "has_bias": True, "has_post_expert_norm": False}
        odd = [f"{k}={getattr(module, k)}" for k, v in layout.items()
               if getattr(module, k, v) != v]
        hidden, inner = module.down_proj.shape[-1], module.down_proj.shape[-2]
        if odd or hidden % mxfp4.GROUP or inner % mxfp4.GROUP or \
                not hasattr(module, "alpha") or not hasattr(module, "limit"):
            raise UnsupportedModelError(
                f"{name} ({type(module).__name__}): mxfp4 experts are served in gpt-oss's layout "
                f"(interleaved gate/up, transposed, biased, swiglu alpha/limit, sizes in groups "
                f"of {mxfp4.GROUP}); this module has {', '.join(odd) or (hidden, inner)}")
        for attr in ("gate_up_proj", "down_proj"):  # stored [E, out, in] in blocks
            blocks, scales = mxfp4.quantize(getattr(module, attr).detach().transpose(1, 2))
            delattr(module, attr)
            module.register_parameter(f"{attr}_blocks", nn.Parameter(blocks, requires_grad=False))
            module.register_parameter(f"{attr}_scales", nn.Parameter(scales, requires_grad=False))
        module.vcr_mxfp4 = (0, inner)  # (first down column used, columns): tensor parallel
    hf.use_experts(model, MXFP4_IMPLEMENTATION, mxfp4_forward)
    model.vcr_quant = "mxfp4 experts"
    return model


def mxfp4_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface entry for gpt-oss's MXFP4 experts."""
    offset, inner = module.vcr_mxfp4
    return mxfp4.mxfp4_experts(hidden_states, top_k_index, top_k_weights.to(torch.float32),
                               module.gate_up_proj_blocks, module.gate_up_proj_scales,
                               module.gate_up_proj_bias, module.down_proj_blocks,
                               module.down_proj_scales, module.down_proj_bias,
                               float(module.alpha), float(module.limit), offset, inner)


def shard_mxfp4(module: nn.Module, name: str, tp_size: int, rank: int) -> None:
    """Rank's slice of every MXFP4 expert's intermediate dim: its gate/up rows (interleaved
    pairs) and the 32-groups of down columns its slice falls in (`vcr_mxfp4` names the columns
    used); the down bias split evenly (the ranks' outputs are summed)."""
    _, inner = module.vcr_mxfp4
    if inner % tp_size:
        raise UnsupportedModelError(f"{name}: experts' intermediate size {inner} does not divide "
                                    f"by tp_size={tp_size}")
    local = inner // tp_size
    start = rank * local
    first, end = start // mxfp4.GROUP, -(-(start + local) // mxfp4.GROUP)

    def keep(attr: str, dim: int, begin: int, length: int) -> None:
        t = getattr(module, attr)
        step = ("slice", dim, [begin], length, t.shape[dim])
        with torch.no_grad():
            setattr(module, attr, hf_shards.keep(t, hf_shards.cut(t.detach(), [step]).clone(),
                                                 step))

    for attr in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias"):
        keep(attr, 1, 2 * start, 2 * local)
    for attr in ("down_proj_blocks", "down_proj_scales"):
        keep(attr, 2, first, end - first)
    hf_shards.divide(module.down_proj_bias, tp_size)
    module.vcr_mxfp4 = (start - first * mxfp4.GROUP, local)


def _quantize_experts(name: str, module: nn.Module, block: Fp8Block) -> None:
    layout = {"has_gate": True, "is_concatenated": True, "is_transposed": False,
              "has_bias": False, "has_post_expert_norm": False}
    odd = [k for k, v in layout.items() if getattr(module, k, v) != v]
    act = _activation(module)
    if odd or act is None:
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}): FP8 experts are served for gate|up-concatenated, "
            f"untransposed weights without bias or norm and activation in "
            f"{sorted(fp8.ACTIVATIONS)}; this module has "
            f"{', '.join(f'{k}={getattr(module, k)}' for k in odd) or f'activation {act!r}'}")
    inner = module.down_proj.shape[-1]
    if inner % block.block_n:
        raise UnsupportedModelError(
            f"{name}: experts' intermediate size {inner} is not a multiple of the FP8 block "
            f"{block.block_n} (weight_block_size), so their fused gate|up weight cannot hold the "
            "checkpoint's separately scaled gate and up blocks")
    module.vcr_fp8 = (block.block_n, block.block_k, act)
    for attr in ("gate_up_proj", "down_proj"):
        q, scale = fp8.quantize(getattr(module, attr).detach(), block.block_n, block.block_k)
        setattr(module, attr, nn.Parameter(q, requires_grad=False))
        setattr(module, f"{attr}_scale_inv", nn.Parameter(scale, requires_grad=False))


def _activation(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    return act if act in fp8.ACTIVATIONS else None


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface entry for FP8 experts (`quantize` checked the layout)."""
    block_n, block_k, act = module.vcr_fp8
    return fp8.fp8_block_experts(hidden_states, top_k_index, top_k_weights.to(torch.float32),
                                 module.gate_up_proj, module.gate_up_proj_scale_inv,
                                 module.down_proj, module.down_proj_scale_inv, block_n, block_k,
                                 act)


def split_scale(owner: nn.Module, attr: str, name: str, dim: int, starts: list[int],
                length: int) -> None:
    """Keep the block scales of `owner.attr` that cover the weight slices [s, s + length) of
    dim `dim` (its slices a rank keeps), when that weight is FP8; a slice not on block
    boundaries is refused, as vLLM refuses it."""
    if hasattr(owner, "slice_scales"):  # per-channel FP8 (`hf_compressed`)
        owner.slice_scales(dim, ("slice", dim, starts, length, owner.weight.shape[dim]))
        return
    channel = getattr(owner, f"{attr}_weight_scale", None)  # per-channel FP8 experts [E, N, 1]
    if channel is not None:
        if dim % channel.dim() == channel.dim() - 2:  # output channels: theirs
            step = ("slice", dim, starts, length, channel.shape[dim])
            with torch.no_grad():
                kept = hf_shards.cut(channel.detach(), [step]).clone()
            setattr(owner, f"{attr}_weight_scale", hf_shards.keep(channel, kept, step))
        return
    scale_attr = getattr(owner, "scale_name", "weight_scale_inv") if attr == "weight" else \
        f"{attr}_scale_inv"
    scale = getattr(owner, scale_attr, None)
    if scale is None:
        return
    rows = dim % scale.dim() == scale.dim() - 2
    b = owner.block_n if hasattr(owner, "block_n") else owner.vcr_fp8[0 if rows else 1]
    if length % b or any(s % b for s in starts):
        raise UnsupportedModelError(
            f"{name}: a tensor-parallel shard of {length} {'rows' if rows else 'columns'} does "
            f"not fall on the FP8 checkpoint's blocks of {b} (weight_block_size); choose a "
            "tp_size that divides the layer into whole blocks")
    step = ("slice", dim, [s // b for s in starts], length // b, scale.shape[dim])
    with torch.no_grad():
        kept = hf_shards.cut(scale.detach(), [step]).clone()
    setattr(owner, scale_attr, hf_shards.keep(scale, kept, step))

