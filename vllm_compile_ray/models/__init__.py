"""The model zoo: presets and `build`, which makes one tensor-parallel rank of a model.

    model = build("llama-3-8b", tp_size=2, rank=0, device="meta", num_layers=4)  # plan, no memory
    model = build("llama-tiny")  # float32 on CPU, deterministic weights from seed 0
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm_compile_ray.errors import ConfigError, UnknownModelError
from vllm_compile_ray.models.llama import LlamaConfig, LlamaForCausalLM, TPShapes, init_weights
from vllm_compile_ray.models.ops import ALL_REDUCE_OP, ATTENTION_OP
from vllm_compile_ray.models.presets import PRESETS

__all__ = ["ALL_REDUCE_OP", "ATTENTION_OP", "PRESETS", "LlamaConfig", "LlamaForCausalLM",
           "TPShapes", "build", "get_config"]


def get_config(name_or_config: str | dict[str, Any] | LlamaConfig,
               num_layers: int | None = None) -> LlamaConfig:
    """A preset name, a config.json-style dict or a LlamaConfig -> LlamaConfig."""
    if isinstance(name_or_config, LlamaConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = LlamaConfig.from_dict(name_or_config)
    elif isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise UnknownModelError(
                f"unknown model preset {name_or_config!r}; known presets: {sorted(PRESETS)}")
        cfg = LlamaConfig.from_dict(PRESETS[name_or_config])
    else:
        raise ConfigError(f"model must be a preset name, a config dict or a LlamaConfig, got "
                          f"{type(name_or_config).__name__}")
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)  # validated again
    return cfg


def build(name_or_config: str | dict[str, Any] | LlamaConfig, tp_size: int = 1, rank: int = 0,
          *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
          num_layers: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    """One rank of a tensor-parallel model, in eval mode with requires_grad=False parameters.

    device="meta": shapes only, no weight memory (planning a 70B model). Otherwise (default CPU)
    weights come from `seed` as the tp=1 model's weights sliced for `rank` (see `init_weights`).
    `num_layers` overrides the layer count (benchmarks take 4-layer slices of big models).
    """
    cfg = get_config(name_or_config, num_layers)
    TPShapes.of(cfg, tp_size, rank)  # ConfigError on a bad tp_size/rank before any allocation
    device = torch.device("cpu" if device is None else device)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, tp_size, rank, dtype)
    if device.type != "meta":
        model.to_empty(device=device)
        init_weights(model, seed)
    return model.eval()
