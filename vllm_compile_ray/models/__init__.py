"""The models: vLLM-shaped, tensor-parallel decoders built from a config.json.

A model spec is a preset name, a config.json-style dict, a path to a config.json or a directory
holding one (nothing is ever downloaded), or a ModelConfig. The registry picks the
implementation by config.json's `architectures` (`registry.ARCHITECTURES`) and refuses a config
it cannot honour (`UnsupportedModelError`).

    model = build("llama-3-8b", tp_size=2, rank=0, device="meta", num_layers=4)  # plan, no memory
    model = build("llama-tiny")  # float32 on CPU, deterministic weights from seed 0
    model = build("/ckpt/Qwen3-30B-A3B", 8, rank, device="cuda", weights="/ckpt/Qwen3-30B-A3B")
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from vllm_compile_ray.errors import ConfigError, UnknownModelError
from vllm_compile_ray.models import hub
from vllm_compile_ray.models.checkpoint import WeightsSource, load_weights
from vllm_compile_ray.models.config import LlamaConfig, ModelConfig, TPShapes
from vllm_compile_ray.models.init import init_buffers, init_weights
from vllm_compile_ray.models.llama import LlamaForCausalLM
from vllm_compile_ray.models.moe import MOE_OP
from vllm_compile_ray.models.ops import ALL_REDUCE_OP, ATTENTION_OP
from vllm_compile_ray.models.presets import PRESETS
from vllm_compile_ray.models.registry import ARCHITECTURES, config_from_dict, supported

__all__ = ["ALL_REDUCE_OP", "ARCHITECTURES", "ATTENTION_OP", "MOE_OP", "PRESETS", "LlamaConfig",
           "LlamaForCausalLM", "ModelConfig", "TPShapes", "build", "get_config", "load_weights",
           "read_config", "supported"]

ModelSpec = str | os.PathLike | dict[str, Any] | ModelConfig


def read_config(spec: str | os.PathLike) -> dict[str, Any]:
    """A preset name, a config.json path or a directory holding one, or a Hugging Face Hub id
    ("org/name": its config.json, `hub`) -> the config dict."""
    if isinstance(spec, str) and spec in PRESETS:
        return dict(PRESETS[spec])
    path = os.fspath(spec)
    if hub.is_hub_id(path):
        path = hub.config_path(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise UnknownModelError(f"model {os.fspath(spec)!r} is a directory without a "
                                    "config.json")
    elif not os.path.isfile(path):
        looks_like_path = os.sep in path or path.endswith(".json")
        what = "no such file or directory" if looks_like_path else "unknown model preset"
        raise UnknownModelError(f"{what} {path!r}; known presets: {sorted(PRESETS)}; or give "
                                "a path to a config.json or a directory holding one, or a "
                                "Hugging Face Hub id (org/name)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read model config {path!r}: {exc}") from exc
    if not isinstance(d, dict):
        raise ConfigError(f"model config {path!r} holds {type(d).__name__}, not a JSON object")
    return d


def get_config(spec: ModelSpec, num_layers: int | None = None) -> ModelConfig:
    """A model spec (see the module docstring) -> its ModelConfig; `num_layers` keeps the first
    layers only."""
    if isinstance(spec, ModelConfig):
        cfg = spec
    elif isinstance(spec, dict):
        cfg = config_from_dict(spec)
    elif isinstance(spec, (str, os.PathLike)):
        cfg = config_from_dict(read_config(spec))
    else:
        raise ConfigError(f"model must be a preset name, a config.json path or directory, a "
                          f"config dict or a ModelConfig, got {type(spec).__name__}")
    return cfg if num_layers is None else cfg.with_layers(num_layers)


def build(spec: ModelSpec, tp_size: int = 1, rank: int = 0, *,
          device: str | torch.device | None = None, dtype: torch.dtype | None = None,
          num_layers: int | None = None, seed: int = 0,
          weights: WeightsSource | None = None) -> LlamaForCausalLM:
    """One rank of a tensor-parallel model, in eval mode with requires_grad=False parameters.

    device="meta": shapes only, no weight memory (planning a 70B model). Otherwise (default CPU)
    weights come from `weights` (a checkpoint directory, safetensors file or state dict; see
    `load_weights`) or else from `seed` as the tp=1 model's weights sliced for `rank`.
    `num_layers` keeps the first layers (benchmarks take 4-layer slices of big models).
    """
    cfg = get_config(spec, num_layers)
    TPShapes.of(cfg, tp_size, rank)  # ConfigError on a bad tp_size/rank before any allocation
    device = torch.device("cpu" if device is None else device)
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.architecture][1](cfg, tp_size, rank, dtype)
    if device.type == "meta":
        if weights is not None:
            raise ConfigError("weights= needs a real device, not meta")
    else:
        model.to_empty(device=device)
        if weights is None:
            init_weights(model, seed)
        else:
            init_buffers(model)
            load_weights(model, weights)
    return model.eval()
