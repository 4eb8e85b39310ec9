"""Custom ops the model zoo calls: the graph splitter cuts at these (like vLLM's unified attention).

Both are opaque to dynamo (a `torch.library.custom_op` node in the FX graph) and have fake impls,
so models trace on meta and with symbolic token counts. In an FX graph dynamo produced, a node's
target is the packet `torch.ops.vcr.attention` (it prints as `vcr.attention`), not `.default`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

ATTENTION_OP = "vcr::attention"
ALL_REDUCE_OP = "vcr::all_reduce"


def _attention(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, scale: float
) -> Tensor:
    """Causal GQA over one flat sequence. q: [T, Hq*D], k/v: [T, Hkv*D] -> [T, Hq*D]."""
    t = q.shape[0]
    qh = q.reshape(t, num_heads, head_dim).transpose(0, 1)  # [Hq, T, D]
    kh = k.reshape(t, num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, T, D]
    vh = v.reshape(t, num_kv_heads, head_dim).transpose(0, 1)
    out = F.scaled_dot_product_attention(
        qh, kh, vh, is_causal=True, scale=scale, enable_gqa=num_heads != num_kv_heads
    )  # [Hq, T, D]
    return out.transpose(0, 1).reshape(t, num_heads * head_dim)


def _attention_fake(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, scale: float
) -> Tensor:
    return q.new_empty((q.shape[0], num_heads * head_dim))


def _all_reduce(x: Tensor) -> Tensor:
    """Sum over the default process group; a copy when not distributed (ops must not alias)."""
    out = x.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def _all_reduce_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x)


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

attention = torch.ops.vcr.attention
all_reduce = torch.ops.vcr.all_reduce
