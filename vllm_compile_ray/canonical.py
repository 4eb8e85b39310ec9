"""Canonical pieces: each piece rebuilt with canonical names so identical layers share one key."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


@dataclass(frozen=True)
class InputSpec:
    """One piece input: a tensor (shape/stride entries are ints or canonical symbols "s0"), or a
    SymInt (expr names a canonical symbol), or a plain int (value)."""

    kind: str  # "tensor" | "symint" | "int"
    shape: tuple[int | str, ...] = ()
    stride: tuple[int | str, ...] = ()
    dtype: str = ""
    device_type: str = ""
    expr: str = ""
    value: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "stride": list(self.stride),
                "dtype": self.dtype, "device_type": self.device_type, "expr": self.expr,
                "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(data["kind"], tuple(data["shape"]), tuple(data["stride"]), data["dtype"],
                   data["device_type"], data["expr"], data["value"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class CanonicalPiece:
    """A piece with canonical names, its input spec, and the code its key is computed from.

    `graph` has already been through a pickle round trip, which is how Ray ships it, so `code` is
    the code every receiver sees. It always returns a tuple; `single_output` says whether the
    original piece returned one bare value.
    """

    graph: fx.GraphModule
    code: str
    input_specs: tuple[InputSpec, ...]
    single_output: bool

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
    canonicalizes each distinct layer once (the pickle round trip is the costly part)."""
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

    device_type replaces the device of tensor inputs in the spec (planning on "meta" for "cuda").
    """
    namer = _SymbolNamer()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    specs: list[InputSpec] = []
    root = torch.nn.Module()
    single_output = True
    for node in piece.graph.nodes:
        if node.op == "placeholder":
            new = graph.placeholder(f"arg{len(specs)}")
            specs.append(input_spec(_example_value(node), namer, device_type))
        elif node.op == "output":
            result = node.args[0]
            single_output = not isinstance(result, (tuple, list))
            values = (result,) if single_output else tuple(result)
            graph.output(tuple(fx.node.map_arg(v, lambda n: env[n]) for v in values))
            continue
        elif node.op == "get_attr":
            name = f"_attr{len(root._buffers) + len(root._parameters) + len(root._modules)}"
            attr = piece
            for part in node.target.split("."):
                attr = getattr(attr, part)
            if isinstance(attr, torch.nn.Module):
                root.add_module(name, attr)
            else:
                root.register_buffer(name, attr)
            new = graph.get_attr(name)
        else:
            if node.op == "call_module":
                raise TypeError(f"piece calls module {node.target!r}; pieces must be flat graphs")
            new = graph.create_node(node.op, node.target,
                                    fx.node.map_arg(node.args, lambda n: env[n]),
                                    fx.node.map_arg(node.kwargs, lambda n: env[n]))
        new.meta = dict(node.meta)
        env[node] = new
    gm = fx.GraphModule(root, graph)
    shipped = pickle.loads(pickle.dumps(gm))
    return CanonicalPiece(shipped, shipped.code, tuple(specs), single_output)
