"""A vLLM-shaped Llama decoder (also Qwen2: qkv bias) on flat tokens, tensor-parallel by shape.

`forward(input_ids[T], positions[T]) -> hidden[T, H]`; the lm_head runs separately in
`compute_logits`, as in vLLM, so the compiled graph is the decoder only. Attention and the
tensor-parallel all-reduce are the custom ops in `ops.py`, which the splitter cuts at.

Each rank holds its shard of every parallel weight; `init_weights` generates each FULL weight from
a seeded generator keyed by its name and slices it, so ranks 0..tp-1 together equal the tp=1 model.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_compile_ray.errors import ConfigError
from vllm_compile_ray.models import ops

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
INIT_STD = 0.02


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1+ "llama3" rope frequency scaling (config.json `rope_scaling`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    """The config.json fields the decoder's shapes and numerics depend on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    attention_bias: bool = False  # bias on the merged qkv projection (Qwen2)
    torch_dtype: str = "bfloat16"
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                    f"{self.num_attention_heads} when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (rotary embedding)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r} must be a positive number")
        for name in ("attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype={self.torch_dtype!r}; allowed: {sorted(DTYPES)}")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """From a config.json-style dict; keys this decoder does not use are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a dict, got {type(d).__name__}")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"model config lacks required keys {missing}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={d['hidden_act']!r}; allowed: ['silu']")
        model_type = d.get("model_type", "llama")
        kw: dict[str, Any] = {f.name: d[f.name] for f in dataclasses.fields(cls)
                              if f.name in d and f.name != "rope_scaling"}
        kw["model_type"] = model_type
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        if "torch_dtype" not in kw and "dtype" in d:  # newer transformers write "dtype"
            kw["torch_dtype"] = d["dtype"]
        if "attention_bias" not in d:  # Qwen2's config.json has no key: qkv bias is implied
            kw["attention_bias"] = model_type == "qwen2"
        kw["rope_scaling"] = _rope_scaling_from_dict(d.get("rope_scaling"))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (rope_scaling as a dict), round-trips through from_dict."""
        out = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            out["rope_scaling"]["rope_type"] = "llama3"
        return out


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _rope_scaling_from_dict(d: dict[str, Any] | None) -> RopeScaling | None:
    if d is None:
        return None
    rope_type = d.get("rope_type", d.get("type"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling.rope_type={rope_type!r}; allowed: ['default', 'llama3']")
    try:
        return RopeScaling(float(d["factor"]), float(d["low_freq_factor"]),
                           float(d["high_freq_factor"]), int(d["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"rope_scaling lacks key {e.args[0]!r}") from None


@dataclass(frozen=True)
class TPShapes:
    """Per-rank shard sizes for one config at one tensor-parallel size."""

    num_heads: int
    num_kv_heads: int
    kv_head_start: int  # first kv head this rank holds (kv heads replicate when fewer than ranks)
    intermediate_size: int
    vocab_shard: int

    @classmethod
    def of(cls, cfg: LlamaConfig, tp_size: int, rank: int = 0) -> TPShapes:
        _check_positive_int("tp_size", tp_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp_size:
            raise ConfigError(f"rank={rank!r} must be an integer in [0, tp_size={tp_size})")
        h, kv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        if h % tp_size:
            raise ConfigError(f"num_attention_heads={h} is not divisible by tp_size={tp_size}")
        if (kv % tp_size) if kv >= tp_size else (tp_size % kv):
            raise ConfigError(f"num_key_value_heads={kv} and tp_size={tp_size}: one must divide "
                              "the other")
        if inter % tp_size:
            raise ConfigError(f"intermediate_size={inter} is not divisible by tp_size={tp_size}")
        kv_local = max(1, kv // tp_size)
        replicas = max(1, tp_size // kv)
        return cls(h // tp_size, kv_local, (rank // replicas) * kv_local, inter // tp_size,
                   -(-cfg.vocab_size // tp_size))


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
