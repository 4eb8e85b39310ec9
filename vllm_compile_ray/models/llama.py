"""A vLLM-shaped Llama decoder (also Qwen2: qkv bias) on flat tokens, tensor-parallel by shape.

`forward(input_ids[T], positions[T]) -> hidden[T, H]`; the lm_head runs separately in
`compute_logits`, as in vLLM, so the compiled graph is the decoder only. Attention and the
tensor-parallel all-reduce are the custom ops in `ops.py`, which the splitter cuts at.

Each rank holds its shard of every parallel weight; `init_weights` generates each FULL weight from
a seeded generator keyed by its name and slices it, so ranks 0..tp-1 together equal the tp=1 model.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_compile_ray.models import ops
from vllm_compile_ray.models.config import LlamaConfig, RopeScaling, TPShapes  # noqa: F401

INIT_STD = 0.02


@dataclass(frozen=True)
class Part:
    """One slice of a parallel dim: rows [start, start+local) of a full dim of size `full`."""

    full: int
    start: int
    local: int


def _take(full: Tensor, dim: int, parts: list[Part]) -> Tensor:
    """Concatenate each part's slice of `full` along `dim`, zero-padding past the end (vocab)."""
    offset, pieces = 0, []
    for p in parts:
        piece = full.narrow(dim, offset + p.start, max(0, min(p.local, p.full - p.start)))
        if piece.shape[dim] < p.local:
            pad_shape = list(full.shape)
            pad_shape[dim] = p.local - piece.shape[dim]
            piece = torch.cat([piece, full.new_zeros(pad_shape)], dim)
        pieces.append(piece)
        offset += p.full
    return torch.cat(pieces, dim)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b); the output dim is the concatenation of `parts`, each sharded by rank."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.parts = parts
        out = sum(p.local for p in parts)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        out = sum(p.full for p in self.parts)
        shapes = {"weight": (out, self.weight.shape[1])}
        if self.bias is not None:
            shapes["bias"] = (out,)
        return shapes

    def shard(self, name: str, full: Tensor) -> Tensor:
        return _take(full, 0, self.parts)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T): the input dim is sharded; no bias (Llama, Qwen2)."""

    def __init__(self, part: Part, out_features: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.part, self.tp_size = part, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, part.local, dtype=dtype),
                                   requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        return ops.all_reduce(y) if self.tp_size > 1 else y

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.weight.shape[0], self.part.full)}

    def shard(self, name: str, full: Tensor) -> Tensor:
        return _take(full, 1, [self.part])


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start+shard) of the table; ids outside it look up zeros."""

    def __init__(self, part: Part, hidden_size: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.part, self.tp_size = part, tp_size
        self.weight = nn.Parameter(torch.empty(part.local, hidden_size, dtype=dtype),
                                   requires_grad=False)
        # [start, end) as a buffer, not Python ints: constants would be baked into the traced
        # code and give every rank its own cache key for the first piece.
        self.register_buffer("shard_range", self.range_tensor(), persistent=False)

    def range_tensor(self) -> Tensor:
        return torch.tensor([self.part.start, self.part.start + self.part.local], dtype=torch.long)

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        start, end = self.shard_range[0], self.shard_range[1]
        mask = (input_ids >= start) & (input_ids < end)  # [T]
        x = F.embedding(torch.where(mask, input_ids - start, 0), self.weight)
        return ops.all_reduce(x.masked_fill(~mask.unsqueeze(-1), 0))

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.part.full, self.weight.shape[1])}

    def shard(self, name: str, full: Tensor) -> Tensor:
        return _take(full, 0, [self.part])


