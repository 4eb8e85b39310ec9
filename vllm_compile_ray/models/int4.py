"""Integer weight-only quantized linear layers and fused experts (AWQ and GPTQ checkpoints): the
`vcr::int4_linear` and `vcr::int4_experts` custom ops.

The layouts, as AutoAWQ and GPTQ write them (K input features, N output features, g the group
size; `bits` values packed in each int32, the lowest bits first):
- AWQ (`version: "gemm"`, 4 bits): `qweight` [K, N/8], `qzeros` [K/g, N/8] packed along N in
  AWQ's interleaved order (the 8 columns of a word sit at nibbles 0, 4, 1, 5, 2, 6, 3, 7),
  `scales` [K/g, N];
- GPTQ: `qweight` [K/(32/bits), N] packed along K, `qzeros` [K/g, N/(32/bits)] packed along N,
  `scales` [K/g, N], `g_idx` [K] (the group of each input feature: activation order). The
  original GPTQ format stores each zero point minus one (`zero_offset` 1; "gptq_v2": 0);
- compressed-tensors "pack-quantized" ("ct", symmetric): `weight_packed` [N, K/(32/bits)]
  packed along K, `weight_scale` [N, K/g]; a value q stands for q - 2**(bits-1)
  (`zero_offset`).
The weight is W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n] and the layer x @ W.
The op dequantizes and multiplies in float32 (weight-only: activations stay in their dtype), one
opaque node to dynamo, like vLLM's AWQ / GPTQ kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

LINEAR_OP = "vcr::int4_linear"
EXPERTS_OP = "vcr::int4_experts"
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # the nibble holding each of a word's 8 columns


def _shifts(bits: int, ndim: int, dim: int, device: torch.device) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return torch.arange(0, 32, bits, device=device, dtype=torch.int64).view(shape)


def unpack(packed: Tensor, bits: int, dim: int) -> Tensor:
    """int32 words -> their `32 // bits` values each, along `dim` (lowest bits first)."""
    words = packed.to(torch.int64).unsqueeze(dim + 1)
    values = (words >> _shifts(bits, words.dim(), dim + 1, packed.device)) & ((1 << bits) - 1)
    return values.flatten(dim, dim + 1)


def pack(values: Tensor, bits: int, dim: int) -> Tensor:
    """`unpack`'s inverse: values in [0, 2**bits) -> int32 words along `dim`."""
    v = values.to(torch.int64).unflatten(dim, (values.shape[dim] * bits // 32, 32 // bits))
    words = (v << _shifts(bits, v.dim(), dim + 1, values.device)).sum(dim + 1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def dequantize(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
               layout: str, zero_offset: int) -> Tensor:
    """W [K, N] in float32."""
    if layout == "ct":  # [N, K] rows of the nn.Linear weight
        w = unpack(qweight, bits, 1) - zero_offset
        return (w.float() * scales[:, g_idx.long()].float()).T
    if layout == "awq":
        order = torch.tensor(AWQ_ORDER, device=qweight.device)
        w = unpack(qweight, bits, 1).unflatten(1, (-1, 8))[..., order].flatten(1)
        z = unpack(qzeros, bits, 1).unflatten(1, (-1, 8))[..., order].flatten(1)
    else:
        w = unpack(qweight, bits, 0)
        z = unpack(qzeros, bits, 1) + zero_offset
    g = g_idx.long()
    return (w - z[g]).float() * scales[g].float()


def _int4_linear(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor,
                 bits: int, layout: str, zero_offset: int) -> Tensor:
    w = dequantize(qweight, qzeros, scales, g_idx, bits, layout, zero_offset)
    return (x.reshape(-1, x.shape[-1]).float() @ w).to(x.dtype).reshape(*x.shape[:-1],
                                                                         w.shape[1])


def _int4_linear_fake(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor,
                      bits: int, layout: str, zero_offset: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0] if layout == "ct" else scales.shape[1])


def _int4_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, w13: Tensor,
                  w13_zeros: Tensor, w13_scales: Tensor, w13_g_idx: Tensor, w2: Tensor,
                  w2_zeros: Tensor, w2_scales: Tensor, w2_g_idx: Tensor, bits: int, layout: str,
                  zero_offset: int, activation: str) -> Tensor:
    """Fused experts with packed weights ([E, ...] each, `dequantize`'s layouts): x [T, H],
    top_k_index / top_k_weights [T, K] -> sum_k w_k * down_e(act(gate_e x) * up_e x); gate and
    up are the first and second half of w13's output features."""
    from .fp8 import ACTIVATIONS
    from .moe import routed

    act = ACTIVATIONS[activation]

    def expert(e: int, xe: Tensor) -> Tensor:
        w1 = dequantize(w13[e], w13_zeros[e], w13_scales[e], w13_g_idx[e], bits, layout,
                        zero_offset)
        gate, up = (xe.float() @ w1).to(x.dtype).chunk(2, dim=-1)
        return (act(gate) * up).float() @ dequantize(w2[e], w2_zeros[e], w2_scales[e],
                                                      w2_g_idx[e], bits, layout, zero_offset)

    return routed(x, top_k_index, top_k_weights, expert)


def _int4_experts_fake(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, w13: Tensor,
                       w13_zeros: Tensor, w13_scales: Tensor, w13_g_idx: Tensor, w2: Tensor,
                       w2_zeros: Tensor, w2_scales: Tensor, w2_g_idx: Tensor, bits: int,
                       layout: str, zero_offset: int, activation: str) -> Tensor:
    return torch.empty_like(x)


if not hasattr(torch.ops.vcr, "int4_linear"):  # idempotent, as in ops.py
    torch.library.custom_op(LINEAR_OP, mutates_args=())(_int4_linear).register_fake(
        _int4_linear_fake)
    torch.library.custom_op(EXPERTS_OP, mutates_args=())(_int4_experts).register_fake(
        _int4_experts_fake)

int4_linear = torch.ops.vcr.int4_linear
int4_experts = torch.ops.vcr.int4_experts
