"""Hugging Face transformers models: attention through `vcr::attention`, so they split like ours.

    model = AutoModelForCausalLM.from_config(cfg)
    vcr.hf.prepare(model)   # attention -> vcr::attention; no KV cache; clear error if unsupported
    compiled = vcr.compile(model, config)
    compiled(input_ids=ids)  # ids: [batch, seq]; seq is the dynamic dim

`prepare` registers "vcr" with transformers' `AttentionInterface` (the attention function) and
`AttentionMaskInterface` (mask creation: the op builds its own causal / sliding-window mask) and
switches the model to it. The op covers causal grouped-query attention with a scale, sliding
windows (per layer too; a layer that keeps its window only in the mask gets the config's:
`_config_window`), chunked attention, logit softcapping and attention sinks. What it cannot
express (padding or custom masks, ALiBi, bidirectional attention, dropout in training,
encoder-decoder models) raises `UnsupportedModelError` at trace time, naming the cause.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import ops

ATTENTION_NAME = "vcr"

# What the op expresses, for error messages.
SUPPORTED = ("causal attention", "grouped-query/multi-query heads", "a scale",
             "sliding windows (all layers or per layer)", "chunked attention (Llama 4)",
             "logit softcapping", "attention sinks")


def is_transformers_model(model: nn.Module) -> bool:
    """True for a transformers PreTrainedModel. Never imports transformers (optional, and slow
    to import): a model built by it means it is already imported."""
    module = sys.modules.get("transformers")
    return module is not None and isinstance(model, module.PreTrainedModel)


def register() -> None:
    """Register "vcr" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, mask)


def prepare(model: nn.Module) -> nn.Module:
    """Route `model`'s attention through `vcr::attention` and turn off its KV cache. In place;
    returns the model. UnsupportedModelError for models the op cannot serve."""
    if not is_transformers_model(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; hf.prepare is for "
            "those (a model of your own calls vcr.models.ops.attention itself)")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; vcr attention is causal "
            f"self-attention only (supported: {', '.join(SUPPORTED)})")
    if getattr(config.get_text_config(), "alibi", False) is True:  # Falcon-RW and the like
        raise UnsupportedModelError(
            f"{type(model).__name__} uses ALiBi position biases (alibi=True), which transformers "
            "adds to the attention mask; vcr attention builds no mask and cannot apply them "
            f"(supported: {', '.join(SUPPORTED)})")
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    for sub in (config, *(getattr(config, n) for n in config.sub_configs if hasattr(config, n))):
        if getattr(sub, "use_cache", None):
            sub.use_cache = False  # pieces are stateless: HF's KV cache would enter the graph
    return model


def maybe_prepare(model: nn.Module) -> nn.Module:
    """`prepare` a transformers model not yet switched to vcr attention; others as they are."""
    if is_transformers_model(model) and \
            getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        prepare(model)
    return model


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of `model`'s fused experts: transformers' `use_experts_implementation`
    modules holding 3-D weights and layout flags."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "is_concatenated") and hasattr(m, "is_transposed") and
            isinstance(getattr(m, "down_proj", None), nn.Parameter)]


def use_experts(model: nn.Module, name: str, forward: Any) -> None:
    """Route every fused experts module of `model` through `forward(module, hidden_states,
    top_k_index, top_k_weights)`: registered with transformers' experts interface as `name`."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, forward)
    model.set_experts_implementation(name)


def mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """transformers' mask creation for "vcr": no mask tensor, the op masks by position. A
    padding mask is refused (the op cannot express it), never dropped."""
    if attention_mask is not None:
        raise UnsupportedModelError(
            "vcr attention got an attention_mask: it computes the causal (and sliding-window) "
            "mask from positions and cannot express padding or custom masks; call the model "
            "without attention_mask, on unpadded sequences")
    return None


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None,
                      s_aux: torch.Tensor | None = None, **kwargs: Any
                      ) -> tuple[torch.Tensor, None]:
    """transformers' attention function signature. query: [B, Hq, T, D], key: [B, Hkv, S, D],
    value: [B, Hkv, S, Dv] -> ([B, T, Hq, Dv], None) (Dv != D: DeepSeek's MLA)."""
    name = type(module).__name__
    if attention_mask is not None:
        mask(attention_mask=attention_mask)
    if dropout and module.training:
        raise UnsupportedModelError(f"{name}: attention dropout {dropout} in training mode; "
                                    "vcr attention is for inference (call model.eval())")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise UnsupportedModelError(f"{name} is bidirectional (is_causal=False); supported: "
                                    f"{', '.join(SUPPORTED)}")
    sliding_window = sliding_window or _config_window(module)
    chunk = _chunk(module)
    b, hq, t, d = query.shape
    if scaling is None:
        scaling = _default_scaling(module, d)
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    # As transformers lays them out: merging heads here (transpose + reshape) guards T != 1
    # where their strides come from a fused qkv split or rotary (phi3, gpt_oss): see the op.
    out = ops.attention(query, key, value, hq, key.shape[1], d, float(scaling),
                        int(sliding_window or 0), float(softcap or 0.0), sinks, heads_first=True,
                        **({"chunk": chunk} if chunk else {}))
    return out.reshape(b, t, hq, value.shape[-1]), None  # out: [B, T, Hq*Dv], contiguous


def _default_scaling(module: nn.Module, head_dim: int) -> float:
    """The scale of models that pass none (GPT-2: scale_attn_weights, and optionally
    1/(layer_idx+1) with scale_attn_by_inverse_layer_idx)."""
    scale = head_dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def _layer_type(module: nn.Module) -> str | None:
    """The attention layer's entry in its config's `layer_types` (None without one)."""
    types = getattr(getattr(module, "config", None), "layer_types", None)
    layer = getattr(module, "layer_idx", None)
    return types[layer] if types and layer is not None and layer < len(types) else None


def _chunk(module: nn.Module) -> int:
    """Chunk size of a chunked-attention layer (Llama 4's local layers: a query attends within
    its chunk of `attention_chunk_size` positions), else 0. A chunked layer without a chunk size
    is refused: the op would compute plain causal attention."""
    if _layer_type(module) != "chunked_attention":
        return 0
    size = getattr(module.config, "attention_chunk_size", None)
    if not isinstance(size, int) or size < 1:
        raise UnsupportedModelError(
            f"{type(module).__name__} (layer {module.layer_idx}) is a chunked-attention layer "
            f"with attention_chunk_size={size!r}; vcr attention needs a positive chunk size")
    return size


def _config_window(module: nn.Module) -> int:
    """The window of a layer that its model masks with a sliding window but that passes none to
    its attention function (transformers' PhiMoE, Qwen2-MoE: the window is only in the mask,
    which vcr attention does not build): the config's `sliding_window` for a layer that
    `layer_types` marks "sliding_attention", or, without `layer_types`, for every layer of a
    model whose code builds sliding-window masks (unless `use_sliding_window` is False). 0 for
    a layer that is not windowed."""
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return 0
    if getattr(config, "layer_types", None):
        return window if _layer_type(module) == "sliding_attention" else 0
    if getattr(config, "use_sliding_window", True) is False:
        return 0
    code = sys.modules.get(type(module).__module__)
    return window if hasattr(code, "create_sliding_window_causal_mask") else 0
