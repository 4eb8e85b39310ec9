"""Tiny transformers models of the architectures users bring (random weights, no downloads)."""

from __future__ import annotations

import torch

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (model_type, config overrides)
ARCHS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mistral": ("mistral", {"sliding_window": 4}),
    "gemma2": ("gemma2", {"sliding_window": 4, "head_dim": 16}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 4, "n_head": 4, "vocab_size": 128,
                      "n_positions": 256}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "head_dim": 16}),
    "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                            "sliding_window": 4}),
}

# Checked by the tests that name them (not by every architecture test).
MORE = {
    "deepseek_v3": ("deepseek_v3", {"n_routed_experts": 4, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 32, "n_shared_experts": 1,
                                    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                                    "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8,
                                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "sliding_window": 4}),
}


def save_config(name: str, directory, architecture: str, **overrides) -> str:
    """`name`'s tiny config as a checkpoint's config.json (with its `architectures`) in
    `directory`; returns the directory."""
    import json
    from pathlib import Path

    d = config(name, **overrides).to_dict()
    d["architectures"] = [architecture]
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "config.json").write_text(json.dumps(d, default=str))
    return str(directory)


def save_vlm_config(model_type: str, directory, architecture: str) -> str:
    """An image-text-to-text checkpoint's config.json (Mistral3, Qwen2.5-VL, LLaVA: transformers'
    defaults) with a tiny text model and vision tower; returns the directory."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    d = AutoConfig.for_model(model_type).to_dict()
    d["text_config"].update({**_COMMON, "head_dim": 16, "vocab_size": 256})
    d["text_config"].pop("layer_types", None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    d["vision_config"].update({k: v for k, v in vision.items() if k in d["vision_config"]})
    for key in ("image_token_id", "image_token_index"):
        if isinstance(d.get(key), int) and d[key] >= 256:
            d[key] = 255
    d["architectures"] = [architecture]
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "config.json").write_text(json.dumps(d, default=str))
    return str(directory)


def config(name: str, **overrides):
    from transformers import AutoConfig

    model_type, extra = {**ARCHS, **MORE}[name]
    kwargs = {} if model_type == "gpt2" else dict(_COMMON)
    kwargs.update(extra)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build(name: str, device: str = "cpu", attn: str | None = None, **overrides):
    """The model in eval mode; weights from seed 0 (the same for every call)."""
    from transformers import AutoModelForCausalLM

    cfg = config(name, **overrides)
    if attn:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    if device != "meta":  # a few architectures leave buffers or norms uninitialized
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if not torch.isfinite(p).all():
                    p.normal_(0, 0.02)
    return model.eval()


def tokens(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, seq), generator=torch.Generator().manual_seed(seed))
