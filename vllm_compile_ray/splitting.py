"""Split a dynamo graph at the splitting ops into `SplitItem`s. Pure: graph in, pieces out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.fx.passes.split_module import split_module


@dataclass
class SplitItem:
    submod_name: str
    graph_id: int
    is_splitting_graph: bool
    graph: fx.GraphModule


def op_name(target: object) -> str | None:
    """"ns::op" for an OpOverload or OpOverloadPacket target (dynamo records packets), else None."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def split_graph(gm: fx.GraphModule, splitting_ops: tuple[str, ...] | list[str]
                ) -> tuple[fx.GraphModule, list[SplitItem]]:
    """Split `gm` so every call to a splitting op is a piece of its own, in graph order."""
    wanted = set(splitting_ops)
    subgraph_id = 0
    node_to_subgraph: dict[fx.Node, int] = {}
    split_ids: list[int] = []
    for node in gm.graph.nodes:
        if node.op in ("output", "placeholder"):
            continue
        if node.op == "call_function" and op_name(node.target) in wanted:
            subgraph_id += 1
            node_to_subgraph[node] = subgraph_id
            split_ids.append(subgraph_id)
            subgraph_id += 1
        else:
            node_to_subgraph[node] = subgraph_id
    # Lazy graph modules: the pieces' Python code is generated on first call, not here (code
    # generation was most of the planning time; compiled pieces are never called as fx code).
    with _use_lazy_graph_module(True):
        split_gm = split_module(gm, None, lambda node: node_to_subgraph[node],
                                keep_original_order=True)
    items = []
    names = [name for (name, _) in split_gm.named_modules() if "." not in name and name]
    for name in names:
        graph_id = int(name.replace("submod_", ""))
        items.append(SplitItem(name, graph_id, graph_id in split_ids, getattr(split_gm, name)))
    items.sort(key=lambda item: item.graph_id)
    return split_gm, items
