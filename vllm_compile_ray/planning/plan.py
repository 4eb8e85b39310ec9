"""Capture a model with dynamo, split it, canonicalize the pieces and key every (piece, shape)."""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import errors
from ..config import DEFAULT_SPLITTING_OPS, CompilationConfig
from ..errors import ConfigError
from ..keys import KeyContext, code_id
from ..torch_private import dynamo
from .canonical import CanonicalPiece, canonicalize, structure
from .inputs import mark_dynamic
from .splitting import SplitItem, graph_op_names, split_graph

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileTask:
    """One unique (piece, shape) to compile."""

    key: str
    code_id: str
    shape: int | str
    piece: CanonicalPiece = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"compile[{self.code_id}/{self.shape}]"


@dataclass
class PlannedPiece:
    submod_name: str
    graph_id: int
    piece: CanonicalPiece
    code_id: str
    keys: dict[int | str, str]


@dataclass
class Plan:
    split_gm: fx.GraphModule
    items: list[SplitItem]
    pieces: list[PlannedPiece]
    shapes: tuple[int | str, ...]  # the first graph's (`plan_graphs`)
    key_context: KeyContext
    # Graphs after the first (`plan_graphs`): the sizes of the calls that traced them; their
    # pieces follow the first graph's `first_pieces`.
    later_sizes: tuple[int | None, ...] = ()
    first_pieces: int | None = None

    @property
    def graphs(self) -> int:
        return 1 + len(self.later_sizes)

    def tasks(self) -> list[CompileTask]:
        """Unique (piece, shape) tasks, in graph order; identical layers appear once."""
        seen: dict[str, CompileTask] = {}
        for planned in self.pieces:
            for shape, key in planned.keys.items():
                if key not in seen:
                    seen[key] = CompileTask(key, planned.code_id, shape, planned.piece)
        return list(seen.values())

    @property
    def keys(self) -> list[str]:
        return [task.key for task in self.tasks()]

    def rekeyed(self, key_context: KeyContext) -> Plan:
        """The same pieces keyed with `key_context` (a fingerprint that came after planning)."""
        keys: dict[int, dict[int | str, str]] = {}  # identical layers share one piece: key once
        pieces = []
        for p in self.pieces:
            if id(p.piece) not in keys:
                keys[id(p.piece)] = {shape: key_context.key(p.piece.code, p.piece.input_specs,
                                                             shape) for shape in p.keys}
            pieces.append(PlannedPiece(p.submod_name, p.graph_id, p.piece, p.code_id,
                                       keys[id(p.piece)]))
        return Plan(self.split_gm, self.items, pieces, self.shapes, key_context,
                    self.later_sizes, self.first_pieces)

    def summary(self) -> dict[str, Any]:
        return {"pieces": len(self.pieces), "splitting_pieces": sum(i.is_splitting_graph for i in self.items),
                "unique_pieces": len({p.code_id for p in self.pieces}), "shapes": list(self.shapes),
                "tasks": len(self.tasks()), "graphs": self.graphs,
                "fingerprint": self.key_context.fingerprint_id}


def plan_graph(gm: fx.GraphModule, config: CompilationConfig, key_context: KeyContext,
               device_type: str | None = None,
               shapes: Sequence[int | str] | None = None) -> Plan:
    """Split `gm` (whole, for "dynamo_once"), canonicalize each compiled piece and key it for
    `shapes` (default: the config's)."""
    shapes = tuple(shapes) if shapes is not None else config.shapes
    splitting_ops = config.splitting_ops if config.compilation_level == "piecewise" else ()
    check_splitting_ops(gm, splitting_ops)
    split_gm, items = split_graph(gm, splitting_ops)
    pieces = []
    seen: dict[tuple, PlannedPiece] = {}  # identical layers: canonicalize and key once
    signatures: dict[int, tuple] = {}  # the splitter builds one module for identical layers
    for item in items:
        if item.is_splitting_graph:
            continue
        signature = signatures.get(id(item.graph))
        if signature is None:
            signature = signatures[id(item.graph)] = structure(item.graph, device_type)
        twin = seen.get(signature)
        if twin is None:
            piece = canonicalize(item.graph, device_type)
            keys = {shape: key_context.key(piece.code, piece.input_specs, shape)
                    for shape in shapes}
            twin = seen[signature] = PlannedPiece(item.submod_name, item.graph_id, piece,
                                                  code_id(piece.code), keys)
        pieces.append(PlannedPiece(item.submod_name, item.graph_id, twin.piece, twin.code_id,
                                   twin.keys))
    return Plan(split_gm, items, pieces, shapes, key_context)


