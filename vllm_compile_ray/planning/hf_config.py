"""A config.json that vcr's own tensor-parallel models do not implement (another architecture,
or a field they do not honour), built as transformers' implementation of it.

    vcr plan --model /ckpt/gemma-3-1b-it --device cpu --sizes 1,8   # Gemma3ForCausalLM

transformers' model is the reference implementation, so nothing is approximated: the model
splits at attention through `hf.prepare` like any transformers module. At tp_size > 1 each rank
keeps its shard by transformers' own tensor-parallel plan (`hf_tp`). The model is built with its
parameters on meta and each rank materializes only its part (`hf_shards`), from the checkpoint
(`--weights`: its slices) or from seeded values; a checkpoint whose tensor names need
transformers' conversions loads through `from_pretrained` instead (the whole model in host
memory, then the rank's shard). A quantized
checkpoint builds with its quantized layers (`hf_quant`: FP8, MXFP4, AWQ, GPTQ); other
quantization schemes, and plans vcr cannot apply, keep vcr's error with the reason this route is
closed.
"""

from __future__ import annotations

import copy

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from . import hf_quant, hf_shards, hf_tp

logger = logging.getLogger(__name__)


def build_instead(d: dict[str, Any], refused: UnsupportedModelError, *, tp_size: int,
                  rank: int = 0, device: str | torch.device, num_layers: int | None, seed: int,
                  weights: str | None) -> nn.Module:
    """transformers' model for config dict `d`, which vcr's models `refused`; that error, with
    why transformers' cannot stand in, where it cannot."""
    check(d, refused, tp_size)
    try:
        config = _config(d, num_layers)
    except ConfigError:
        raise
    except Exception as exc:  # transformers' config class refused a field
        raise ConfigError(f"transformers could not read this config.json as "
                          f"model_type={d.get('model_type')!r}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())}") from exc
    logger.warning("%s: building transformers' %s instead (tp_size=%d)", refused,
                   type(config).__name__.removesuffix("Config"), tp_size)
    device = torch.device(device)
    block = hf_quant.spec(d["quantization_config"]) if d.get("quantization_config") else None
    if weights is not None:
        _real(device)
    try:
        if device.type == "meta":
            model = _model(config, device, seed, None)
        else:  # each rank materializes only its part (`hf_shards`)
            with hf_shards.params_on_meta():
                model = _model(config, torch.device("cpu"), seed, None)
        # A checkpoint whose names need transformers' conversions loads through it: the whole
        # model (in host memory at tp_size > 1), then the rank's shard.
        whole = weights is not None and block is None and \
            not hf_shards.readable(model, weights)
        if whole:
            logger.warning("%s: the checkpoint's tensor names need transformers' conversions; "
                           "loading the whole model with from_pretrained", weights)
            model = _model(config, device if tp_size == 1 else torch.device("cpu"), seed,
                           weights)
        if block is not None:
            hf_quant.quantize(model, block)
    except (ConfigError, OSError, UnsupportedModelError):
        raise
    except Exception as exc:  # transformers' own code on this config
        raise ConfigError(_unbuilt(type(config).__name__.removesuffix("Config"), exc)) from exc
    if tp_size > 1:
        hf_tp.shard(model, tp_size, rank)
    if not whole and device.type != "meta":
        hf_shards.materialize(model, device, seed, weights)
    return model.to(device)


def _unbuilt(arch: str, exc: Exception) -> str:
    """What to say when transformers' code fails on the config: the error, where in its code,
    and that the config (not vcr) is what that code refused."""
    import traceback

    import transformers

    frames = traceback.extract_tb(exc.__traceback__)
    at = next((f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames)
               if "transformers" in f.filename), "?")
    return (f"transformers {transformers.__version__} could not build its {arch} model from "
            f"this config.json: {type(exc).__name__}: {exc} (at {at}); a field that "
            "architecture needs is missing or invalid in the config")


def check(d: dict[str, Any], refused: UnsupportedModelError, tp_size: int) -> None:
    """`refused`, with why, when transformers' model cannot stand in for config dict `d`."""
    why = _closed(d, tp_size)
    if why:
        raise UnsupportedModelError(f"{refused}; {why}") from None


def _closed(d: dict[str, Any], tp_size: int) -> str:
    """Why transformers' implementation cannot stand in for `d` ("" when it can)."""
    if d.get("quantization_config"):
        try:
            hf_quant.spec(d["quantization_config"])
        except UnsupportedModelError as exc:
            return str(exc)
    from transformers import CONFIG_MAPPING

    if d.get("model_type") not in CONFIG_MAPPING:
        return f"transformers knows no model_type={d.get('model_type')!r} either"
    if tp_size != 1:
        try:
            hf_tp.check(_config(d, None), tp_size)
        except UnsupportedModelError as exc:
            return str(exc)
        except Exception:  # a config transformers refuses: build_instead says why
            return ""
    return ""


def _config(d: dict[str, Any], num_layers: int | None) -> Any:
    config = _from_fields(d)
    if num_layers is None:
        return config
    text = config.get_text_config()
    if not 1 <= num_layers <= text.num_hidden_layers:
        raise ConfigError(f"num_layers={num_layers} is invalid: the model has "
                          f"{text.num_hidden_layers} layers")
    # The layer count goes into the fields the config is made from, so that what a config
    # derives from it (hybrid models' layer types, often read-only properties) follows.
    d = copy.deepcopy(d)
    fields = d if text is config else next(
        (d[k] for k, v in vars(config).items() if v is text and isinstance(d.get(k), dict)), None)
    if fields is None or "num_hidden_layers" not in fields:  # under another name (n_layer, ...)
        text.num_hidden_layers = num_layers
        return config
    fields["num_hidden_layers"] = num_layers
    if isinstance(fields.get("layer_types"), list):
        fields["layer_types"] = fields["layer_types"][:num_layers]
    return _from_fields(d)


def _from_fields(d: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    fields = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(d["model_type"], **fields)


def _auto_class(config: Any) -> Any:
    """transformers' auto class that builds `config`'s generating model: causal LM, else
    image-text-to-text (Mistral3, Qwen2.5-VL, Qwen3-VL, LLaVA: a rank serving text runs its
    language model on `input_ids`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return AutoModelForCausalLM  # its error names the config class


def _real(device: torch.device) -> None:
    if device.type == "meta":
        raise ConfigError("weights= needs a real device, not meta")


def _model(config: Any, device: torch.device, seed: int, weights: str | None) -> nn.Module:
    auto = _auto_class(config)
    dtype = getattr(config, "dtype", None) or torch.float32
    if weights is not None:
        model = auto.from_pretrained(weights, config=config, dtype=dtype)
        return model.to(device).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    return model.eval()
