"""Architectures by config.json `architectures` (vLLM's `ModelRegistry`): which class builds
each, and what of its config it honours (`config.ArchInfo`)."""

from __future__ import annotations

from typing import Any

from vllm_compile_ray.errors import ConfigError, UnsupportedModelError
from vllm_compile_ray.models import gemma2, llama, mixtral, qwen
from vllm_compile_ray.models.config import ArchInfo, ModelConfig, parse_config
from vllm_compile_ray.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, tuple[ArchInfo, type[LlamaForCausalLM]]] = {
    **llama.ARCHITECTURES, **qwen.ARCHITECTURES, **mixtral.ARCHITECTURES,
    **gemma2.ARCHITECTURES,
}
# A dict without `architectures` (the presets, hand-written configs) is resolved by model_type.
_BY_MODEL_TYPE = {t: name for name, (info, _) in ARCHITECTURES.items() for t in info.model_types}


def supported() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_info(d: dict[str, Any]) -> ArchInfo:
    """The architecture a config.json dict names (its first supported `architectures` entry)."""
    if not isinstance(d, dict):
        raise ConfigError(f"model config must be a dict, got {type(d).__name__}")
    names = d.get("architectures")
    if names:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"architectures={names!r} must be a list of class names")
        for name in names:
            if name in ARCHITECTURES:
                info = ARCHITECTURES[name][0]
                if d.get("model_type", info.model_types[0]) not in info.model_types:
                    raise ConfigError(f"architectures={names} but model_type="
                                      f"{d['model_type']!r}; {name} has model_type "
                                      f"{info.model_types[0]!r}")
                return info
        raise UnsupportedModelError(f"architectures={names} is not supported; supported "
                                    f"architectures: {supported()}")
    model_type = d.get("model_type", "llama")
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedModelError(f"model_type={model_type!r} (config without architectures) "
                                    f"is not supported; supported model types: "
                                    f"{sorted(_BY_MODEL_TYPE)}")
    return ARCHITECTURES[_BY_MODEL_TYPE[model_type]][0]


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return parse_config(d, arch_info(d))


def model_class(cfg: ModelConfig) -> type[LlamaForCausalLM]:
    if cfg.architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {cfg.architecture!r} is not supported; "
                                    f"supported architectures: {supported()}")
    return ARCHITECTURES[cfg.architecture][1]