class RMSNorm(nn.Module):
    """vLLM's fused add+norm: `norm(x)` -> y, `norm(x, residual)` -> (y, x + residual)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = xf.to(x.dtype) * self.weight
        return y if residual is None else (y, residual)


class RotaryEmbedding(nn.Module):
    """Neox-style rope from a [max_pos, D] cos|sin cache indexed by positions (a buffer, so no
    device is ever named inside forward)."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype):
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
        x = x.unflatten(-1, (-1, self.head_dim))  # [T, heads, D]; never reshape(t, -1, ..): dynamo guards t != 1
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


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TPShapes, tp_size: int, rank: int,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = tp.num_heads, tp.num_kv_heads, d
        self.q_size, self.kv_size = tp.num_heads * d, tp.num_kv_heads * d
        self.scale = d ** -0.5
        q = Part(cfg.num_attention_heads * d, rank * self.q_size, self.q_size)
        kv = Part(cfg.num_key_value_heads * d, tp.kv_head_start * d, self.kv_size)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [q, kv, kv], cfg.attention_bias,
                                             dtype)
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, tp_size, dtype)
        self.rotary_emb = rotary_emb

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        qkv = self.qkv_proj(x)  # [T, (hq + 2 hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        o = ops.attention(q, k, v, self.num_heads, self.num_kv_heads, self.head_dim, self.scale)
        return self.o_proj(o)  # [T, H]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TPShapes, tp_size: int, rank: int,
                 dtype: torch.dtype):
        super().__init__()
        part = Part(cfg.intermediate_size, rank * tp.intermediate_size, tp.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [part, part], False, dtype)
        self.down_proj = RowParallelLinear(part, cfg.hidden_size, tp_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I/tp] each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TPShapes, tp_size: int, rank: int,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, tp, tp_size, rank, rotary_emb, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, tp, tp_size, rank, dtype)

    def forward(self, positions: Tensor, x: Tensor, residual: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp_size: int, rank: int, dtype: torch.dtype):
        super().__init__()
        tp = TPShapes.of(cfg, tp_size, rank)
        self.vocab_part = Part(cfg.vocab_size, rank * tp.vocab_shard, tp.vocab_shard)
        self.embed_tokens = VocabParallelEmbedding(self.vocab_part, cfg.hidden_size, tp_size,
                                                   dtype)
        # One rope cache shared by all layers (vLLM's get_rope caches it the same way).
        rotary_emb = RotaryEmbedding(cfg, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, tp, tp_size, rank, rotary_emb, dtype)
            for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """The decoder plus a vocab-parallel lm_head used only by `compute_logits`."""

    def __init__(self, config: LlamaConfig, tp_size: int = 1, rank: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or config.dtype
        self.config, self.tp_size, self.rank = config, tp_size, rank
        self.model = LlamaModel(config, tp_size, rank, dtype)
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = VocabParallelEmbedding(self.model.vocab_part, config.hidden_size,
                                                  tp_size, dtype)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """input_ids, positions: [T] int64 -> hidden_states [T, H]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        """[T, H] -> [T, vocab]. With tp_size > 1, gathers the rank shards over the default
        process group, which must then be initialized with world size tp_size."""
        logits = F.linear(hidden_states, self.lm_head.weight)  # [T, vocab_shard]
        if self.tp_size > 1:
            if not (dist.is_initialized() and dist.get_world_size() == self.tp_size):
                raise RuntimeError(f"compute_logits with tp_size={self.tp_size} needs an "
                                   f"initialized process group of world size {self.tp_size}")
            shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(shards, logits.contiguous())
            logits = torch.cat(shards, dim=-1)
        return logits[:, : self.config.vocab_size]


def param_seed(seed: int, name: str) -> int:
    """Seed of one full parameter: depends on the name only, never on tp_size or rank."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Fill every parameter deterministically, and recompute the rope cache.

    Each parallel weight is generated FULL (float32, CPU, its own seeded generator) and sliced
    for `model.rank`, so the result matches the same rows/columns of the tp=1 model. A full
    tensor exists for one parameter at a time: fine for small models; for a big preset with
    tp_size > 1 the largest (the embedding, 4 GB float32 for Llama-3-70B) bounds peak memory.
    """
    for mod_name, mod in model.named_modules():  # tied lm_head is yielded once, as embed_tokens
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, RotaryEmbedding):
            mod.cos_sin_cache.copy_(mod.compute_cache())
        elif hasattr(mod, "full_shapes"):
            for pname, shape in mod.full_shapes().items():
                g = torch.Generator().manual_seed(param_seed(seed, f"{mod_name}.{pname}"))
                full = torch.empty(shape).normal_(0.0, INIT_STD, generator=g)
                getattr(mod, pname).copy_(mod.shard(pname, full))
        if isinstance(mod, VocabParallelEmbedding):
            mod.shard_range.copy_(mod.range_tensor())
