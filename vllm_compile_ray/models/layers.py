"""Tensor-parallel building blocks shared by the architectures (vLLM's `model_executor/layers`).

Every sharded parameter has a layout `(dim, parts)`: along `dim` the full tensor is the
concatenation of `parts` (one for a plain shard; q|k|v or gate|up for a merged projection), and a
rank holds its `Part` of each. `load_param` copies a checkpoint tensor into that layout, so the
random init (`init.py`) and the checkpoint loader (`checkpoint.py`) slice weights the same way.
A source may be a tensor or a lazy safetensors slice: a rank reads only its rows.
"""

from __future__ import annotations

from collections.abc import Callable

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_compile_ray.errors import ConfigError
from vllm_compile_ray.models import ops
from vllm_compile_ray.models.config import ModelConfig, RopeScaling


@dataclass(frozen=True)
class Part:
    """One slice of a parallel dim: rows [start, start+local) of a full dim of size `full`."""

    full: int
    start: int
    local: int


Layout = tuple[int, list[Part]]  # (dim, parts)


def _shape(src: Any) -> tuple[int, ...]:
    return tuple(src.shape) if isinstance(src, Tensor) else tuple(src.get_shape())


def _narrow(src: Any, dim: int, start: int, length: int) -> Tensor:
    if isinstance(src, Tensor):
        return src.narrow(dim, start, length)
    index = [slice(None)] * len(src.get_shape())  # safetensors PySafeSlice: reads these rows only
    index[dim] = slice(start, start + length)
    return src[tuple(index)]


def full_shape(param: Tensor, layout: Layout | None, shard: int | None = None) -> tuple[int, ...]:
    """Shape of the checkpoint tensor for `param` (for one part when `shard` is given)."""
    shape = list(param.shape)
    if layout is not None:
        dim, parts = layout
        shape[dim] = parts[shard].full if shard is not None else sum(p.full for p in parts)
    return tuple(shape)


@torch.no_grad()
def load_param(param: Tensor, src: Any, layout: Layout | None, shard: int | None = None,
               name: str = "") -> None:
    """Copy this rank's slice of the full tensor `src` (or of part `shard` alone) into `param`;
    rows past the end of a part (the padded vocab) become zeros."""
    want = full_shape(param, layout, shard)
    if _shape(src) != want:
        raise ConfigError(f"checkpoint tensor {name or '?'} has shape {list(_shape(src))}, the "
                          f"model expects {list(want)}")
    if layout is None:
        param.copy_(src if isinstance(src, Tensor) else src[:])
        return
    dim, parts = layout
    full_off = local_off = 0
    for i, p in enumerate(parts):
        if shard is None or shard == i:
            base = 0 if shard is not None else full_off
            n = max(0, min(p.local, p.full - p.start))
            dst = param.narrow(dim, local_off, p.local)
            if n:
                dst.narrow(dim, 0, n).copy_(_narrow(src, dim, base + p.start, n))
            if n < p.local:
                dst.narrow(dim, n, p.local - n).zero_()
        full_off += p.full
        local_off += p.local


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b); the output dim is the concatenation of `parts`, each sharded by rank."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool, dtype: torch.dtype):
        super().__init__()
        out = sum(p.local for p in parts)
        self.weight = _param(out, in_features, dtype=dtype)
        self.bias = _param(out, dtype=dtype) if bias else None
        self.layouts: dict[str, Layout] = {"weight": (0, parts), "bias": (0, parts)}

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b: the input dim is sharded, the bias is whole."""

    def __init__(self, part: Part, out_features: int, bias: bool, tp_size: int,
                 dtype: torch.dtype):
        super().__init__()
        self.tp_size = tp_size
        self.weight = _param(out_features, part.local, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None
        self.layouts: dict[str, Layout] = {"weight": (1, [part])}

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        y = ops.all_reduce(y) if self.tp_size > 1 else y
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(nn.Module):
    """y = x W^T, the whole weight on every rank (the MoE router)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start+shard) of the table; ids outside it look up zeros."""

    def __init__(self, part: Part, hidden_size: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.part, self.tp_size = part, tp_size
        self.weight = _param(part.local, hidden_size, dtype=dtype)
        self.layouts: dict[str, Layout] = {"weight": (0, [part])}
        # [start, end) as a buffer, not Python ints: constants would be baked into the traced
        # code and give every rank its own cache key for the first piece.
        self.register_buffer("shard_range", self.range_tensor(), persistent=False)

    def range_tensor(self) -> Tensor:
        return torch.tensor([self.part.start, self.part.start + self.part.local], dtype=torch.long)

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        return vocab_shard_lookup(input_ids, self.shard_range,
                                  lambda ids: F.embedding(ids, self.weight))


def vocab_shard_lookup(input_ids: Tensor, shard_range: Tensor,
                       lookup: Callable[[Tensor], Tensor]) -> Tensor:
    """A vocab-parallel lookup: `lookup` of this rank's rows [start, end) (`shard_range`, a
    buffer: equal code on every rank), zeros for ids elsewhere, summed over the ranks."""
    start, end = shard_range[0], shard_range[1]
    mask = (input_ids >= start) & (input_ids < end)  # [T]
    x = lookup(torch.where(mask, input_ids - start, 0))
    return ops.all_reduce(x.masked_fill(~mask.unsqueeze(-1), 0))


class RMSNorm(nn.Module):
    """vLLM's fused add+norm: `norm(x)` -> y, `norm(x, residual)` -> (y, x + residual).

    offset=1.0 is Gemma's norm: the checkpoint stores w and the scale is (1 + w), in float32."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = _param(hidden_size, dtype=dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            y = (xf * (self.offset + self.weight.float())).to(x.dtype)
        else:
            y = xf.to(x.dtype) * self.weight
        return y if residual is None else (y, residual)


def input_norm(norm: RMSNorm, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """A decoder layer's first norm -> (y, residual): the first layer has no residual yet (it
    starts as x), every later one adds the previous layer's output to it (fused add+norm)."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class RotaryEmbedding(nn.Module):
    """Neox-style rope from a [max_pos, D] cos|sin cache indexed by positions (a buffer, so no
    device is ever named inside forward)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.register_buffer("cos_sin_cache", self.compute_cache().to(dtype), persistent=False)

    def compute_cache(self) -> Tensor:
        """[max_pos, D] float32 on the current default device: cos | sin."""
        d, theta = self.head_dim, self.cfg.rope_theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        if self.cfg.rope_scaling is not None:
            inv_freq = _llama3_scale(inv_freq, self.cfg.rope_scaling)
        t = torch.arange(self.cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # [T, D/2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # [T, heads, D]; never reshape(t, -1, ..): dynamo guards t != 1
        x = x.unflatten(-1, (-1, self.head_dim))
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.flatten(-2)


def _llama3_scale(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1 frequency scaling (HF `_compute_llama3_parameters`)."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mid, out)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
