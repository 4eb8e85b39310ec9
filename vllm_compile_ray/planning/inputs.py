"""How a model is called: which argument dims are dynamic, and example inputs for planning.

num_tokens is the one dynamic dim that `compile_sizes` name. By default it is the last dim of
the token arguments (`input_ids`, `positions`, `position_ids`: flat `[T]` as vLLM calls its
models, or `[batch, seq]` as transformers does) and dim -2 of `inputs_embeds`. A forward whose
first tensor argument has none of those names (`forward(self, x)`) also gets dim 0 of each
tensor argument whose dim 0 equals the first one's: other tensors (a KV cache, masks of other
shapes) stay static.
`CompilationConfig.dynamic_dims` overrides the defaults by argument name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..torch_private import dynamo

DEFAULT_DYNAMIC_DIMS = {"input_ids": -1, "positions": -1, "position_ids": -1, "inputs_embeds": -2}

Call = tuple[tuple[Any, ...], dict[str, Any]]
# example_inputs(num_tokens, device) -> positional args, keyword args, or (args, kwargs)
ExampleInputs = Callable[[int, torch.device], Any]


def as_call(value: Any) -> Call:
    """Positional args (tuple/list), keyword args (dict) or a pair (args, kwargs) -> a Call."""
    if isinstance(value, dict):
        return (), dict(value)
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list))
            and isinstance(value[1], dict)):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    if isinstance(value, torch.Tensor):
        return (value,), {}
    raise ConfigError(f"example inputs must be a tuple of positional args, a dict of keyword "
                      f"args or a pair (args, kwargs); got {type(value).__name__}")


def default_example_inputs(model: nn.Module) -> ExampleInputs:
    """transformers models: input_ids [1, n]; other models: (input_ids [n], positions [n])."""
    from .hf import is_transformers_model

    if is_transformers_model(model):
        return lambda n, device: {"input_ids": torch.zeros(1, n, dtype=torch.long, device=device)}
    return lambda n, device: (torch.zeros(n, dtype=torch.long, device=device),
                              torch.arange(n, device=device))


def example_call(model: nn.Module, example_inputs: ExampleInputs | None, num_tokens: int,
                 device: torch.device | str) -> Call:
    make = example_inputs or default_example_inputs(model)
    return as_call(make(num_tokens, torch.device(device)))


def mark_dynamic(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
                 dynamic_dims: Mapping[str, int] | None = None) -> int | None:
    """Mark the token dim of each argument that carries it (see the module docstring); returns
    the call's token count (None: no argument carries it)."""
    wanted = dict(dynamic_dims) if dynamic_dims else DEFAULT_DYNAMIC_DIMS
    bound = _bind(model, args, kwargs)
    marked: set[int] = set()
    tokens = None
    for name, dim in wanted.items():
        value = bound.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if not -value.dim() <= dim < value.dim():
                raise ConfigError(f"dynamic_dims[{name!r}]={dim} is out of range for a "
                                  f"{value.dim()}-d argument of shape {tuple(value.shape)}")
            dynamo.mark_dynamic(value, dim % value.dim())
            marked.add(id(value))
            tokens = value.shape[dim] if tokens is None else tokens
    if dynamic_dims:
        unknown = sorted(set(dynamic_dims) - set(bound))
        if unknown:
            raise ConfigError(f"dynamic_dims names {unknown}, which the call does not pass; "
                              f"its arguments: {sorted(bound)}")
        return tokens
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors or id(tensors[0]) in marked:
        return tokens
    # The first argument has no token name (forward(self, x)): dim 0 of each tensor as long as it.
    for tensor in tensors:
        if id(tensor) not in marked and tensor.shape[0] == tensors[0].shape[0]:
            dynamo.mark_dynamic(tensor, 0)
    return tensors[0].shape[0]


def _bind(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Argument name -> value for a call of `model` (positional args by the forward's names)."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):  # *args forwards, builtins: keyword args only
        return dict(kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out
