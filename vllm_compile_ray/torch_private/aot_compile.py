"""dynamo's AOT compile: trace a call into a guarded, serializable function, save it, restore it.

torch's API (2.11 and 2.13, `torch._dynamo.aot_compile`): the backend must return a
`SerializableCallable`; `torch.compiler.load_compiled_function` checks Python, torch, CUDA,
Triton and the GPU itself. Graph values that are fake views do not pickle: only the inputs keep
theirs and the rest are propagated again on restore (the planner reads them). What is traced,
under which key, and when it is published or restored is `runtime/aot.py`'s business.

`SUPPORTED` gates it: False on a torch without AOT compile, and the package traces as before.
A saved function names `TracedModel` by module path (its deserializer is pickled by reference):
moving the class changes what old entries load, so `runtime.aot.dynamo_key` changes with it.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import dis
import inspect
import io
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from . import graphs

try:
    from torch._dynamo.aot_compile_types import SerializableCallable
except ImportError:  # torch without AOT compile
    SUPPORTED = False
    SerializableCallable = object  # type: ignore[assignment,misc]
else:
    SUPPORTED = hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(
        torch.compiler, "load_compiled_function")

# torch < 2.12 leaves the builtins the traced bytecode loads (`type`, in transformers' code) out
# of the function's saved globals, and its own check then fails the trace ("Missing required
# external references"); torch 2.12 saves them. On those, `trace` adds them (`_with_builtins`).
BUILTINS_OMITTED = SUPPORTED and tuple(
    int(part) for part in torch.__version__.split(".")[:2]) < (2, 12)

# The backend a restore hands its graph to (deserialization is a classmethod torch calls).
_BACKEND: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("vcr_aot_backend",
                                                                          default=None)
_META_KEPT = ("example_value", "val", "tensor_dict", graphs.PIECE_IO)


class TracedModel(SerializableCallable):
    """What the backend returns under AOT compile: the captured graph (kept to serialize) and
    the backend's runtime for it (the split graph with its compiled pieces)."""

    def __init__(self, graph: fx.GraphModule, runtime: Callable):
        self.graph, self.runtime = graph, runtime

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime(*args, **kwargs)

    @classmethod
    def serialize_compile_artifacts(cls, fn: TracedModel) -> bytes:
        from torch.fx._graph_pickler import GraphPickler, Options

        gm = fn.graph
        # Sparse: the tensor values kept are those the splitter flagged as a piece's input or
        # output (with the graph's inputs and sizes, all the planner reads); rebuilding every
        # node's fake tensor was most of a restore.
        sparse = any(graphs.PIECE_IO in node.meta for node in gm.graph.nodes)
        for node in gm.graph.nodes:  # stack traces and module stacks do not pickle
            value = node.meta.get("example_value")
            for name in [k for k in node.meta if k not in _META_KEPT]:
                del node.meta[name]
            node.meta.pop("val", None)
            if value is None or node.op == "placeholder":
                continue
            if sparse and not node.meta.get(graphs.PIECE_IO) and _has_tensor(value):
                del node.meta["example_value"]
                continue
            plain = _unviewed(value)
            if plain is None:
                del node.meta["example_value"]
            else:
                node.meta["example_value"] = plain
        return pickle.dumps({"graph": GraphPickler.dumps(gm, Options(ops_filter=None)),
                             "sparse": sparse})

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> TracedModel:
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        backend = _BACKEND.get()
        if backend is None:
            raise RuntimeError("a vllm_compile_ray traced model restores inside "
                               "aot_compile.restore()")
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        payload = pickle.loads(data)
        # Not recompiled: the planner reads its nodes and nothing runs its own code (its code
        # generation was a quarter of the restore on a 32-layer graph).
        gm = GraphPickler.loads(payload["graph"], fake_mode)
        fakes = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        sparse = payload.get("sparse", False)
        # Values are propagated again when one the planner reads is missing (a view `_unviewed`
        # could not make plain). A value nothing uses is no piece's input (transformers' graphs
        # end in an unused _log_api_usage_once, valueless after the trace too).
        if any("example_value" not in n.meta for n in gm.graph.nodes if n.users and (
                not sparse or n.op == "placeholder" or n.meta.get(graphs.PIECE_IO))):
            FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*fakes)
            for node in gm.graph.nodes:
                if "val" in node.meta:
                    node.meta["example_value"] = node.meta["val"]
        return cls(gm, backend(gm, fakes))