def check_splitting_ops(gm: fx.GraphModule, splitting_ops: tuple[str, ...]) -> None:
    """A splitting op the graph never calls: an error when the user named it, a warning for the
    default (a model without vcr attention runs as one piece, correct but unshared)."""
    called = graph_op_names(gm)
    unmatched = [op for op in splitting_ops if op not in called]
    if not unmatched:
        return
    listing = ", ".join(called) or "none"
    if tuple(splitting_ops) != DEFAULT_SPLITTING_OPS:
        raise ConfigError(f"splitting_ops {unmatched} match no op in the captured graph; the ops "
                          f"it calls: {listing}")
    logger.warning("the captured graph calls no %s: it compiles as one piece, without sharing "
                   "identical layers (a transformers model splits where it calls transformers' "
                   "attention interface; a model of your own calls "
                   "vllm_compile_ray.models.ops.attention)", unmatched)


def capture_calls(model: torch.nn.Module, calls: Sequence[tuple[Sequence[Any], dict[str, Any]]],
                  dynamic_dims: dict[str, int] | None = None
                  ) -> list[tuple[fx.GraphModule, int | None]]:
    """The dynamo graphs of `model` for `calls`, in order, as one compiled model traces them:
    the first call traces; a later one outside every graph's guards traces another. Each with
    the token count of the call that traced it. The graphs run for their outputs' shapes only
    (`dynamo.shapes_only`): a model of uninitialized CPU tensors computes nothing."""
    graphs: list[tuple[fx.GraphModule, int | None]] = []
    size: list[int | None] = [None]

    def record(gm: fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append((gm, size[0]))
        return dynamo.shapes_only(gm)

    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=False)
    for args, kwargs in calls:
        size[0] = mark_dynamic(model, args, kwargs, dynamic_dims)
        try:
            with dynamo.capture_settings(), torch.no_grad():
                compiled(*args, **kwargs)
        except Exception as exc:
            if dynamo.is_unsupported(exc) or dynamo.specialized(exc):
                raise_traced_error(exc)
            failed = dynamo.model_code_error(exc)
            if failed:
                raise errors.ConfigError(
                    f"the model's code failed while dynamo traced it: {failed}; a field of its "
                    "config it reads may be missing or invalid") from None
            raise
    return graphs


def later_graph_shapes(config: CompilationConfig, size: int | None
                       ) -> tuple[int | str, ...] | None:
    """The shapes to key a graph that a call outside the first graph's guards traced: that
    call's size when it is a static compile size (a graph dynamo traced for 1 token may hold
    constants of it: `arange(2)` for `arange(2 * tokens)`), else every shape (None)."""
    return (size,) if size in config.compile_sizes else None


def plan_graphs(graphs: Sequence[tuple[fx.GraphModule, int | None]], config: CompilationConfig,
                key_context: KeyContext, device_type: str | None = None) -> Plan:
    """One plan of `capture_calls`' graphs: the first keyed for every shape, a later one as a
    rank's backend keys it (`later_graph_shapes`); its tasks are all of theirs."""
    plans = [plan_graph(gm, config, key_context, device_type,
                        shapes=later_graph_shapes(config, size) if i else None)
             for i, (gm, size) in enumerate(graphs)]
    first = plans[0]
    return Plan(first.split_gm, [i for p in plans for i in p.items],
                [piece for p in plans for piece in p.pieces], first.shapes, key_context,
                tuple(size for _, size in graphs[1:]), len(first.pieces))


def raise_traced_error(exc: BaseException) -> None:
    """Dynamo turns an exception raised in the traced code (one of ours: an unsupported model,
    a bad config) into `Unsupported("Observed exception ... raised exception Name('msg')")`:
    raise ours again, with its own message, instead. A token count the model's code fixed
    while tracing (it loops or branches on it) is an UnsupportedModelError saying so."""
    fixed = dynamo.specialized(exc)
    if fixed:
        raise errors.UnsupportedModelError(
            f"the model's code fixes the token count while dynamo traces it ({fixed}: it "
            "branches or loops on the number of tokens), so it does not trace with a dynamic "
            "token count, which vcr's plans and ranks trace with (every piece is keyed at a "
            "symbolic size). Transformers' Jamba on CPU does this in its scan") from None
    link: BaseException | None = exc
    while link is not None:
        found = re.search(r"raised exception (\w+)\(((['\"]).*\3)\)", str(link), re.S)
        cls = getattr(errors, found.group(1), None) if found else None
        if isinstance(cls, type) and issubclass(cls, errors.VcrError) and \
                cls not in (errors.CacheMissError,):
            try:
                message = ast.literal_eval(found.group(2))
            except (ValueError, SyntaxError):
                message = found.group(2)
            raise cls(message) from None
        link = link.__cause__ or link.__context__



def capture(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None,
            dynamic_dims: dict[str, int] | None = None) -> fx.GraphModule:
    """The dynamo graph of `model(*args, **kwargs)` with a dynamic num_tokens (works on the
    meta device; `inputs.mark_dynamic` says which dims)."""
    graphs = capture_calls(model, [(args, kwargs or {})], dynamic_dims)
    if len(graphs) != 1:
        raise RuntimeError(f"expected dynamo to capture one graph, got {len(graphs)}")
    return graphs[0][0]
