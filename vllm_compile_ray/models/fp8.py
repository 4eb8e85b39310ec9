"""FP8 linear layers and experts: the `vcr::fp8_block_linear`, `vcr::fp8_block_experts` and
`vcr::fp8_scaled_linear` custom ops.

The scheme of DeepSeek-V3/R1 and the Qwen3 "-FP8" checkpoints (config.json
`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [bn, bk]}`), as vLLM serves it (W8A8 block FP8):

- a weight [N, K] is float8_e4m3fn with one float32 scale per [bn, bk] block,
  `weight_scale_inv` [ceil(N/bn), ceil(K/bk)] (the weight is `weight * scale`);
- activations are quantized per token and group of bk columns at every call (scale = the
  group's max magnitude / 448);
- out = sum over column groups of (x_q @ w_q^T) * x_scale * w_scale, accumulated in float32 and
  returned in the activations' dtype.

`vcr::fp8_scaled_linear` is the per-channel / per-tensor scheme of compressed-tensors
("float-quantized", the "-FP8" / "-FP8-dynamic" Llama, Qwen and Mistral checkpoints) and FBGEMM
FP8: a float8 weight with `weight_scale` [N, 1] or [1]; activations quantized per token at every
call (the max magnitude capped by `input_scale_ub` for FBGEMM) or by a calibrated per-tensor
`input_scale`; out = (x_q @ w_q^T) * x_scale * w_scale.

Each op is one opaque node to dynamo (like vLLM's `apply_w8a8_block_fp8_linear` and fused MoE),
so a quantized layer splits and canonicalizes like an unquantized one. The kernel here is that
arithmetic in torch (dequantize the operands, one float32 matmul), on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .moe import routed

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
LINEAR_OP = "vcr::fp8_block_linear"
EXPERTS_OP = "vcr::fp8_block_experts"
SCALED_OP = "vcr::fp8_scaled_linear"
SCALED_EXPERTS_OP = "vcr::fp8_scaled_experts"
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def quantize(w: Tensor, block_n: int, block_k: int) -> tuple[Tensor, Tensor]:
    """(weight in float8_e4m3fn, weight_scale_inv [..., ceil(N/bn), ceil(K/bk)]) of `w`
    [..., N, K], one scale per block: what an FP8 checkpoint stores for it."""
    *lead, n, k = w.shape
    nb, kb = -(-n // block_n), -(-k // block_k)
    padded = F.pad(w.float(), (0, kb * block_k - k, 0, nb * block_n - n))
    blocks = padded.unflatten(-1, (kb, block_k)).unflatten(-3, (nb, block_n))  # [..,nb,bn,kb,bk]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX  # [..., nb, kb]
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.flatten(-2).flatten(-3, -2)[..., :n, :k].to(FP8)
    return q.contiguous(), scale.contiguous()


def dequantize(q: Tensor, scale: Tensor, block_n: int, block_k: int) -> Tensor:
    """`q` [..., N, K] (float8) times its block scales, in float32."""
    n, k = q.shape[-2:]
    s = scale.repeat_interleave(block_n, dim=-2).repeat_interleave(block_k, dim=-1)
    return q.float() * s[..., :n, :k]


def quantize_activations(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (float8 x, scales [M, ceil(K/group)]): per token and group of columns."""
    m, k = x.shape
    groups = -(-k // group)
    xg = F.pad(x.float(), (0, groups * group - k)).unflatten(-1, (groups, group))
    scale = xg.abs().amax(dim=-1).clamp(min=1e-10) / FP8_MAX
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[:, :k], scale


def _linear(x: Tensor, weight: Tensor, scale: Tensor, block_n: int, block_k: int) -> Tensor:
    """x [M, K] (any float dtype) @ dequantized weight^T -> [M, N] float32, with the
    activations quantized as vLLM's W8A8 block kernels do."""
    xq, xs = quantize_activations(x, block_k)
    xd = dequantize(xq[:, None, :], xs[:, None, :], 1, block_k)[:, 0]
    return xd @ dequantize(weight, scale, block_n, block_k).T


def _fp8_block_linear(x: Tensor, weight: Tensor, weight_scale_inv: Tensor, block_n: int,
                      block_k: int) -> Tensor:
    """x [..., K] -> [..., N] in x's dtype."""
    out = _linear(x.reshape(-1, x.shape[-1]), weight, weight_scale_inv, block_n, block_k)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _fp8_block_linear_fake(x: Tensor, weight: Tensor, weight_scale_inv: Tensor, block_n: int,
                           block_k: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fp8_block_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor,
                       gate_up_scale: Tensor, down: Tensor, down_scale: Tensor, block_n: int,
                       block_k: int, activation: str) -> Tensor:
    """transformers' fused experts, FP8: x [T, H], top_k_index / top_k_weights [T, K] (the
    router's choice), gate_up [E, 2I, H] (gate | up), down [E, H, I] -> [T, H]:
    sum_k w_k * down_e(act(gate_e x) * up_e x), each projection an FP8 block linear."""
    act = ACTIVATIONS[activation]

    def expert(e: int, xe: Tensor) -> Tensor:
        gate, up = _linear(xe, gate_up[e], gate_up_scale[e], block_n,
                           block_k).to(x.dtype).chunk(2, dim=-1)
        return _linear(act(gate) * up, down[e], down_scale[e], block_n, block_k)

    return routed(x, top_k_index, top_k_weights, expert)


def _fp8_block_experts_fake(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                            gate_up: Tensor, gate_up_scale: Tensor, down: Tensor,
                            down_scale: Tensor, block_n: int, block_k: int,
                            activation: str) -> Tensor:
    return torch.empty_like(x)


def _fp8_scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor,
                       input_scale: Tensor | None, input_scale_ub: Tensor | None) -> Tensor:
    """x [..., K] -> [..., N] in x's dtype (weight [N, K] float8, weight_scale [N, 1] or [1])."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if input_scale is not None:  # static: one calibrated scale
        xs = input_scale.float().reshape(1, 1)
    else:  # dynamic, per token
        amax = x2.abs().amax(dim=-1, keepdim=True)
        if input_scale_ub is not None:
            amax = torch.minimum(amax, input_scale_ub.float().reshape(1, 1))
        xs = amax.clamp(min=1e-12) / FP8_MAX
    xq = (x2 / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = (xq.float() @ weight.float().T) * xs * weight_scale.float().reshape(1, -1)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _fp8_scaled_linear_fake(x: Tensor, weight: Tensor, weight_scale: Tensor,
                            input_scale: Tensor | None, input_scale_ub: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fp8_scaled_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor,
                        gate_up_scale: Tensor, down: Tensor, down_scale: Tensor,
                        activation: str) -> Tensor:
    """Fused experts with float8 weights and per-output-channel scales ([E, N, 1]), activations
    quantized per token (compressed-tensors "-FP8-dynamic" MoE): x [T, H] -> [T, H]."""
    act = ACTIVATIONS[activation]

    def expert(e: int, xe: Tensor) -> Tensor:
        gate, up = _fp8_scaled_linear(xe, gate_up[e], gate_up_scale[e], None,
                                      None).chunk(2, dim=-1)
        return _fp8_scaled_linear(act(gate) * up, down[e], down_scale[e], None, None)

    return routed(x, top_k_index, top_k_weights, expert)


def _fp8_scaled_experts_fake(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                             gate_up: Tensor, gate_up_scale: Tensor, down: Tensor,
                             down_scale: Tensor, activation: str) -> Tensor:
    return torch.empty_like(x)


if not hasattr(torch.ops.vcr, "fp8_block_linear"):  # idempotent, as in ops.py
    torch.library.custom_op(LINEAR_OP, mutates_args=())(_fp8_block_linear).register_fake(
        _fp8_block_linear_fake)
    torch.library.custom_op(EXPERTS_OP, mutates_args=())(_fp8_block_experts).register_fake(
        _fp8_block_experts_fake)
    torch.library.custom_op(SCALED_OP, mutates_args=())(_fp8_scaled_linear).register_fake(
        _fp8_scaled_linear_fake)
    torch.library.custom_op(SCALED_EXPERTS_OP, mutates_args=())(_fp8_scaled_experts).register_fake(
        _fp8_scaled_experts_fake)

fp8_block_linear = torch.ops.vcr.fp8_block_linear
fp8_block_experts = torch.ops.vcr.fp8_block_experts
fp8_scaled_linear = torch.ops.vcr.fp8_scaled_linear
fp8_scaled_experts = torch.ops.vcr.fp8_scaled_experts
