"""The library calls behind the CLI and the jobs: `compile`, `plan_model`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..cache import signing
from ..cache.store import ArtifactStore
from ..compiling.compiler_interface import CompilerInterface, make_compiler
from ..compiling.counters import CompilationCounter
from ..compiling.monitor import PerformanceMonitor
from ..compiling.passes import PostGradPassManager
from ..config import CacheConfig, CompilationConfig
from ..errors import VcrError
from ..keys import KeyContext
from ..planning.hf import maybe_prepare
from ..planning.inputs import ExampleInputs, example_call, mark_dynamic
from ..planning.plan import Plan, capture_calls, plan_graphs, raise_traced_error
from ..torch_private import aot_compile, dynamo, inductor
from .backend import VcrBackend
from .manager import CompilerManager

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "vllm_compile_ray", "cache")


def open_store(config: CompilationConfig | CacheConfig) -> ArtifactStore:
    """The store of a cache config (or of a compilation's: `CompilationConfig.cache`), with its
    signing key loaded (from a file or the environment: here, at the edge; the store then
    carries the key to Ray tasks)."""
    cache = config.cache if isinstance(config, CompilationConfig) else config
    signer, verifier = signing.from_config(cache)
    return ArtifactStore(cache.cache_dir or DEFAULT_CACHE_DIR, cache.storage_options,
                         staging_dir=cache.staging_dir or None, timeout_s=cache.store_timeout_s,
                         signer=signer, verifier=verifier)


def key_context(config: CompilationConfig, compiler: CompilerInterface, device_type: str,
                fingerprint: dict[str, str] | None = None,
                pass_manager: PostGradPassManager | None = None) -> KeyContext:
    """fingerprint: the target's environment fingerprint; computed here when None (a driver
    planning for GPUs it does not have asks a GPU node for it)."""
    fp = fingerprint if fingerprint is not None else inductor.environment_fingerprint(device_type)
    uuids = pass_manager.uuids() if pass_manager else []
    return KeyContext(config, compiler.compute_hash(config), fp, uuids)


def model_device(model: torch.nn.Module) -> str:
    """Where the model's weights are ("cuda:1", "cpu", ...; "cpu" for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return str(tensor.device)
    return "cpu"


def model_device_type(model: torch.nn.Module) -> str:
    return torch.device(model_device(model)).type


