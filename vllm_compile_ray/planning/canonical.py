"""Canonical pieces: each piece rebuilt with canonical names so identical layers share one key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..specs import InputSpec
from ..torch_private import ops

__all__ = ["CanonicalPiece", "InputSpec", "canonicalize", "structure", "structure_of"]

@dataclass
class CanonicalPiece:
    """A piece with canonical names, its input spec, and the code its key is computed from.

    `graph` pickles as its node list (`_ShippedGraphModule`), so `code` is the code every receiver
    of a shipped piece regenerates. It always returns a tuple; `single_output` says whether the
    original piece returned one bare value.
    """

    graph: fx.GraphModule
    code: str
    input_specs: tuple[InputSpec, ...]
    single_output: bool
    constants: tuple[torch.Tensor, ...] = ()  # trailing inputs the runner appends (see canonicalize)

    @property
    def symbols(self) -> tuple[str, ...]:
        seen: list[str] = []
        for spec in self.input_specs:
            for entry in (*spec.shape, *spec.stride, spec.expr):
                for name in _symbols_in(entry):
                    if name not in seen:
                        seen.append(name)
        return tuple(seen)

    def shape_locator(self) -> tuple[int, int] | None:
        """(input index, dim) where the runtime value of s0 can be read; dim -1 marks a SymInt."""
        for index, spec in enumerate(self.input_specs):
            if spec.kind == "symint" and spec.expr == "s0":
                return index, -1
        for index, spec in enumerate(self.input_specs):
            if spec.kind == "tensor" and "s0" in spec.shape:
                return index, spec.shape.index("s0")
        return None


def _symbols_in(entry: object) -> list[str]:
    if not isinstance(entry, str) or not entry:
        return []
    return re.findall(r"\bs\d+\b", entry)


def _example_value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


class _SymbolNamer:
    """Maps the tracer's symbols (s11, s23 ...) to s0, s1 ... in order of first appearance."""

    def __init__(self) -> None:
        self.mapping: dict[Any, Any] = {}

    def canon(self, value: Any) -> int | str:
        if isinstance(value, int):
            return value
        expr = value.node.expr if isinstance(value, torch.SymInt) else value
        if getattr(expr, "is_number", False):
            return int(expr)
        import sympy
        for sym in sorted(expr.free_symbols, key=str):
            if sym not in self.mapping:
                self.mapping[sym] = sympy.Symbol(f"s{len(self.mapping)}", integer=True, positive=True)
        return str(expr.xreplace(self.mapping))


def input_spec(value: Any, namer: _SymbolNamer, device_type: str | None) -> InputSpec:
    if isinstance(value, torch.Tensor):
        return InputSpec(
            "tensor", tuple(namer.canon(s) for s in value.shape),
            tuple(namer.canon(s) for s in value.stride()),
            str(value.dtype).removeprefix("torch."), device_type or value.device.type)
    if isinstance(value, torch.SymInt):
        return InputSpec("symint", expr=str(namer.canon(value)))
    if isinstance(value, int) and not isinstance(value, bool):
        return InputSpec("int", value=value)
    raise TypeError(f"unsupported piece input {type(value).__name__}: {value!r}")


def structure(piece: fx.GraphModule, device_type: str | None = None) -> tuple:
    """Everything `canonicalize` builds its result from: ops, targets, argument structure with
    nodes by position, and input specs. Equal structures canonicalize equally, so a plan
    canonicalizes each distinct layer once."""
    nodes = list(piece.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in nodes if n.op == "output")
    return structure_of(inputs, body, output.args[0], device_type)


def structure_of(inputs: list[fx.Node], body: list[fx.Node], result: Any,
                 device_type: str | None = None) -> tuple:
    """`structure` of the piece whose placeholders carry the metadata of `inputs`, whose nodes
    are `body` in order and which returns `result`: the splitter computes it on the whole graph
    before building a piece, so identical layers need only one piece built. For a piece graph
    whose placeholders come first and its output last, both give the same tuple."""
    position: dict[fx.Node, str] = {}
    namer = _SymbolNamer()
    parts: list[Any] = []
    for node in inputs:
        position[node] = f"%{len(position)}"
        parts.append(input_spec(_example_value(node), namer, device_type))
    for node in body:
        position[node] = f"%{len(position)}"
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: position[n])
        target = id(node.target) if callable(node.target) else node.target
        parts.append((node.op, target, repr(args)))
    args = fx.node.map_arg(((result,), {}), lambda n: position[n])
    parts.append(("output", "output", repr(args)))
    return tuple(parts)


