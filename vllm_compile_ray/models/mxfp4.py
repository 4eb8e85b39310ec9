"""MXFP4 experts (gpt-oss checkpoints): the `vcr::mxfp4_experts` custom op.

gpt-oss ships its experts in MXFP4 (config.json `quantization_config.quant_method: "mxfp4"`):
a weight [..., N, K] is stored as `*_blocks` [..., N, K/32, 16] uint8 (two FP4 e2m1 values a
byte, the low nibble first) and `*_scales` [..., N, K/32] uint8 (one power of two a group of 32:
2^(scale - 127)). The rest of the model (attention, router, embeddings) is unquantized.

The op is the whole expert computation of gpt-oss (transformers' `GptOssExperts`: interleaved
gate/up, clamped swiglu with `alpha` and `limit`, biases) over the router's choice, one opaque
node like vLLM's fused MoE. Activations stay in their dtype (weight-only quantization); the
kernel dequantizes the hit experts' weights, which are exact in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moe import routed

EXPERTS_OP = "vcr::mxfp4_experts"
GROUP = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # a nibble's low 3 bits; bit 3 is the sign


def dequantize(blocks: Tensor, scales: Tensor) -> Tensor:
    """blocks [..., N, G, 16] uint8, scales [..., N, G] uint8 -> weight [..., N, G*32] float32."""
    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32,
                       device=blocks.device)
    b = blocks.to(torch.int64)
    values = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).flatten(-2)  # [..., N, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., N, K] (K a multiple of 32) -> (blocks, scales) as a gpt-oss checkpoint stores it:
    each group of 32 scaled by the power of two that brings its largest value within 6, each
    value rounded to the nearest e2m1."""
    groups = w.float().unflatten(-1, (w.shape[-1] // GROUP, GROUP))
    amax = groups.abs().amax(dim=-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(exp), exp.to(torch.int32))[..., None]
    grid = torch.tensor(E2M1, device=w.device)
    code = (scaled.abs()[..., None] - grid).abs().argmin(dim=-1)  # nearest magnitude
    code = code + 8 * (scaled < 0).to(code.dtype)
    pairs = code.unflatten(-1, (GROUP // 2, 2))
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def _mxfp4_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_blocks: Tensor,
                   gate_up_scales: Tensor, gate_up_bias: Tensor, down_blocks: Tensor,
                   down_scales: Tensor, down_bias: Tensor, alpha: float, limit: float,
                   down_offset: int, inner: int) -> Tensor:
    """x [T, H], top_k_index / top_k_weights [T, K] -> [T, H]. gate_up [E, 2I, H] (rows: gate
    and up interleaved), down [E, H, I]. A tensor-parallel rank's down blocks may cover more
    than its I columns (a 32-group across two ranks): it uses `inner` columns from
    `down_offset`."""
    def expert(e: int, xe: Tensor) -> Tensor:
        gate_up = xe.float() @ dequantize(gate_up_blocks[e], gate_up_scales[e]).T + \
            gate_up_bias[e].float()
        gate = gate_up[:, ::2].clamp(max=limit)
        up = gate_up[:, 1::2].clamp(min=-limit, max=limit)
        gated = ((up + 1) * (gate * torch.sigmoid(gate * alpha))).to(x.dtype).float()
        down = dequantize(down_blocks[e], down_scales[e])[:, down_offset:down_offset + inner]
        return gated @ down.T + down_bias[e].float()

    return routed(x, top_k_index, top_k_weights, expert)


def _mxfp4_experts_fake(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                        gate_up_blocks: Tensor, gate_up_scales: Tensor, gate_up_bias: Tensor,
                        down_blocks: Tensor, down_scales: Tensor, down_bias: Tensor,
                        alpha: float, limit: float, down_offset: int, inner: int) -> Tensor:
    return torch.empty_like(x)


if not hasattr(torch.ops.vcr, "mxfp4_experts"):  # idempotent, as in ops.py
    torch.library.custom_op(EXPERTS_OP, mutates_args=())(_mxfp4_experts).register_fake(
        _mxfp4_experts_fake)

mxfp4_experts = torch.ops.vcr.mxfp4_experts
