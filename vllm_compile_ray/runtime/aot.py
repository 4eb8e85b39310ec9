"""Skip dynamo at a rank's startup: torch's AOT compile of the captured graph with its guards.

The first rank to load a model traces it as always, through `torch.compile(...).aot_compile`,
and publishes the result (dynamo's bytecode and guards, and the captured graph) to the cache
under a key of the model's code, settings, parameters, call and environment (`dynamo_key`;
under every miss policy but on_miss="compile", which keeps everything local). Every later
rank, replica or restart restores it instead of tracing: torch rebuilds the guards, our
`TracedModel` rebuilds the graph and hands it to the backend, which splits it and loads the
compiled pieces as after a trace. A guard that fails at a call (another dtype, a size outside
the traced range) falls back to tracing; a restore that fails is logged and traced over. Shared
objects are never deleted for it. transformers models restore too: the globals dynamo installs
for their bytecode (the module it loads to rebuild a ModelOutput) are saved with it
(`_save_installed_globals`).

torch's API (2.11 and 2.13, `torch._dynamo.aot_compile`): the backend must return a
`SerializableCallable`; `torch.compiler.load_compiled_function` checks Python, torch, CUDA,
Triton and the GPU itself. Graph values that are fake views do not pickle: only the inputs keep
theirs and the rest are propagated again on restore (the planner reads them).
"""

from __future__ import annotations

import contextvars
import dataclasses
import dis
import hashlib
import inspect
import io
import json
import logging
import pickle
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

logger = logging.getLogger(__name__)

try:
    from torch._dynamo.aot_compile_types import SerializableCallable
except ImportError:  # torch without AOT compile
    SUPPORTED = False
    SerializableCallable = object  # type: ignore[assignment,misc]
else:
    SUPPORTED = hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(
        torch.compiler, "load_compiled_function")

# The backend a restore hands its graph to (deserialization is a classmethod torch calls).
_BACKEND: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("vcr_aot_backend",
                                                                          default=None)
_META_KEPT = ("example_value", "val", "tensor_dict")


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
        for node in gm.graph.nodes:  # stack traces and module stacks do not pickle
            value = node.meta.get("example_value")
            for name in [k for k in node.meta if k not in _META_KEPT]:
                del node.meta[name]
            node.meta.pop("val", None)
            if value is not None and node.op != "placeholder":
                plain = _unviewed(value)
                if plain is None:
                    del node.meta["example_value"]
                else:
                    node.meta["example_value"] = plain
        return pickle.dumps({"graph": GraphPickler.dumps(gm, Options(ops_filter=None))})

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> TracedModel:
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        backend = _BACKEND.get()
        if backend is None:
            raise RuntimeError("a vllm_compile_ray traced model restores inside aot.restore()")
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        gm = GraphPickler.loads(pickle.loads(data)["graph"], fake_mode)
        gm.recompile()
        fakes = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        # A value nothing uses is no piece's input (transformers' graphs end in an unused
        # _log_api_usage_once, valueless after the trace too): only the others are propagated.
        if any("example_value" not in n.meta for n in gm.graph.nodes if n.users):
            FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*fakes)
            for node in gm.graph.nodes:
                if "val" in node.meta:
                    node.meta["example_value"] = node.meta["val"]
        return cls(gm, backend(gm, fakes))


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
    with torch._dynamo.config.patch(enable_aot_compile=True):
        # Guards on tensors (inputs and parameters: dtype, shape, device), shapes and global
        # state (grad mode, autocast); object-identity guards do not serialize (transformers'
        # models have them) and `dynamo_key` already covers the model's code, settings and
        # parameters.
        compiled = torch.compile(call_model, fullgraph=True, dynamic=False,
                                 backend=wrap(backend),
                                 options={"guard_filter_fn": _portable_guards})
        return compiled.aot_compile(((model, *args), dict(kwargs)))