def canonicalize(piece: fx.GraphModule, device_type: str | None = None) -> CanonicalPiece:
    """Rebuild `piece` in a fresh graph: placeholders arg0..argN, other nodes named by target.

    device_type replaces the device of tensor inputs in the spec and every device constant in
    the code (planning on "meta" for "cuda": model code that makes tensors on its trace device
    must not put that device into the key).
    """
    namer = _SymbolNamer()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    specs: list[InputSpec] = []
    root = torch.nn.Module()
    single_output = True
    devices = _DeviceNormalizer(device_type)
    # Tensor constants (get_attr) become trailing inputs, passed by the runner like weights: a
    # loaded Inductor artifact does not bind the constants its graph held, and keys then need
    # only their specs (on meta, where planning runs, they have no values).
    constants: list[torch.Tensor] = []
    lifted: dict[fx.Node, fx.Node] = {}
    tensor_attrs = [n for n in piece.graph.nodes if n.op == "get_attr"
                    and isinstance(_attribute(piece, n.target), torch.Tensor)]
    for node in piece.graph.nodes:
        if node.op != "placeholder" and tensor_attrs:  # after the last input
            for const in tensor_attrs:
                value = _attribute(piece, const.target)
                lifted[const] = graph.placeholder(f"arg{len(specs)}")
                lifted[const].meta = dict(const.meta)
                specs.append(input_spec(value, namer, device_type))
                constants.append(value)
            tensor_attrs = []
        if node.op == "placeholder":
            new = graph.placeholder(f"arg{len(specs)}")
            specs.append(input_spec(_example_value(node), namer, device_type))
        elif node in lifted:
            env[node] = lifted[node]
            continue
        elif node.op == "output":
            result = node.args[0]
            single_output = not isinstance(result, (tuple, list))
            values = (result,) if single_output else tuple(result)
            graph.output(tuple(fx.node.map_arg(v, lambda n: env[n]) for v in values))
            continue
        elif node.op == "get_attr":  # a submodule (tensors were lifted above)
            name = f"_attr{len(root._modules)}"
            root.add_module(name, _attribute(piece, node.target))
            new = graph.get_attr(name)
        else:
            if node.op == "call_module":
                raise TypeError(f"piece calls module {node.target!r}; pieces must be flat graphs")
            args, kwargs = devices((node.args, node.kwargs))
            new = graph.create_node(node.op, node.target, fx.node.map_arg(args, lambda n: env[n]),
                                    fx.node.map_arg(kwargs, lambda n: env[n]))
        new.meta = dict(node.meta)
        env[node] = new
    gm = _ShippedGraphModule(root, graph)
    return CanonicalPiece(gm, gm.code, tuple(specs), single_output, tuple(constants))


def _attribute(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


class _DeviceNormalizer:
    """Replaces torch.device constants in node arguments by the target device type."""

    def __init__(self, device_type: str | None):
        self.device = torch.device(device_type) if device_type else None

    def __call__(self, value: Any) -> Any:
        if self.device is None:
            return value
        return _map_constants(value, lambda v: self.device if isinstance(v, torch.device) else v)


def _map_constants(value: Any, fn: Any) -> Any:
    if isinstance(value, fx.Node):
        return value
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        mapped = [_map_constants(v, fn) for v in value]
        return type(value)(mapped) if not hasattr(value, "_fields") else type(value)(*mapped)
    if isinstance(value, dict):
        return {k: _map_constants(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_map_constants(v, fn) for v in (value.start, value.stop, value.step)))
    return fn(value)


class _Ref:
    """A reference to the node at `index` in a shipped graph."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _OpRef:
    """A torch op by name: packets of ops defined in Python (transformers' own custom ops, ours)
    do not pickle. `module` defines the op; the receiver imports it when the op is missing."""

    __slots__ = ("qualname", "overload", "module")

    def __init__(self, target: Any):
        self.qualname, self.overload = ops.qualname_and_overload(target)
        self.module = ops.defining_module(self.qualname)

    def __getstate__(self) -> tuple:
        return self.qualname, self.overload, self.module

    def __setstate__(self, state: tuple) -> None:
        self.qualname, self.overload, self.module = state

    def resolve(self) -> Any:
        import importlib

        ns, name = self.qualname.split("::")
        if not hasattr(getattr(torch.ops, ns), name) and self.module:
            importlib.import_module(self.module)
        packet = getattr(getattr(torch.ops, ns), name)
        return packet if self.overload is None else getattr(packet, self.overload)


def _ship_target(target: Any) -> Any:
    if ops.is_op(target):
        return _OpRef(target)
    return target


class _ShippedGraphModule(fx.GraphModule):
    """A GraphModule that pickles as its node list (op, name, target, args, kwargs) and is rebuilt
    node by node, so the receiver's code is the sender's code. A plain GraphModule pickles as its
    generated code and re-traces it on load, which fails on real model graphs (torch.Size of
    symbolic sizes, in-place item assignment, Tensor.expand with sizes as arguments)."""

    def __reduce__(self) -> tuple:
        index: dict[fx.Node, int] = {}
        nodes = []
        for node in self.graph.nodes:
            index[node] = len(index)
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(index[n]))
            nodes.append((node.op, node.name, _ship_target(node.target), args))
        tensors = dict(self.named_buffers())
        modules = dict(self.named_children())
        return (_rebuild, (nodes, tensors, modules))


def _rebuild(nodes: list[tuple], tensors: dict[str, torch.Tensor],
             modules: dict[str, torch.nn.Module]) -> _ShippedGraphModule:
    root = torch.nn.Module()
    for name, module in modules.items():
        root.add_module(name, module)
    for name, tensor in tensors.items():
        if "." not in name:
            root.register_buffer(name, tensor)
    graph = fx.Graph()
    built: list[fx.Node] = []
    resolve = lambda v: built[v.index] if isinstance(v, _Ref) else v  # noqa: E731
    for op, name, target, (args, kwargs) in nodes:
        target = target.resolve() if isinstance(target, _OpRef) else target
        args, kwargs = _map_refs(args, resolve), _map_refs(kwargs, resolve)
        built.append(graph.create_node(op, target, args, kwargs, name=name))
    return _ShippedGraphModule(root, graph)


def _map_refs(value: Any, fn: Any) -> Any:
    if isinstance(value, _Ref):
        return fn(value)
    if isinstance(value, (tuple, list)):
        mapped = [_map_refs(v, fn) for v in value]
        if isinstance(value, torch.Size):
            return tuple(mapped) if any(isinstance(v, fx.Node) for v in mapped) else type(value)(mapped)
        return type(value)(mapped) if not hasattr(value, "_fields") else type(value)(*mapped)
    if isinstance(value, dict):
        return {k: _map_refs(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_map_refs(value.start, fn), _map_refs(value.stop, fn), _map_refs(value.step, fn))
    return value
