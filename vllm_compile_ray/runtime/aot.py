"""Skip dynamo at a rank's startup: torch's AOT compile of the captured graph with its guards.

`vcr warm` traces the model as its first rank would (`publish_ahead`, from a task on a compile
node: `orchestration/trace_task.py`); failing that, the first rank to load a model traces it as
always, through `torch.compile(...).aot_compile`, and publishes the result (dynamo's bytecode
and guards, and the captured graph) to the cache under a key of the model's code, settings,
parameters, call and environment (`dynamo_key`; under every miss policy but
on_miss="compile", which keeps everything local). Every later rank, replica or restart
restores it instead of tracing: torch rebuilds the guards, our
`TracedModel` rebuilds the graph and hands it to the backend, which splits it and loads the
compiled pieces as after a trace. A guard that fails at a call (another dtype, a size outside
the traced range) falls back to tracing; a restore that fails is logged and traced over. Shared
objects are never deleted for it. transformers models restore too: the globals dynamo installs
for their bytecode (the module it loads to rebuild a ModelOutput) are saved with it
(`aot_compile._save_installed_globals`).

This module decides what is traced, under which key, and when it is restored or published;
torch's side (tracing, saving and restoring the function, `TracedModel`) is
`torch_private/aot_compile.py`, gated by its `SUPPORTED`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from ..torch_private import dynamo
from ..torch_private.aot_compile import SUPPORTED, accepts, restore, serialize, trace

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED", "dynamo_key", "later", "publish_ahead", "restore", "serialize", "start",
           "trace"]


def dynamo_key(model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
               dynamic: Sequence[tuple[int, int]], environment: str) -> str:
    """Key of the traced function: the model's code (every module class's source file), its
    settings (`_settings`), parameters and buffers (names, shapes, dtypes, device type), the
    process group's size, the global state (`dynamo.global_state`: autocast, default dtype,
    ...; the caller checks it at every call), the call (argument kinds, shapes with the
    dynamic dims left out) and `environment` (the compile fingerprint and config). Guards check
    the rest at every call."""
    # -3: `TracedModel` moved to torch_private (a saved function names it by module path)
    h = hashlib.sha256(f"vcr-dynamo-3|{environment}|{sys.version_info[:2]}".encode())
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
    # The process group's size: model code may branch on it while tracing (a rank of a TP group
    # and `vcr warm`'s task must not share a function traced without the group).
    h.update(f"process-group:{process_group_size()}".encode())
    h.update(f"global-state:{dynamo.global_state()!r}".encode())
    marked = {(i, d) for i, d in dynamic}
    for i, value in enumerate((*args, *(kwargs[k] for k in sorted(kwargs)))):
        if isinstance(value, torch.Tensor):
            shape = ["*" if (i, d) in marked else s for d, s in enumerate(value.shape)]
            h.update(f"{i}:{shape}:{value.dtype}:{value.device.type}".encode())
        else:
            h.update(f"{i}:{type(value).__name__}:{value!r}"[:200].encode())
    h.update(f"kwargs:{sorted(kwargs)}".encode())
    return h.hexdigest()


def process_group_size() -> int:
    """World size of the default process group; 1 without one."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def start(compiled: Any, store: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """Give `compiled` (an `api.CompiledModel`) its traced function for this call: restored from
    `store` when a rank or `vcr warm` published one, else traced here and published. Returns
    what happened ("restored", "traced+published", "traced", or "off: <why>"); on "off" the
    model traces through plain dynamo at its first call, as without this module."""
    off = _unsupported(compiled, store)
    if off:
        return off
    key = _marked_key(compiled, args, kwargs)
    compiled.traced_state = dynamo.global_state()  # what the key holds; checked at each call
    compiled.traced_store = store  # for the functions of calls outside its guards (`later`)
    try:
        return _restore_or_trace(compiled, store, key, args, kwargs)
    finally:  # a marked tensor fails the traced function's guards (torch >= 2.13)
        dynamo.unmark((*args, *kwargs.values()))


def publish_ahead(compiled: Any, store: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
                  expected: Collection[str] | None = None,
                  later_calls: Sequence[tuple[int, Sequence[Any], Mapping[str, Any]]] = ()
                  ) -> str:
    """Trace `compiled`'s model for this call and publish the result, planning its graph but
    loading or compiling no piece: what `vcr warm` does so that the first rank restores too.
    `compiled` and the call must be what that rank's `load` makes (same model build, settings,
    device type and trace size), or the key differs and the rank traces. later_calls: the
    rank's warm-up calls, (size, args, kwargs); one outside the traced function's guards gets
    a function of its own, published as the rank keys it (`later`). Returns "published",
    "present" (a rank or an earlier warm published it) or "off: <why>"; "published" says how
    many later graphs it published and how many pieces the ranks load that `expected` (the
    warm's plan) lacks."""
    off = _unsupported(compiled, store)
    if off:
        return off
    key = _marked_key(compiled, args, kwargs)
    plans: list = []
    try:
        if store.contains(key):
            return "present"
        with dynamo.capture_settings(), torch.no_grad():
            traced = trace(compiled.model, _plan_only(compiled.backend, plans, None), args,
                           kwargs)
        if not _publish(store, key, traced, compiled.backend):
            return "present"
    finally:
        dynamo.unmark((*args, *kwargs.values()))
    outside = [size for size, a, k in later_calls
               if accepts(traced, compiled.model, *a, **k) is False
               and _publish_later(compiled, store, plans, size, a, k)]
    more = (f" (and {len(outside)} for size(s) {', '.join(map(str, outside))}, outside its "
            "guards)" if outside else "")
    return "published" + more + _unplanned([k for p in plans for k in p.keys], expected)


def _publish_later(compiled: Any, store: Any, plans: list, size: int, args: Sequence[Any],
                   kwargs: Mapping[str, Any]) -> bool:
    """Trace and publish the function of a `size` call outside the first one's guards, keyed
    as `later` keys it; False (logged) when that fails: the ranks trace that call."""
    key = _marked_key(compiled, args, kwargs, later=size)
    try:
        with dynamo.capture_settings(), torch.no_grad():
            fn = trace(compiled.model, _plan_only(compiled.backend, plans, size), args, kwargs)
        _publish(store, key, fn, compiled.backend)
    except Exception as exc:  # noqa: BLE001  (the first function is published; ranks trace this)
        logger.warning("tracing the model at %d tokens (outside its guards) failed: %s: %s",
                       size, type(exc).__name__, str(exc)[:300])
        return False
    finally:
        dynamo.unmark((*args, *kwargs.values()))
    return True


def _plan_only(backend: Any, plans: list, size: int | None) -> Any:
    """A backend that plans the graph (appended to `plans`) as the rank's backend keys it, and
    returns the split graph: no piece is loaded or compiled."""
    from ..planning.plan import later_graph_shapes, plan_graph

    def plan_only(gm: Any, example_inputs: list) -> Any:
        shapes = later_graph_shapes(backend.config, size) if size is not None else None
        plans.append(plan_graph(gm, backend.config, backend.key_context, backend.device_type,
                                shapes))
        return plans[-1].split_gm
    return plan_only


def later(compiled: Any, args: Sequence[Any], kwargs: Mapping[str, Any], size: int) -> str:
    """A call of `size` tokens outside the guards of the function `start` gave `compiled`
    (DeepSeek-V3 and Qwen3-Next exclude 1 token): a function of its own for it, restored when a
    rank or `vcr warm` published one, else traced here (its graph keyed for that size:
    `later_graph_shapes`) and published as `start` publishes. It goes into
    `compiled.later[size]`; returns what happened, as `start` does ("off: <why>": dynamo
    traces the call)."""
    store = compiled.traced_store
    key = _marked_key(compiled, args, kwargs, later=size)
    try:
        return _restore_or_trace(compiled, store, key, args, kwargs, later=size)
    finally:
        dynamo.unmark((*args, *kwargs.values()))


def _unplanned(keys: list[str], expected: Collection[str] | None) -> str:
    """What the ranks load that the warm's plan lacks: the model traced another graph on the
    ranks' device than where the warm planned (code that branches on the device type: the warm
    plans a CUDA target on meta)."""
    missing = [k for k in keys if k not in expected] if expected is not None else []
    if not missing:
        return ""
    logger.warning("the ranks load %d pieces the warm did not plan (%s...): the model traces "
                   "another graph on its device than where the warm planned", len(missing),
                   missing[0][:12])
    return (f"; but {len(missing)} of the {len(keys)} compiled pieces its ranks load are not in "
            "this warm's plan (the model traces another graph on its device): they compile at "
            "the ranks' first start")


def _unsupported(compiled: Any, store: Any) -> str:
    if not SUPPORTED:
        return "off: torch has no AOT compile"
    if compiled.backend.config.disable_compile_cache or store is None:
        return "off: no cache"
    return ""


def _marked_key(compiled: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
                later: int | None = None) -> str:
    """Mark the call's dynamic dims (unmarked by the caller) and key the traced function; a
    `later` one (a call of that size outside the first function's guards) has its own key."""
    from ..planning.inputs import mark_dynamic

    backend = compiled.backend
    mark_dynamic(compiled.model, args, kwargs, backend.config.dynamic_dims)
    context = backend.key_context
    environment = f"{context.fingerprint_id}|{context.config_digest}|{context.compiler_hash}"
    if later is not None:
        environment += f"|later-graph:{later}"
    return dynamo_key(compiled.model, args, kwargs, dynamo.marked_dims(args, kwargs),
                      environment)


def _publish(store: Any, key: str, traced: Any, backend: Any) -> bool:
    """Publish a traced function; False when one was there already (publish once)."""
    return bool(store.publish(key, serialize(traced), {
        "kind": "dynamo", "torch": torch.__version__,
        "fingerprint": backend.key_context.fingerprint_id,
        "published_at": time.time()}))  # `vcr gc --older-than-days`


def _restore_or_trace(compiled: Any, store: Any, key: str, args: Sequence[Any],
                      kwargs: Mapping[str, Any], later: int | None = None) -> str:
    """Give `compiled` its function for the call (`traced`, or `later[size]`): restored from
    `store`, else traced and published."""
    from ..planning.plan import raise_traced_error

    model, backend = compiled.model, compiled.backend

    def keep(fn: Any) -> None:
        if later is None:
            compiled.traced = fn
        else:
            compiled.later[later] = fn

    if store.contains(key):
        try:
            with dynamo.capture_settings(), torch.no_grad():
                keep(restore(store.fetch(key).payload, model, backend))
            return "restored"
        except Exception as exc:  # noqa: BLE001  (a VcrError from the backend is re-raised)
            if _ours(exc) is not None:
                raise _ours(exc) from None
            logger.warning("restoring the traced model %s failed, tracing it: %s: %s", key[:12],
                           type(exc).__name__, str(exc)[:300])
    try:
        with dynamo.capture_settings(), torch.no_grad():
            keep(trace(model, backend, args, kwargs))
    except Exception as exc:  # noqa: BLE001
        if dynamo.is_unsupported(exc) or dynamo.specialized(exc):
            raise_traced_error(exc)
            raise
        if _ours(exc) is not None:
            raise _ours(exc) from None
        logger.warning("AOT compile of the model failed, tracing it with dynamo: %s: %s",
                       type(exc).__name__, str(exc)[:300])
        return f"off: {type(exc).__name__}"
    if backend.config.on_miss == "compile":  # local only: this policy publishes nothing
        return "traced"
    try:
        _publish(store, key, compiled.traced if later is None else compiled.later[later],
                 backend)
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


def fake_group(size: int, rank: int = 0) -> bool:
    """A default process group of `size` ranks that communicates nothing (torch's "fake"
    backend), this process its `rank`: the model traces as a rank of its TP group does (the
    group's size is in the key: `dynamo_key`). False where torch has none."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    try:
        dist.init_process_group("fake", rank=rank, world_size=size)
    except (ValueError, RuntimeError, ImportError) as exc:
        logger.warning("no fake process group of %d ranks (%s: %s): the ranks trace", size,
                       type(exc).__name__, exc)
        return False
    return True
