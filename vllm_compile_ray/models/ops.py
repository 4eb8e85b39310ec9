"""Custom ops the models call: the graph splitter cuts at these (like vLLM's unified attention).

Both are opaque to dynamo (a `torch.library.custom_op` node in the FX graph) and have fake impls,
so models trace on meta and with symbolic token counts. In an FX graph dynamo produced, a node's
target is the packet `torch.ops.vcr.attention` (it prints as `vcr.attention`), not `.default`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

ATTENTION_OP = "vcr::attention"
ALL_REDUCE_OP = "vcr::all_reduce"
ALL_GATHER_OP = "vcr::all_gather"


def _attention(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    scale: float, sliding_window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None,
    heads_first: bool = False, chunk: int = 0,
) -> Tensor:
    """Causal grouped-query attention over flat tokens.

    q: [*B, T, Hq*D], k: [*B, S, Hkv*D], v: [*B, S, Hkv*Dv] -> [*B, T, Hq*Dv] (Dv: the values'
    head dim, D unless the model says otherwise: DeepSeek's MLA), S >= T; query i sits at key position
    S - T + i (a prefix of S - T cached tokens). sliding_window > 0: a query sees the last
    `sliding_window` keys up to itself (itself included), as transformers counts it. softcap > 0:
    scores become softcap * tanh(scores / softcap) before the softmax. sinks: [Hq] logits of one
    virtual key per head that takes part in the softmax and adds nothing to the output.
    chunk > 0: positions split into chunks of `chunk` tokens and a query sees the keys of its own
    chunk only (Llama 4's chunked layers, as transformers masks them). heads_first: q: [*B, Hq, T, D], k/v: [*B, Hkv, S, D] (transformers' layout, any strides), so
    the caller merges no dims. Merging heads of a view that is contiguous only when T == 1 (a
    fused qkv split, rotary outputs) makes dynamo guard T != 1: reshape asks is_contiguous,
    which c10's SymbolicShapeMeta::compute_contiguous answers with a plain guard, not covered by
    backed_size_oblivious (torch 2.13).
    """
    if heads_first:
        qh, kh, vh = q, k, v
        batch, t, s = q.shape[:-3], q.shape[-2], k.shape[-2]
    else:
        *batch, t, _ = q.shape
        s = k.shape[-2]
        qh = q.reshape(*batch, t, num_heads, head_dim).transpose(-2, -3)  # [*B, Hq, T, D]
        kh = k.reshape(*batch, s, num_kv_heads, head_dim).transpose(-2, -3)  # [*B, Hkv, S, D]
        vh = v.reshape(*batch, s, num_kv_heads, -1).transpose(-2, -3)
    plain = sliding_window <= 0 and softcap <= 0 and sinks is None and chunk <= 0
    if plain and s == t:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=num_heads != num_kv_heads)
    else:
        out = _attention_math(qh, kh, vh, scale, sliding_window, softcap, sinks, chunk)
    return out.transpose(-2, -3).reshape(*batch, t, num_heads * vh.shape[-1])


def _attention_math(qh: Tensor, kh: Tensor, vh: Tensor, scale: float, sliding_window: int,
                    softcap: float, sinks: Tensor | None, chunk: int = 0) -> Tensor:
    """Scores, mask and softmax written out: for softcaps, sinks, windows, chunks and cached
    prefixes."""
    t, s = qh.shape[-2], kh.shape[-2]
    groups = qh.shape[-3] // kh.shape[-3]
    kh = kh.repeat_interleave(groups, dim=-3)  # [*B, Hq, S, D]
    vh = vh.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [*B, Hq, T, S]
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(t, device=qh.device).unsqueeze(-1) + (s - t)  # [T, 1]
    k_pos = torch.arange(s, device=qh.device).unsqueeze(0)  # [1, S]
    allowed = k_pos <= q_pos
    if sliding_window > 0:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    if chunk > 0:
        allowed = allowed & (k_pos // chunk == q_pos // chunk)
    scores = scores.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)  # [*B, Hq, T, S + 1]
    probs = torch.softmax(scores.float(), dim=-1).to(vh.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, vh)


def _attention_fake(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    scale: float, sliding_window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None,
    heads_first: bool = False, chunk: int = 0,
) -> Tensor:
    if heads_first:  # values may have their own head dim (DeepSeek's MLA: 128 vs 192)
        return q.new_empty((*q.shape[:-3], q.shape[-2], num_heads * v.shape[-1]))
    return q.new_empty((*q.shape[:-1], num_heads * (v.shape[-1] // num_kv_heads)))


def _all_reduce(x: Tensor) -> Tensor:
    """Sum over the default process group; a copy when not distributed (ops must not alias)."""
    out = x.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def _all_reduce_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _all_gather(x: Tensor, world_size: int) -> Tensor:
    """The ranks' `x` side by side on the last dim, rank order ([..., n] -> [..., n*world_size]).
    Not distributed (a compile task checking what it built): `x` repeated, the right shape."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_world_size() != world_size:
            raise RuntimeError(f"vcr::all_gather for {world_size} ranks in a process group of "
                               f"{dist.get_world_size()}")
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)
    return x.repeat(*([1] * (x.dim() - 1)), world_size)


def _all_gather_fake(x: Tensor, world_size: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] * world_size))


def _registered(qualname: str) -> bool:
    ns, name = qualname.split("::")
    return hasattr(getattr(torch.ops, ns), name)


# Idempotent: a second import of this module (importlib.reload, two copies on sys.path) must not
# try to define the ops again, which torch.library refuses.
if not _registered(ATTENTION_OP):
    torch.library.custom_op(ATTENTION_OP, mutates_args=())(_attention).register_fake(
        _attention_fake
    )
if not _registered(ALL_REDUCE_OP):
    torch.library.custom_op(ALL_REDUCE_OP, mutates_args=())(_all_reduce).register_fake(
        _all_reduce_fake
    )

if not _registered(ALL_GATHER_OP):
    torch.library.custom_op(ALL_GATHER_OP, mutates_args=())(_all_gather).register_fake(
        _all_gather_fake
    )

attention = torch.ops.vcr.attention
all_reduce = torch.ops.vcr.all_reduce
all_gather = torch.ops.vcr.all_gather
