"""Mixture of experts: the `vcr::moe` custom op and the sparse MoE block (router + experts).

The whole expert computation (softmax routing, top-k, each expert's gated MLP, the weighted sum)
is ONE custom op with a fake impl, like vLLM's fused_moe: dynamo records a single opaque node, so
the data-dependent routing never reaches the graph and MoE layers still share one compiled piece.

Tensor parallel as in vLLM's FusedMoE: every rank holds every expert, each expert's intermediate
dim is sharded; the op returns this rank's partial sum and the block all-reduces it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_compile_ray.models import ops
from vllm_compile_ray.models.layers import Layout, Part, ReplicatedLinear, _param

MOE_OP = "vcr::moe"


def _moe(x: Tensor, router_logits: Tensor, gate_up: Tensor, down: Tensor, top_k: int,
         renormalize: bool) -> Tensor:
    """x: [T, H], router_logits: [T, E], gate_up: [E, 2I, H], down: [E, H, I] -> [T, H].

    Routing as transformers: softmax over all experts in float32, the top_k, renormalized to sum
    to 1 when `renormalize`; out = sum_k w_k * down_e(silu(gate_e x) * up_e x)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for e in experts.unique().tolist():  # eager loop over the experts hit
        token, slot = torch.where(experts == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e])  # [n, H]
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def routed(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
           expert: Callable[[int, Tensor], Tensor]) -> Tensor:
    """sum_k w_k * expert(e_k, x) over the router's choice (top_k_index / top_k_weights [T, K]),
    each expert run once on the tokens that chose it, accumulated in float32, in x's dtype:
    the loop of every quantized experts op (`fp8`, `mxfp4`, `int4`)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in top_k_index.unique().tolist():  # the experts hit
        token, slot = torch.where(top_k_index == e)
        y = expert(e, x[token])
        out.index_add_(0, token, y.float() * top_k_weights[token, slot, None].float())
    return out.to(x.dtype)


def _moe_fake(x: Tensor, router_logits: Tensor, gate_up: Tensor, down: Tensor, top_k: int,
              renormalize: bool) -> Tensor:
    return torch.empty_like(x)


if not hasattr(torch.ops.vcr, "moe"):  # idempotent, as in ops.py
    torch.library.custom_op(MOE_OP, mutates_args=())(_moe).register_fake(_moe_fake)

moe = torch.ops.vcr.moe


class FusedExperts(nn.Module):
    """All experts' weights as two 3-D parameters (transformers 5 names them the same):
    gate_up_proj [E, 2 I/tp, H] (gate | up), down_proj [E, H, I/tp]."""

    def __init__(self, num_experts: int, hidden_size: int, part: Part, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = _param(num_experts, 2 * part.local, hidden_size, dtype=dtype)
        self.down_proj = _param(num_experts, hidden_size, part.local, dtype=dtype)
        self.layouts: dict[str, Layout] = {"gate_up_proj": (1, [part, part]),
                                           "down_proj": (2, [part])}


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated) + experts; x: [T, H] -> [T, H]."""

    def __init__(self, num_experts: int, top_k: int, renormalize: bool, hidden_size: int,
                 part: Part, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.top_k, self.renormalize, self.tp_size = top_k, renormalize, tp_size
        self.gate = ReplicatedLinear(hidden_size, num_experts, dtype)
        self.experts = FusedExperts(num_experts, hidden_size, part, dtype)

    def forward(self, x: Tensor) -> Tensor:
        router_logits = self.gate(x)  # [T, E]
        y = moe(x, router_logits, self.experts.gate_up_proj, self.experts.down_proj, self.top_k,
                self.renormalize)
        return ops.all_reduce(y) if self.tp_size > 1 else y