def call_model(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What is traced: a function torch can save by reference (a model's own forward may be
    wrapped by decorators, as transformers' are, and then cannot)."""
    return model(*args, **kwargs)


def _portable_guards(guard_entries: Sequence[Any]) -> list[bool]:
    return [g.guard_type in ("GLOBAL_STATE", "SHAPE_ENV")
            or (g.guard_type == "TENSOR_MATCH" and not g.is_global) for g in guard_entries]


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


def is_guard_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "GuardManager check failed" in str(exc)


def dynamo_key(model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
               dynamic: Sequence[tuple[int, int]], environment: str) -> str:
    """Key of the traced function: the model's code (every module class's source file), its
    settings (`_settings`), parameters and buffers (names, shapes, dtypes, device type), the
    call (argument kinds, shapes with the dynamic dims left out) and `environment` (the compile
    fingerprint and config). Guards check the rest at every call."""
    h = hashlib.sha256(f"vcr-dynamo-2|{environment}|{sys.version_info[:2]}".encode())
    h.update(_settings(model).encode())
    files = sorted({inspect.getsourcefile(type(m)) or type(m).__qualname__
                    for m in model.modules()})
    for path in files:
        h.update(path.rsplit("site-packages", 1)[-1].encode())
        try:
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError:
            h.update(b"?")
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type}".encode())
    marked = {(i, d) for i, d in dynamic}
    for i, value in enumerate((*args, *(kwargs[k] for k in sorted(kwargs)))):
        if isinstance(value, torch.Tensor):
            shape = ["*" if (i, d) in marked else s for d, s in enumerate(value.shape)]
            h.update(f"{i}:{shape}:{value.dtype}:{value.device.type}".encode())
        else:
            h.update(f"{i}:{type(value).__name__}:{value!r}"[:200].encode())
    h.update(f"kwargs:{sorted(kwargs)}".encode())
    return h.hexdigest()


def _settings(model: torch.nn.Module) -> str:
    """What the traced code holds as constants besides code and tensors, which the kept guards
    do not check: every module's plain attributes (eps, head counts, windows, training) and the
    model's `config` (a transformers config or a dataclass: the flags its forward reads, as
    transformers' code does). Not the root's `rank`: the ranks of a TP group share one key."""
    parts = [f"{name}.{attr}={value!r}" for name, module in model.named_modules()
             for attr, value in sorted(vars(module).items())
             if isinstance(value, (bool, int, float, str, type(None)))
             and not (name == "" and attr == "rank")]
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    try:
        parts.append(json.dumps(config, sort_keys=True, default=repr))
    except TypeError:  # keys that do not sort
        parts.append(repr(config))
    return "\n".join(parts)


def dynamic_dims_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(argument position, dim) of every dim `mark_dynamic` marked, kwargs after args by name."""
    values = (*args, *(kwargs[k] for k in sorted(kwargs)))
    return [(i, d) for i, v in enumerate(values) if isinstance(v, torch.Tensor)
            for d in sorted(getattr(v, "_dynamo_dynamic_indices", ()))]


def start(compiled: Any, store: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """Give `compiled` (an `api.CompiledModel`) its traced function for this call: restored from
    `store` when a rank published one, else traced here and published. Returns what happened
    ("restored", "traced+published", "traced", or "off: <why>"); on "off" the model traces
    through plain dynamo at its first call, as without this module."""
    from ..planning.inputs import mark_dynamic

    if not SUPPORTED:
        return "off: torch has no AOT compile"
    model, backend = compiled.model, compiled.backend
    config = backend.config
    if config.disable_compile_cache or store is None:
        return "off: no cache"
    mark_dynamic(model, args, kwargs, config.dynamic_dims)
    key = dynamo_key(model, args, kwargs, dynamic_dims_of(args, kwargs),
                     f"{backend.key_context.fingerprint_id}|{backend.key_context.config_digest}|"
                     f"{backend.key_context.compiler_hash}")
    try:
        return _restore_or_trace(compiled, store, key, args, kwargs)
    finally:  # a marked tensor fails the traced function's guards (torch >= 2.13)
        _unmark((*args, *kwargs.values()))


def _unmark(values: Sequence[Any]) -> None:
    for value in values:
        if isinstance(value, torch.Tensor):
            for name in [n for n in vars(value) if n.startswith(("_dynamo_", "_has_dynamo_"))]:
                delattr(value, name)


def _restore_or_trace(compiled: Any, store: Any, key: str, args: Sequence[Any],
                      kwargs: Mapping[str, Any]) -> str:
    from ..planning.plan import dynamo_settings, raise_traced_error

    model, backend = compiled.model, compiled.backend
    if store.contains(key):
        try:
            with dynamo_settings(), torch.no_grad():
                compiled.traced = restore(store.fetch(key).payload, model, backend)
            return "restored"
        except Exception as exc:  # noqa: BLE001  (a VcrError from the backend is re-raised)
            if _ours(exc) is not None:
                raise _ours(exc) from None
            logger.warning("restoring the traced model %s failed, tracing it: %s: %s", key[:12],
                           type(exc).__name__, str(exc)[:300])
    try:
        with dynamo_settings(), torch.no_grad():
            compiled.traced = trace(model, backend, args, kwargs)
    except torch._dynamo.exc.Unsupported as exc:
        raise_traced_error(exc)
        raise
    except Exception as exc:  # noqa: BLE001
        if _ours(exc) is not None:
            raise _ours(exc) from None
        logger.warning("AOT compile of the model failed, tracing it with dynamo: %s: %s",
                       type(exc).__name__, str(exc)[:300])
        return f"off: {type(exc).__name__}"
    if backend.config.on_miss == "compile":  # local only: this policy publishes nothing
        return "traced"
    try:
        data = serialize(compiled.traced)
        store.publish(key, data, {"kind": "dynamo", "torch": torch.__version__,
                                  "fingerprint": backend.key_context.fingerprint_id,
                                  "published_at": time.time()})  # `vcr gc --older-than-days`
    except Exception as exc:  # noqa: BLE001  (the traced function works; others trace too)
        logger.warning("publishing the traced model failed: %s: %s", type(exc).__name__, exc)
        return "traced"
    return "traced+published"


def _ours(exc: BaseException) -> BaseException | None:
    """Our error (CacheMissError, CompileError, ...) under dynamo's wrappers, if that is it."""
    from ..errors import VcrError

    seen = exc
    for _ in range(5):
        if isinstance(seen, VcrError):
            return seen
        inner = getattr(seen, "inner_exception", None) or seen.__cause__
        if inner is None:
            return None
        seen = inner
    return None