def _has_tensor(value: Any) -> bool:
    from torch.utils import _pytree as pytree

    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _unviewed(value: Any) -> Any:
    """A fake view does not pickle (its base's weak references): the same shape, strides and
    dtype as a tensor of its own, which is all the planner reads. None when it cannot be made
    (the restore then propagates the graph's values again)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree

    def plain(t: Any) -> Any:
        if isinstance(t, FakeTensor) and t._is_view():
            with t.fake_mode:
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        return t

    try:
        return pytree.tree_map_only(torch.Tensor, plain, value)
    except Exception:  # noqa: BLE001
        return None


def wrap(backend: Callable) -> Callable:
    """The backend, returning a `TracedModel` (what AOT compile can serialize)."""
    def aot_backend(gm: fx.GraphModule, example_inputs: list) -> TracedModel:
        return TracedModel(gm, backend(gm, example_inputs))
    return aot_backend


def trace(model: torch.nn.Module, backend: Callable, args: Sequence[Any],
          kwargs: Mapping[str, Any]) -> Any:
    """Trace `model`'s forward for this call (dims already marked dynamic) into a guarded,
    serializable compiled function; call it as fn(model, *args, **kwargs)."""
    with torch._dynamo.config.patch(enable_aot_compile=True), _with_builtins():
        # Guards on tensors (inputs and parameters: dtype, shape, device) and shapes; global
        # state is the key's and the caller's (`_portable_guards`); object-identity guards do not
        # serialize (transformers' models have them) and `dynamo_key` already covers the
        # model's code, settings and parameters.
        compiled = torch.compile(call_model, fullgraph=True, dynamic=False,
                                 backend=wrap(backend),
                                 options={"guard_filter_fn": _portable_guards})
        return compiled.aot_compile(((model, *args), dict(kwargs)))


@contextlib.contextmanager
def _with_builtins() -> Any:
    """While tracing on a torch that omits them (`BUILTINS_OMITTED`): the builtins and the
    builtins dicts the traced bytecode loads go into its saved globals, as torch 2.12 does."""
    if not BUILTINS_OMITTED:
        yield
        return
    from torch._dynamo.convert_frame import GraphCaptureOutput

    original = GraphCaptureOutput.get_runtime_env

    def get_runtime_env(self: Any) -> Any:
        env = original(self)
        for ref in env.external_refs:
            if ref in env.used_globals:
                continue
            if ref.startswith("__builtins_dict__") and ref in self.f_globals:
                env.used_globals[ref] = {k: v for k, v in self.f_globals[ref].items()
                                         if _pickles(v)}
            elif hasattr(builtins, ref):
                env.used_globals[ref] = getattr(builtins, ref)
        return env

    GraphCaptureOutput.get_runtime_env = get_runtime_env
    try:
        yield
    finally:
        GraphCaptureOutput.get_runtime_env = original


def _pickles(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001
        return False
    return True


def call_model(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What is traced: a function torch can save by reference (a model's own forward may be
    wrapped by decorators, as transformers' are, and then cannot)."""
    return model(*args, **kwargs)


def _portable_guards(guard_entries: Sequence[Any]) -> list[bool]:
    """Shape and tensor guards. Not GLOBAL_STATE: it includes the CPU thread count, which
    differs between the process that traced and one that restores; `dynamo.global_state()`
    (the rest of it) is in the key and checked at every call instead."""
    return [g.guard_type == "SHAPE_ENV" or (g.guard_type == "TENSOR_MATCH" and not g.is_global)
            for g in guard_entries]


def serialize(fn: Any) -> bytes:
    _save_installed_globals(fn)
    return type(fn).serialize(fn).serialized_data


def _save_installed_globals(fn: Any) -> None:
    """Save with `fn` the globals its bytecode loads that torch would not: torch saves the
    globals that hold graph inputs, builtins and `import_sources`, not those dynamo installed
    in the traced frame's globals while tracing (`install_global_by_id`): the bytecode that
    rebuilds transformers' ModelOutput loads `___module_collections_<id>_c<n>`, and a restore
    without it fails ("Missing required external references"). Modules pickle by name, classes
    and functions by reference; any other value is refused here, so the function is not
    published (later ranks trace) rather than restored with a copy of the object."""
    env = fn._artifacts.runtime_env
    scope = fn.fn.__globals__  # the traced function's globals: every name its bytecode loads
    refs = getattr(env, "external_refs", None) or {  # a torch that lists none: as 2.13 does
        i.argval for i in dis.get_instructions(env.bytecode) if i.opname == "LOAD_GLOBAL"}
    saved = {*env.used_globals, *env.import_sources, fn._artifacts.backend_id}
    for name in sorted(set(refs) - saved):
        if name not in scope:
            continue  # torch's own check names it at restore
        value = scope[name]
        if not (inspect.ismodule(value) or inspect.isclass(value) or inspect.isfunction(value)
                or inspect.isbuiltin(value)):
            raise TypeError(f"the traced bytecode loads the global {name!r}, a "
                            f"{type(value).__name__}, which cannot be saved by reference")
        env.used_globals[name] = value


def restore(data: bytes, model: torch.nn.Module, backend: Callable) -> Any:
    """A function `trace` made, from its bytes, its graph handed to `backend`."""
    token = _BACKEND.set(backend)
    try:
        return torch.compiler.load_compiled_function(io.BytesIO(data), f_globals=globals())
    finally:
        _BACKEND.reset(token)


def accepts(fn: Any, *args: Any, **kwargs: Any) -> bool | None:
    """Whether a function `trace` made passes its guards for fn(*args, **kwargs), without
    running it; None where this torch cannot say."""
    check = getattr(fn, "guard_check", None)
    if check is None:
        return None
    return bool(check(*args, **kwargs))


def is_guard_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "GuardManager check failed" in str(exc)
