"""fx graph modules as the splitter builds them, and the size symbols a value uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx

# Nodes whose global effect (grad mode, autocast) split_module carries across pieces.
GLOBAL_STATE_FUNCTIONS = (torch.amp._enter_autocast, torch.amp._exit_autocast,
                          torch._C._set_grad_enabled)

# Node meta flag the splitter sets on every value a piece takes or returns: with placeholders
# and size values, all the planner reads of a graph's values (a saved traced graph keeps only
# theirs).
PIECE_IO = "vcr_piece_io"


def make_graph_module(root: torch.nn.Module | dict[str, Any], graph: fx.Graph) -> fx.GraphModule:
    """A graph module of `graph` over `root`, lazy (its code made at first call) inside
    `lazy_graph_modules()`."""
    from torch.fx._lazy_graph_module import _make_graph_module

    return _make_graph_module(root, graph)


@contextlib.contextmanager
def lazy_graph_modules() -> Iterator[None]:
    """Graph modules made inside generate their code at first call, not when made."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    with _use_lazy_graph_module(True):
        yield


def free_symbols(value: Any) -> Iterable[Any]:
    """The size symbols (sympy) a fake value or SymInt uses."""
    from torch.fx.experimental.symbolic_shapes import free_symbols as symbols_of

    return symbols_of(value)