class CompiledModel:
    """A model compiled piecewise through the artifact cache. Call it like the model."""

    def __init__(self, model: torch.nn.Module, backend: VcrBackend):
        self.model = model
        self.backend = backend
        self._compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
        self.traced: Any = None  # `aot` function restored or traced by load(); else dynamo
        self.traced_state: tuple = ()  # `dynamo.global_state()` it was traced under
        self.traced_store: Any = None  # where `traced` came from or went
        self.later: dict[int, Any] = {}  # size -> `aot` function of a call outside its guards
        self.later_how: dict[int, str] = {}  # size -> "restored", "traced+published", ...
        self._guard_misses = 0  # calls outside the traced function's guards (traced by dynamo)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Inputs as the trace saw them: a slice of a wider tensor (`ids[:, -1:]` of a decode
        # step) has other strides, which the traced function's guards refuse (a new trace).
        args = tuple(_dense(a) for a in args)
        kwargs = {k: _dense(v) for k, v in kwargs.items()}
        missed = ""
        if self.traced is not None:
            # Outside the traced function's guards or global state, the call goes through
            # dynamo (its own cache keeps what it traced); the traced function stays for the
            # calls within (a warm-up at 1 token that a transformers model's guards exclude
            # must not cost every later call a trace).
            same_state = dynamo.global_state() == self.traced_state
            if not same_state:
                missed = ("the global state (autocast, default dtype, matmul precision, "
                          "deterministic algorithms) is not the traced function's")
            elif self.later and aot_compile.accepts(self.traced, self.model, *args,
                                                      **kwargs) is False:
                # A size that has a function of its own (DeepSeek-V3's decode at 1 token): a
                # plain guard check, not the failed call's verbose reason and exception
                missed = "outside the traced function's guards"
            else:
                try:
                    with torch.no_grad():
                        return self.traced(self.model, *args, **kwargs)
                except RuntimeError as exc:
                    if not aot_compile.is_guard_failure(exc):
                        raise
                    missed = " ".join(str(exc).split())
            if same_state:  # outside the guards
                done, out = self._call_later(args, kwargs)
                if done:
                    return out
        self.backend.call_size = mark_dynamic(self.model, args, kwargs,
                                              self.backend.config.dynamic_dims)
        if missed:
            self._guard_miss(self.backend.call_size, missed)
        try:
            with dynamo.capture_settings(), torch.no_grad():
                return self._compiled(*args, **kwargs)
        except Exception as exc:
            inner = dynamo.backend_failure_cause(exc)
            if isinstance(inner, VcrError):  # dynamo wraps our errors; hand back the clear one
                raise inner.with_traceback(None) from None
            if dynamo.is_unsupported(exc) or dynamo.specialized(exc):
                raise_traced_error(exc)
            raise

    def _call_later(self, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """A call at a static compile size outside the traced function's guards: through the
        function `aot.later` restored or traced for that size (a warm-up at 1 token that
        DeepSeek-V3's and Qwen3-Next's guards exclude; its graph is keyed for that size alone).
        (False, None) at any other size, when there is none, or when its guards refuse the
        call too: dynamo traces it (and its cache keeps what it traced for other sizes)."""
        from . import aot

        size = mark_dynamic(self.model, args, kwargs, self.backend.config.dynamic_dims)
        dynamo.unmark((*args, *kwargs.values()))  # a marked tensor fails guards (torch >= 2.13)
        if self.traced_store is None or size not in self.backend.config.compile_sizes:
            return False, None
        if size not in self.later and size not in self.later_how:
            self.backend.call_size = size
            self.later_how[size] = aot.later(self, args, kwargs, size)
        fn = self.later.get(size)
        if fn is None:
            return False, None
        try:
            with torch.no_grad():
                return True, fn(self.model, *args, **kwargs)
        except RuntimeError as exc:
            if not aot_compile.is_guard_failure(exc):
                raise
            return False, None

    def _guard_miss(self, tokens: int | None, why: str) -> None:
        """Logged once: a size outside the traced graph's guards (DeepSeek-V3 and Qwen3-Next
        exclude 1 token) gets a graph of its own, which the warm plans too (`plan_sizes`)."""
        self._guard_misses += 1
        if self._guard_misses == 1:
            logger.warning("a call at %s tokens is outside the traced function's guards: dynamo "
                           "traces it (a graph the warm plans too for a compile size): %s",
                           tokens, why[:400])

    @property
    def counter(self) -> CompilationCounter:
        return self.backend.manager.counter

    @property
    def monitor(self) -> PerformanceMonitor:
        return self.backend.manager.monitor

    @property
    def plan(self) -> Plan | None:
        return self.backend.plans[-1] if self.backend.plans else None


def _dense(value: Any) -> Any:
    """A tensor input made contiguous (a copy only when it is not already)."""
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def compile(model: torch.nn.Module, config: CompilationConfig | None = None, *,
            store: ArtifactStore | None = None, counter: CompilationCounter | None = None,
            monitor: PerformanceMonitor | None = None,
            pass_manager: PostGradPassManager | None = None,
            model_name: str = "<model>") -> CompiledModel:
    """Compile `model` piecewise: the first call traces, then loads or compiles every unique
    (piece, shape) through the cache at `config.cache`. num_tokens is dynamic (`inputs`
    says which dims carry it). A transformers model is switched to vcr attention (`hf.prepare`)."""
    config = config or CompilationConfig()
    model = maybe_prepare(model)
    device_type = model_device_type(model)
    if device_type == "meta":
        raise ValueError("compile() needs a model with weights; use plan_model() for a meta model")
    compiler = make_compiler(config, pass_manager)
    context = key_context(config, compiler, device_type, pass_manager=pass_manager)
    store = store if store is not None else open_store(config)
    if not config.disable_compile_cache:  # fail here, clearly, not at the first forward
        store.check_access(write=config.on_miss == "compile_and_publish")
    # The manager compiles for and loads onto the model's own device (cuda:i included).
    manager = CompilerManager(config, compiler, store, model_device(model),
                              context.fingerprint_id, counter, monitor)
    backend = VcrBackend(config, manager, context, device_type, model_name)
    return CompiledModel(model, backend)


def example_args(num_tokens: int = 8, device: str = "meta") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, positions) for a flat-token model."""
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    return ids, torch.arange(num_tokens, device=device)


PLAN_TOKENS = 8  # the token count a plan traces at (and a rank: `trace_size`); not 1, where
# dynamo specializes what broadcasts over the token dim


def plan_model(model: torch.nn.Module, config: CompilationConfig, *, device_type: str = "cuda",
               fingerprint: dict[str, str] | None = None, args: Sequence[Any] | None = None,
               example_inputs: ExampleInputs | None = None,
               pass_manager: PostGradPassManager | None = None) -> Plan:
    """Plan without compiling: capture (a meta model works), split, canonicalize, key for
    `device_type`. Keys equal those `compile()` computes on a device of that fingerprint.
    example_inputs(num_tokens, device) makes the call (default `inputs.default_example_inputs`);
    `args` is a fixed positional call."""
    model = maybe_prepare(model)
    compiler = make_compiler(config, pass_manager)
    context = key_context(config, compiler, device_type, fingerprint, pass_manager)
    if args is not None:
        calls = [(tuple(args), {})]
    else:
        calls = [example_call(model, example_inputs, n, model_device(model))
                 for n in plan_sizes(config)]
    return plan_graphs(capture_calls(model, calls, config.dynamic_dims), config, context,
                       device_type)


def plan_sizes(config: CompilationConfig) -> list[int]:
    """The token counts a plan calls the model at, as a rank does: where it traces
    (`trace_size`), then each static compile size (its warm-up). A size outside the guards of
    what the calls before traced traces another graph (DeepSeek-V3 and Qwen3-Next exclude 1
    token): the plan has its pieces too."""
    first = trace_size(config)
    return [first, *(n for n in config.compile_sizes if n != first)]


def trace_size(config: CompilationConfig) -> int:
    """The token count of the call a rank traces (or restores) at; its traced model's key has
    it, so `vcr warm`'s traced-model task calls at the same size. The size the warm plans at
    (PLAN_TOKENS) when an artifact takes it, else the static size past 1 nearest to it: at 1
    token dynamo specializes what broadcasts over the token dim (DeepSeek-V3's experts traced
    `arange(2)` for `arange(2 * tokens)`), and model code may branch on the size."""
    sizes = config.compile_sizes
    if config.compile_dynamic or PLAN_TOKENS in sizes or not sizes:
        return PLAN_TOKENS
    past_one = [s for s in sizes if s > 1] or list(sizes)
    return min(past_one, key=lambda s: (abs(s - PLAN_TOKENS), s))

