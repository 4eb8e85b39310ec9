"""`ModelConfig`: what a decoder's shapes and numerics depend on, parsed from a config.json dict
for one architecture; and the per-rank tensor-parallel shapes (`TPShapes`).

Parsing is strict the way a server must be: a field that changes the model and that the
architecture's implementation does not honour (a rope type, a sliding window, MoE fields on a dense
class, quantization) raises `UnsupportedModelError` naming it, never builds a different model.
Keys that do not change the forward pass (token ids, training-only knobs) are ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_compile_ray.errors import ConfigError, UnsupportedModelError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ROPE_TYPES = ("default", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Optional behaviours an architecture may honour (ArchInfo.features).
FEATURES = frozenset({
    "attention_bias",  # config attention_bias: biases on q, k, v and o (Llama, Qwen3, Gemma2)
    "qkv_bias",  # q, k, v biases always, none on o (Qwen2)
    "qk_norm",  # RMSNorm of each q and k head before rope (Qwen3)
    "sliding_window",  # sliding_window / layer_types / use_sliding_window
    "moe",  # router + top-k experts (Mixtral, Qwen3-MoE)
    "gemma2",  # softcaps, query_pre_attn_scalar, (1 + w) norms, sandwich norms, gelu
})
# config.json keys that change the forward pass and that no architecture here implements.
_NEVER = ("quantization_config", "compression_config", "shared_expert_intermediate_size",
          "attention_chunk_size", "no_rope_layers", "logits_scaling", "embedding_multiplier",
          "residual_multiplier", "attention_multiplier", "n_shared_experts", "kv_lora_rank")
_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")
_GEMMA2_KEYS = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1+ "llama3" rope frequency scaling (config.json `rope_scaling`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ArchInfo:
    """What one config.json `architectures` entry honours, and its transformers defaults for keys
    a config.json leaves out."""

    name: str
    model_types: tuple[str, ...]
    features: frozenset[str]
    defaults: dict[str, Any] = field(default_factory=dict)
    activation_key: str = "hidden_act"
    activations: tuple[str, ...] = ("silu",)
    # Which layers slide when config.json has no layer_types, as transformers decides for the
    # family: "all", "max_window_layers" (Qwen2/3: layers from that index on), "alternate"
    # (Gemma2: even layers); `sliding_window_pattern` p in a config: every p-th layer is full.
    window_rule: str = "all"

    def __post_init__(self) -> None:
        unknown = self.features - FEATURES
        if unknown:
            raise ConfigError(f"ArchInfo {self.name}: unknown features {sorted(unknown)}")
        if self.window_rule not in ("all", "max_window_layers", "alternate"):
            raise ConfigError(f"ArchInfo {self.name}: window_rule={self.window_rule!r}")


@dataclass(frozen=True)
class ModelConfig:
    """One architecture's resolved config (a dense Llama by default)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    attention_bias: bool = False  # biases on q, k, v
    o_proj_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    tie_word_embeddings: bool = False
    sliding_window: int = 0  # 0: none
    layer_types: tuple[str, ...] = ()  # per layer; () = all sliding if sliding_window else full
    num_experts: int = 0  # 0: dense
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # 0: intermediate_size (Mixtral)
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    query_pre_attn_scalar: float = 0.0  # 0: head_dim (attention scale = this ** -0.5)
    attn_logit_softcapping: float = 0.0
    final_logit_softcapping: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "max_position_embeddings", "decoder_sparse_step"):
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
            _check_positive_number(name, getattr(self, name))
        for name in ("attention_bias", "o_proj_bias", "qk_norm", "tie_word_embeddings",
                     "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype={self.torch_dtype!r}; allowed: {sorted(DTYPES)}")
        for name in ("sliding_window", "num_experts", "num_experts_per_tok",
                     "moe_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative integer")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                                  f"num_hidden_layers={self.num_hidden_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise UnsupportedModelError(f"layer_types {bad}; supported: {list(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ConfigError("layer_types has sliding_attention but sliding_window is unset")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                  f"[1, num_experts={self.num_experts}]")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping",
                     "final_logit_softcapping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative number")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def window(self, layer: int) -> int:
        """The sliding window of `layer` (0: full causal attention)."""
        if not self.sliding_window:
            return 0
        if self.layer_types and self.layer_types[layer] == "full_attention":
            return 0
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule (Mixtral: every layer)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def with_layers(self, n: int) -> ModelConfig:
        """The first `n` layers (benchmarks take slices of big models); a per-layer pattern is
        cycled when n is larger than the config's."""
        _check_positive_int("num_layers", n)
        types = tuple(self.layer_types[i % len(self.layer_types)] for i in range(n)) \
            if self.layer_types else ()
        return dataclasses.replace(self, num_hidden_layers=n, layer_types=types)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (for reports; `get_config` takes the ModelConfig itself)."""
        return dataclasses.asdict(self)


LlamaConfig = ModelConfig  # the name before there were several architectures


def parse_config(d: dict[str, Any], arch: ArchInfo) -> ModelConfig:
    """config.json dict -> ModelConfig for `arch`, refusing what `arch` does not honour."""
    if not isinstance(d, dict):
        raise ConfigError(f"model config must be a dict, got {type(d).__name__}")
    d = {**arch.defaults, **d}
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size") if k not in d]
    if missing:
        raise ConfigError(f"model config lacks required keys {missing}")
    feats = arch.features

    def refuse(what: str, supported: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{arch.name}: {what} is not supported; {supported}")

    act, attention_bias = _checked(d, arch, refuse)

    kw: dict[str, Any] = {k: d[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
        if d.get(k) is not None}
    kw["architecture"], kw["hidden_act"] = arch.name, act
    kw["model_type"] = d.get("model_type", arch.model_types[0])
    kw["num_key_value_heads"] = d.get("num_key_value_heads") or d["num_attention_heads"]
    if d.get("head_dim") is not None:
        kw["head_dim"] = d["head_dim"]
    dtype = d.get("torch_dtype") or d.get("dtype")  # newer transformers write "dtype"
    if dtype is not None:
        kw["torch_dtype"] = dtype
    kw["rope_theta"], kw["rope_scaling"] = _rope(d, refuse)
    kw["attention_bias"] = attention_bias or "qkv_bias" in feats
    kw["o_proj_bias"] = attention_bias
    kw["qk_norm"] = "qk_norm" in feats
    kw.update(_windows(d, arch, refuse))
    if "moe" in feats:
        kw.update(_moe(d, arch))
    if "gemma2" in feats:
        kw["query_pre_attn_scalar"] = d.get("query_pre_attn_scalar") or 0.0
        kw["attn_logit_softcapping"] = d.get("attn_logit_softcapping") or 0.0
        kw["final_logit_softcapping"] = d.get("final_logit_softcapping") or 0.0
    return ModelConfig(**kw)


def _checked(d: dict[str, Any], arch: ArchInfo, refuse) -> tuple[str, bool]:
    """Refuse the config fields `arch` does not honour; (activation, attention bias)."""
    feats = arch.features
    for key in _NEVER:
        if d.get(key) not in (None, 0, False, {}, []):
            raise refuse(f"config field {key}={_short(d[key])}", "vcr's own models implement "
                         "no quantization (unquantized checkpoints only)")
    if d.get("mlp_bias"):
        raise refuse("mlp_bias=true", "MLP projections have no bias")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse(f"partial_rotary_factor={d['partial_rotary_factor']}",
                     "rope on the whole head")
    act = d.get(arch.activation_key) or arch.activations[0]
    if act not in arch.activations:
        raise refuse(f"{arch.activation_key}={act!r}", f"supported: {list(arch.activations)}")
    if "gemma2" not in feats:
        for key in _GEMMA2_KEYS:
            if d.get(key) not in (None, 0):
                raise refuse(f"config field {key}={d[key]!r}", "only Gemma2ForCausalLM has it")
    if "moe" not in feats:
        present = [k for k in _MOE_KEYS if d.get(k) not in (None, 0, [], False)]
        if present:
            raise refuse(f"MoE config fields {present}", "this is a dense architecture; MoE "
                         "architectures: MixtralForCausalLM, Qwen3MoeForCausalLM")
    # Qwen2 has q/k/v biases whatever attention_bias says (transformers ignores the key there).
    attention_bias = bool(d.get("attention_bias", False)) and "qkv_bias" not in feats
    if attention_bias and "attention_bias" not in feats:
        raise refuse("attention_bias=true", "its attention projections have no bias")
    return act, attention_bias


def _rope(d: dict[str, Any], refuse) -> tuple[float, RopeScaling | None]:
    """transformers 5 writes `rope_parameters` {rope_theta, rope_type, ...}; public configs
    `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise refuse(f"rope_scaling rope_type={rope_type!r}", f"supported: {list(ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse(f"partial_rotary_factor={scaling['partial_rotary_factor']}",
                     "rope on the whole head")
    if rope_type == "default":
        return theta, None
    try:
        return theta, RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                  float(scaling["high_freq_factor"]),
                                  int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"rope_scaling lacks key {e.args[0]!r}") from None


def _windows(d: dict[str, Any], arch: ArchInfo, refuse) -> dict[str, Any]:
    """sliding_window and per-layer layer_types, by transformers' rules for each family."""
    n = d["num_hidden_layers"]
    window = d.get("sliding_window") or 0
    if "use_sliding_window" in d and not d["use_sliding_window"]:  # Qwen: off unless asked
        window = 0
    types: tuple[str, ...] = ()
    if d.get("layer_types"):
        types = tuple(d["layer_types"])
        if not window and "sliding_attention" in types:
            raise ConfigError("layer_types has sliding_attention but sliding_window is unset")
    elif window and d.get("sliding_window_pattern"):
        p = d["sliding_window_pattern"]
        types = tuple("full_attention" if (i + 1) % p == 0 else "sliding_attention"
                      for i in range(n))
    elif window and arch.window_rule == "max_window_layers":
        first = d.get("max_window_layers", 0)
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))
    elif window and arch.window_rule == "alternate":
        types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))
    if types and "sliding_attention" not in types:
        window = 0
    if window and "sliding_window" not in arch.features:
        raise refuse(f"sliding_window={window}", "its attention is full causal; sliding-window "
                     "architectures: MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, "
                     "Qwen3ForCausalLM, Qwen3MoeForCausalLM, Gemma2ForCausalLM")
    return {"sliding_window": window, "layer_types": types if window else ()}


def _moe(d: dict[str, Any], arch: ArchInfo) -> dict[str, Any]:
    experts = d.get("num_local_experts", d.get("num_experts")) or 0
    return {
        "num_experts": experts,
        "num_experts_per_tok": d.get("num_experts_per_tok") or 0,
        "moe_intermediate_size": d.get("moe_intermediate_size") or 0,
        "norm_topk_prob": bool(d.get("norm_topk_prob", True)),
        "decoder_sparse_step": d.get("decoder_sparse_step") or 1,
        "mlp_only_layers": tuple(d.get("mlp_only_layers") or ()),
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}={value!r} must be a positive number")


@dataclass(frozen=True)
class TPShapes:
    """Per-rank shard sizes for one config at one tensor-parallel size."""

    num_heads: int
    num_kv_heads: int
    kv_head_start: int  # first kv head this rank holds (kv heads replicate when fewer than ranks)
    intermediate_size: int  # dense MLP
    expert_intermediate_size: int  # each expert's (MoE layers)
    vocab_shard: int

    @classmethod
    def of(cls, cfg: ModelConfig, tp_size: int, rank: int = 0) -> TPShapes:
        _check_positive_int("tp_size", tp_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp_size:
            raise ConfigError(f"rank={rank!r} must be an integer in [0, tp_size={tp_size})")
        h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        if h % tp_size:
            raise ConfigError(f"num_attention_heads={h} is not divisible by tp_size={tp_size}")
        if (kv % tp_size) if kv >= tp_size else (tp_size % kv):
            raise ConfigError(f"num_key_value_heads={kv} and tp_size={tp_size}: one must divide "
                              "the other")
        moe = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
        sizes = {"intermediate_size": (cfg.intermediate_size, not all(moe)),
                 "moe_intermediate_size": (cfg.expert_intermediate_size, any(moe))}
        for name, (size, used) in sizes.items():
            if used and size % tp_size:
                raise ConfigError(f"{name}={size} is not divisible by tp_size={tp_size}")
        kv_local = max(1, kv // tp_size)
        replicas = max(1, tp_size // kv)
        return cls(h // tp_size, kv_local, (rank // replicas) * kv_local,
                   cfg.intermediate_size // tp_size, cfg.expert_intermediate_size // tp_size,
                   -(-cfg.vocab_size // tp_size))
