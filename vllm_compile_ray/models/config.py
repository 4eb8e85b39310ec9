"""`LlamaConfig` (built from a config.json-style dict) and the per-rank tensor-parallel shapes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from vllm_compile_ray.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


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
