"""A model named on the command line or in a job: a preset, a config.json (or its directory), or
an entry point `package.module:function` that returns the module.

An entry point function returns an `nn.Module`, or `(module, example_inputs)` where
`example_inputs(num_tokens, device)` makes the call (see `inputs`). It may take any of the
keyword arguments `device`, `tp_size`, `rank`, `num_layers`; it gets those it names.

    # mypkg/serve.py
    def build(device="meta"):
        cfg = AutoConfig.from_pretrained("/models/qwen2")   # a transformers model works as is
        with torch.device(device):
            return AutoModelForCausalLM.from_config(cfg)

    vcr warm --model mypkg.serve:build --sizes 1,8,64 --cache s3://bucket/vcr
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from . import hf_config
from .inputs import ExampleInputs

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class ModelSpec:
    """A built model and how to call it (example_inputs None: `inputs.default_example_inputs`)."""

    module: nn.Module
    example_inputs: ExampleInputs | None = None


def is_entry_point(spec: str) -> bool:
    return bool(_ENTRY_POINT.match(spec))


def build(spec: str, *, tp_size: int = 1, rank: int = 0, device: str | torch.device = "meta",
          num_layers: int | None = None, seed: int = 0, weights: str | None = None) -> ModelSpec:
    """The model `spec` names, built for `device` ("meta": shapes only, for planning). weights:
    a checkpoint for a preset or config.json model (`models.load_weights`; a Hugging Face Hub
    id is fetched, `models.hub`); an entry point
    gets it as `weights=` if it takes that argument. A config.json vcr's models refuse is
    transformers' model, this rank's shard of it at tp_size > 1 (`hf_config`)."""
    if is_entry_point(spec):
        offered = dict(tp_size=tp_size, rank=rank, device=device, num_layers=num_layers)
        if weights is not None:
            offered["weights"] = weights
        return _from_entry_point(spec, **offered)
    from .. import models

    if weights is not None and models.hub.is_hub_id(weights):
        weights = models.hub.snapshot(weights)
    try:
        return ModelSpec(models.build(spec, tp_size, rank, device=device, num_layers=num_layers,
                                      seed=seed, weights=weights))
    except UnsupportedModelError as refused:
        if spec in models.PRESETS:
            raise
        return ModelSpec(hf_config.build_instead(
            models.read_config(spec), refused, tp_size=tp_size, rank=rank, device=device,
            num_layers=num_layers, seed=seed, weights=weights))


def build_for_plan(spec: str, *, tp_size: int, device_type: str,
                   num_layers: int | None = None) -> ModelSpec:
    """The model `spec` names, shaped for planning a `device_type` target: built on meta (no
    weights). For a CPU target its tensors then move to CPU uninitialized (`empty_like`: no
    values are written, so no memory is touched), because model code may branch on the device
    type and the plan must trace what the ranks trace: transformers' experts run another op on
    CPU. A CUDA target plans on meta, which such code treats as a GPU."""
    built = build(spec, tp_size=tp_size, device="meta", num_layers=num_layers)
    if device_type == "cpu":
        _empty_on(built.module, torch.device("cpu"))
    return built


def _empty_on(module: nn.Module, device: torch.device) -> None:
    """Every meta parameter and buffer of `module` replaced by an uninitialized tensor on
    `device`; a tensor shared by two modules (tied embeddings) stays shared."""
    moved: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in moved:
            new = torch.empty_like(t, device=device)
            moved[id(t)] = (nn.Parameter(new, requires_grad=t.requires_grad)
                            if isinstance(t, nn.Parameter) else new)
        return moved[id(t)]

    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None and t.device.type == "meta":
                    table[name] = empty(t)


def check(spec: str, tp_size: int = 1) -> None:
    """Fail early (before Ray starts) on a spec that cannot name a model."""
    if is_entry_point(spec):
        _resolve(spec)
        return
    from .. import models

    try:
        models.get_config(spec)
    except UnsupportedModelError as refused:
        if spec in models.PRESETS:
            raise
        hf_config.check(models.read_config(spec), refused, tp_size)


def _resolve(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # the working dir was removed under us: nothing to import from
        cwd = ""
    if cwd and cwd not in sys.path and "" not in sys.path:  # `vcr`, `python jobs/...`: the
        sys.path.append(cwd)  # user's package in the working dir must import too
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--model {spec!r}: cannot import module {module_name!r} ({exc}); an "
                          "entry point is 'package.module:function' importable here (and in the "
                          "job's working dir or runtime_env on a cluster)") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"--model {spec!r}: module {module_name!r} has no attribute "
                              f"{attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"--model {spec!r}: {attr!r} is not callable; it must be a function "
                          "returning an nn.Module or (module, example_inputs)")
    return target


def _from_entry_point(spec: str, **offered: Any) -> ModelSpec:
    fn = _resolve(spec)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    for name in ("num_layers", "weights"):
        if offered.get(name) is not None and name not in kwargs:
            raise ConfigError(f"--{name.replace('_', '-')}: entry point {spec!r} takes no "
                              f"{name} argument")
    result = fn(**kwargs)
    example_inputs = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example_inputs = result
        if example_inputs is not None and not callable(example_inputs):
            raise ConfigError(f"--model {spec!r}: the second value it returns must be a "
                              "function example_inputs(num_tokens, device)")
    if not isinstance(result, nn.Module):
        raise UnsupportedModelError(f"--model {spec!r} returned {type(result).__name__}; it must "
                                    "return an nn.Module or (module, example_inputs)")
    return ModelSpec(result.eval(), example_inputs)
