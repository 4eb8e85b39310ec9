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
    """transformers models: input_ids [1, n], one sequence; other models: (input_ids [n],
    positions [n]), a batch of n tokens as vLLM calls its models: positions count up and wrap
    at the model's `max_position_embeddings` (a batch of more tokens than one sequence may hold
    is several sequences)."""
    from .hf import is_transformers_model

    limit = position_limit(model)
    if is_transformers_model(model):
        def one_sequence(n: int, device: torch.device) -> dict[str, torch.Tensor]:
            if limit is not None and n > limit:
                check_one_sequence(model, n, limit)
            return {"input_ids": torch.zeros(1, n, dtype=torch.long, device=device)}
        return one_sequence

    def flat(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(n, device=device)
        if limit is not None and n > limit:
            positions = positions % limit
        return torch.zeros(n, dtype=torch.long, device=device), positions
    return flat


def position_limit(model: nn.Module) -> int | None:
    """The model's `config.max_position_embeddings` (GPT-2's `n_positions`), if it has one."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def check_one_sequence(model: nn.Module, num_tokens: int, limit: int) -> None:
    """Refuse a call of a transformers model as one sequence longer than its learned position
    table (GPT-2's `wpe`, OPT's `embed_positions`: an embedding besides the token one with a row
    per position, OPT's 2 more); rotary models compute positions past the limit and pass."""
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if (isinstance(module, nn.Embedding) and module is not tokens
                and limit <= module.num_embeddings <= limit + 2):
            raise ConfigError(
                f"compile size {num_tokens} is longer than {type(model).__name__}'s {limit} "
                f"positions (max_position_embeddings; its learned position table `{name}` has "
                f"{module.num_embeddings} rows): a transformers model is called as one sequence "
                f"of n tokens (input_ids [1, n]). Allowed: compile sizes up to {limit}, or "
                f"example_inputs that call it as several sequences")


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
