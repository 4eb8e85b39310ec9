"""Split a dynamo graph at the splitting ops into `SplitItem`s. Pure: graph in, pieces out."""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from ..torch_private import graphs, ops
from .canonical import structure_of


@dataclass
class SplitItem:
    submod_name: str
    graph_id: int
    is_splitting_graph: bool
    graph: fx.GraphModule


def op_name(target: object) -> str | None:
    """"ns::op" for an OpOverload or OpOverloadPacket target (dynamo records packets); for a
    torch function with an aten op of the same name (F.scaled_dot_product_attention, as dynamo
    records it), "aten::name"; else None."""
    if ops.is_op(target):
        return ops.op_name(target)
    name = getattr(target, "__name__", None)
    module = getattr(target, "__module__", None) or ""
    if name and module.startswith("torch") and hasattr(torch.ops.aten, name):
        return f"aten::{name}"
    return None


def graph_op_names(gm: fx.GraphModule) -> list[str]:
    """The op names `split_graph` can split at in `gm`, in order of first appearance."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and (name := op_name(node.target)):
            seen.setdefault(name)
    return list(seen)


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
    _rematerialize_sizes(gm, node_to_subgraph)
    _mark_piece_io(gm, node_to_subgraph)
    # Lazy graph modules: the pieces' Python code is generated on first call, not here (code
    # generation was most of the planning time; compiled pieces are never called as fx code).
    with graphs.lazy_graph_modules():
        split = _split_by_structure(gm, node_to_subgraph)
        if split is None:
            split_gm = split_module(gm, None, lambda node: node_to_subgraph[node],
                                    keep_original_order=True)
            names = [name for (name, _) in split_gm.named_children()]
        else:
            split_gm, names = split
    items = []
    for name in names:
        graph_id = int(name.replace("submod_", ""))
        items.append(SplitItem(name, graph_id, graph_id in split_ids, getattr(split_gm, name)))
    items.sort(key=lambda item: item.graph_id)
    return split_gm, items


_SIZE_OPS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
             operator.neg, operator.truediv, torch.sym_max, torch.sym_min)


def _is_size_expr(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in _SIZE_OPS
            and isinstance(node.meta.get("example_value"), torch.SymInt))


def _rematerialize_sizes(gm: fx.GraphModule, part_of: dict[fx.Node, int]) -> None:
    """Recompute size arithmetic (`2 * s0`) in each piece that uses it, right before its first
    use there. Dynamo computes such an expression once and reuses it in later layers, which
    would make each later layer's piece take it as an input the first layer's computes: the
    identical layers would no longer share one piece. Mutates gm's graph."""
    clones: dict[tuple[fx.Node, int], fx.Node] = {}

    def local(value: fx.Node, pid: int, before: fx.Node) -> fx.Node:
        if not _is_size_expr(value) or part_of.get(value) == pid:
            return value
        if (value, pid) not in clones:
            args = fx.node.map_arg(value.args, lambda a: local(a, pid, before))
            with gm.graph.inserting_before(before):
                clone = gm.graph.call_function(value.target, args, dict(value.kwargs))
            clone.meta = value.meta.copy()
            part_of[clone] = pid
            clones[(value, pid)] = clone
        return clones[(value, pid)]

    for node in list(gm.graph.nodes):
        pid = part_of.get(node)
        if pid is None or node.op != "call_function":
            continue
        args = fx.node.map_arg((node.args, node.kwargs), lambda a: local(a, pid, node))
        if args != (node.args, node.kwargs):
            node.args, node.kwargs = args
    if clones:
        for node in reversed(list(gm.graph.nodes)):
            if _is_size_expr(node) and not node.users:
                gm.graph.erase_node(node)
                part_of.pop(node, None)


def _mark_piece_io(gm: fx.GraphModule, part_of: dict[fx.Node, int]) -> None:
    """Flag (`graphs.PIECE_IO`) each value used outside the piece that makes it: the inputs and
    outputs of the pieces and of the graph."""
    def flag(value: fx.Node, user: int | None) -> None:
        if user is None or part_of.get(value) != user:
            value.meta[graphs.PIECE_IO] = True

    for node in gm.graph.nodes:
        if node.op == "output":
            fx.node.map_arg(node.args, lambda n: flag(n, None))
        elif node.op != "placeholder":
            fx.node.map_arg((node.args, node.kwargs), lambda n, p=part_of[node]: flag(n, p))


@dataclass
class _Part:
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: dict[fx.Node, None] = field(default_factory=dict)  # ordered sets
    outputs: dict[fx.Node, None] = field(default_factory=dict)


def _split_by_structure(gm: fx.GraphModule, part_of: dict[fx.Node, int]
                        ) -> tuple[fx.GraphModule, list[str]] | None:
    """`split_module(gm, ..., keep_original_order=True)`'s result, built faster: pieces of equal
    structure (identical layers) share one graph module, built once. Inputs and outputs of each
    piece come in split_module's order, so piece code and keys are the same. None for graphs
    this does not handle (attributes, submodules, grad or autocast regions): use split_module.
    """
    nodes = list(gm.graph.nodes)
    if any(n.op in ("get_attr", "call_module") or n.target in graphs.GLOBAL_STATE_FUNCTIONS
           for n in nodes):
        return None
    parts = _parts(nodes, part_of)
    return None if parts is None else _assemble(nodes, parts)


def _parts(nodes: list[fx.Node], part_of: dict[fx.Node, int]) -> dict[int, _Part] | None:
    """Each piece's nodes, inputs and outputs in split_module's order (graph order; the size
    symbols an input's shape uses come along as inputs too); None when there is no piece or a
    symbol has no binding node (left to split_module)."""
    import sympy

    symbol_node: dict[sympy.Symbol, fx.Node] = {}  # where each size symbol is bound, first wins
    parts: dict[int, _Part] = {}  # in graph order
    for node in nodes:
        value = node.meta.get("example_value")
        if isinstance(value, (torch.SymInt, torch.SymFloat)) and \
                isinstance(value.node.expr, sympy.Symbol):
            symbol_node.setdefault(value.node.expr, node)
        if node.op not in ("placeholder", "output"):
            parts.setdefault(part_of[node], _Part()).nodes.append(node)
    if not parts:
        return None

    def use(value: fx.Node, user: int | None) -> None:  # split_module's cross-partition use
        defined = part_of.get(value)
        if defined == user:
            return
        if defined is not None:
            parts[defined].outputs.setdefault(value)
        if user is None:
            return
        parts[user].inputs.setdefault(value)
        example = value.meta.get("example_value")
        if example is not None:  # the symbols in its sizes come along as inputs too
            for symbol in sorted(graphs.free_symbols(example), key=str):
                bound = symbol_node.get(symbol)
                if bound is None:
                    raise LookupError(symbol)
                parts[user].inputs.setdefault(bound)
                if bound.op != "placeholder" and part_of.get(bound) is not None:
                    parts[part_of[bound]].outputs.setdefault(bound)

    try:
        for node in nodes:
            if node.op == "output":
                fx.node.map_arg(node.args[0], lambda n: use(n, None))
            elif node.op != "placeholder":
                fx.node.map_arg((node.args, node.kwargs), lambda n, p=part_of[node]: use(n, p))
    except LookupError:  # a symbol without a binding node: leave it to split_module
        return None
    return parts


def _assemble(nodes: list[fx.Node], parts: dict[int, _Part]
              ) -> tuple[fx.GraphModule, list[str]]:
    """The split graph calling one submodule per piece; pieces of equal structure share one."""
    base = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "placeholder":
            default = node.args[0] if node.args else inspect.Signature.empty
            env[node] = base.placeholder(node.target, type_expr=node.type, default_value=default)
            env[node].meta = node.meta.copy()
    root = torch.nn.Module()
    built: dict[tuple, fx.GraphModule] = {}
    names = []
    for pid, part in parts.items():
        inputs, outputs = list(part.inputs), list(part.outputs)
        result = outputs[0] if len(outputs) == 1 else tuple(outputs)
        try:
            signature = structure_of(inputs, part.nodes, result)
        except TypeError:  # an input that is no tensor, SymInt or int: a piece of its own
            signature = ("unshared", pid)
        if signature not in built:
            built[signature] = _piece_module(inputs, part.nodes, outputs)
        name = f"submod_{pid}"
        root.add_module(name, built[signature])
        names.append(name)
        call = base.call_module(name, tuple(env[n] for n in inputs))
        if len(outputs) == 1:
            env[outputs[0]] = call
        else:
            for i, value in enumerate(outputs):
                env[value] = base.call_function(operator.getitem, (call, i))
    output = nodes[-1]
    base.output(fx.node.map_arg(output.args[0], lambda n: env[n]))
    return graphs.make_graph_module(root, base), names


def _piece_module(inputs: list[fx.Node], body: list[fx.Node], outputs: list[fx.Node]
                  ) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name, type_expr=node.type)
        env[node].meta = node.meta.copy()
    for node in body:
        new = graph.create_node(node.op, node.target, fx.node.map_arg(node.args, env.__getitem__),
                                fx.node.map_arg(node.kwargs, env.__getitem__), type_expr=node.type)
        new.meta = node.meta.copy()
        env[node] = new
    values = [env[n] for n in outputs]
    graph.output(values[0] if len(values) == 1 else tuple(values))
    return graphs.make_graph_module(torch.nn.Module(), graph)
