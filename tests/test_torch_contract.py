"""Contract test of every private torch / Inductor / dynamo name the package relies on (issue 25).

One row per touch: the torch name (`module:attr.attr`), the code in `vllm_compile_ray.torch_private`
that uses it (`module.function`; a subpackage path names code outside it), and a check that it
still takes what we pass it (`inspect.signature(...).bind`), still has the fields we read, or
still behaves the way we rely on. A torch upgrade that moves one fails here, naming it and its
user, instead of deep inside a compile. CPU-only, no compiles (a few seconds of imports).

Names only some torch versions have carry the package's own gate
(`torch_private.aot_compile.SUPPORTED`, `torch_private.inductor.COORDINATE_DESCENT_SHIPS`,
`torch_private.artifact_format.save_options()`): when one is missing the test asserts the gate
is False, so the package switches the feature off rather than calling it. Checked on torch 2.13
(CPU).

`test_private_names_stay_in_torch_private` keeps the rest of the package off torch's private
names: only `torch_private/` may touch them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

Check = Callable[[Any], None]  # raises AssertionError (with a detail) when the contract broke


@dataclass(frozen=True)
class Touch:
    target: str  # "torch.module.path:Attr.attr" (no ":": the module itself)
    users: str  # the package code that relies on it, and how
    check: Check | None = None  # None: existing is the whole contract
    gate: str | None = None  # "aot.SUPPORTED": a vllm_compile_ray module's flag for the feature
    aspect: str = ""  # told apart in the test id when one target has two rows


# ---- checks ---------------------------------------------------------------------------------

def call(*args: Any, **kwargs: Any) -> Check:
    """The callable accepts these arguments (as the package passes them; values are stand-ins;
    an unbound method's first is self)."""
    def check(obj: Any) -> None:
        try:
            inspect.signature(obj).bind(*args, **kwargs)
        except TypeError as exc:
            shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise AssertionError(f"signature {inspect.signature(obj)} no longer accepts "
                                 f"({shown}): {exc}") from None
    return check


def has(*names: str) -> Check:
    def check(obj: Any) -> None:
        missing = [n for n in names if not hasattr(obj, n)]
        assert not missing, f"has no {missing}"
    return check


def fields(*names: str) -> Check:
    def check(obj: Any) -> None:
        assert dataclasses.is_dataclass(obj), f"{obj} is no longer a dataclass"
        missing = set(names) - {f.name for f in dataclasses.fields(obj)}
        assert not missing, f"dataclass fields {sorted(missing)} are gone"
    return check


def literal(*values: str) -> Check:
    def check(obj: Any) -> None:
        missing = [v for v in values if v not in typing.get_args(obj)]
        assert not missing, f"{obj} no longer allows {missing}"
    return check


def annotation_allows(param: str, value: str) -> Check:
    def check(obj: Any) -> None:
        annotation = str(inspect.signature(obj).parameters[param].annotation)
        assert repr(value) in annotation, f"{param}: {annotation} no longer allows {value!r}"
    return check


def source_has(*texts: str) -> Check:
    """The module's source (read, not imported) still has these strings: names of timers,
    counters and log messages the package matches."""
    def check(module: Any) -> None:
        path = inspect.getsourcefile(module)
        with open(path, encoding="utf-8") as f:
            source = f.read()
        missing = [t for t in texts if t not in source]
        assert not missing, f"{path} no longer has {missing}"
    return check


def _no_path_valued_config(save_config_portable: Any) -> None:
    """What the fingerprint hashes of Inductor's config names no directory of this machine (the
    working directory, where torch is installed): two nodes must key a piece alike."""
    import os

    here = {os.getcwd(), os.path.dirname(os.path.dirname(torch.__file__))}
    found = [k for k, v in save_config_portable(ignore_private_configs=False).items()
             if isinstance(v, str) and any(v.startswith(d) for d in here)]
    assert not found, f"path-valued config in the fingerprint: {found}"


def _leaves_out(*names: str) -> Check:
    def check(save_config_portable: Any) -> None:
        kept = [n for n in names if n in save_config_portable(ignore_private_configs=False)]
        assert not kept, f"{kept} now in the portable config: the fingerprint would follow them"
    return check


def _assert(ok: bool, detail: str) -> None:
    assert ok, detail


def _is_bytes(obj: Any) -> None:
    assert isinstance(obj, bytes), f"{obj!r} is no longer bytes"


def both(*checks: Check) -> Check:
    def check(obj: Any) -> None:
        for c in checks:
            c(obj)
    return check


# ---- behaviour checks (cheap: no compile) ---------------------------------------------------

def _retarget_chunks_round_trip(_: Any) -> None:
    from vllm_compile_ray.torch_private import retarget

    assert retarget._read_chunks(retarget._write_chunks([b"a", b"", b"bc"])) == [b"a", b"", b"bc"]


def _retarget_caches_round_trip(factory: Any) -> None:
    from vllm_compile_ray.torch_private import retarget

    artifact = factory.create("autotune", "ab/cdef.best_config", b"{}")
    # retarget rebuilds entries as type(a)(key, content)
    assert type(artifact)(artifact.key, artifact.content).key == artifact.key
    caches = retarget._read_caches(retarget._write_caches({"autotune": [artifact]}))
    assert [(a.key, a.content) for a in caches["autotune"]] == [(artifact.key, artifact.content)]


def _autotune_key_shape(_: Any) -> None:
    from vllm_compile_ray.torch_private import retarget

    key = retarget.autotune_key("def triton_poi_fused_0(): pass")
    assert re.fullmatch(r"\w\w/\w+\.best_config", key), f"autotune key {key!r}"


def _cache_dir_follows_env(cache_dir: Any) -> None:
    from vllm_compile_ray.torch_private import retarget

    with retarget.cache_dir_for(3):
        inside = cache_dir()
    assert inside.endswith("vcr-cuda3"), \
        f"cache_dir() ignores TORCHINDUCTOR_CACHE_DIR ({inside!r})"


def _category_names(*names: str) -> Check:
    def check(registry: Any) -> None:
        import torch._inductor.codecache  # noqa: F401  (registers "inductor")
        missing = [n for n in names if n not in registry._artifact_types]
        assert not missing, f"no cache artifact type {missing}"
    return check


def _mark_dynamic_attributes(mark_dynamic: Any) -> None:
    from vllm_compile_ray.torch_private import dynamo

    t = torch.zeros(4, 3)
    mark_dynamic(t, 0)
    assert dynamo.marked_dims([t], {}) == [(0, 0)], "mark_dynamic sets no _dynamo_dynamic_indices"
    dynamo.unmark([t])
    assert not [n for n in vars(t) if n.startswith("_dynamo_")]


def _op_names(_: Any) -> None:
    from vllm_compile_ray.torch_private import ops

    assert ops.is_op(torch.ops.aten.add.Tensor) and ops.is_op(torch.ops.aten.add)
    assert ops.op_name(torch.ops.aten.add.Tensor) == "aten::add"  # OpOverload._schema.name
    assert ops.op_name(torch.ops.aten.add) == "aten::add"  # OpOverloadPacket._qualified_op_name
    assert ops.qualname_and_overload(torch.ops.aten.add.Tensor) == ("aten::add", "Tensor")
    assert ops.qualname_and_overload(torch.ops.aten.add) == ("aten::add", None)


def _opdef_module(opdefs: Any) -> None:
    from vllm_compile_ray.planning.canonical import _OpRef
    from vllm_compile_ray.models import ops

    ref = _OpRef(torch.ops.vcr.attention.default)
    assert (ref.qualname, ref.overload) == (ops.ATTENTION_OP, "default")
    assert ref.module == ops.__name__, \
        f"OPDEFS[{ops.ATTENTION_OP!r}]._init_fn.__module__ is {ref.module!r}"


def _inner_exception(cls: Any) -> None:
    inner = ValueError("ours")
    assert cls(None, inner, None).inner_exception is inner


def _var_to_range(shape_env_cls: Any) -> None:
    assert hasattr(shape_env_cls().var_to_range, "get"), "ShapeEnv().var_to_range is no mapping"


def _timings_by_name(metrics: Any) -> None:
    assert isinstance(metrics, dict), f"{type(metrics)} is no dict of name -> [seconds]"


def _inductor_counter(counters: Any) -> None:
    assert isinstance(counters["inductor"]["select_algorithm_autotune"], int)


def _logger_name(module: Any) -> None:
    from vllm_compile_ray.torch_private.inductor_metrics import AUTOTUNE_FAILURE_LOGGER

    assert module.log.name == AUTOTUNE_FAILURE_LOGGER, f"its logger is {module.log.name!r}"


def _cache_info(fn: Any) -> None:
    assert fn.cache_info().misses >= 0, "no longer a functools.cache"


def _abstract_within(*ours: str) -> Check:
    def check(cls: Any) -> None:
        extra = set(getattr(cls, "__abstractmethods__", ())) - set(ours)
        assert not extra, f"new abstract methods {sorted(extra)} we do not implement"
    return check


def _aot_compile_method(compile_fn: Any) -> None:
    """As aot_compile.trace makes it: torch 2.11 adds .aot_compile only under this flag."""
    with torch._dynamo.config.patch(enable_aot_compile=True):
        compiled = compile_fn(lambda x: x + 1, fullgraph=True, dynamic=False, backend="eager")
    assert hasattr(compiled, "aot_compile"), "torch.compile(fn) has no .aot_compile"
    call(((), {}))(compiled.aot_compile)


def _dynamic_shapes_allow(*values: str) -> Check:
    """standalone_compile's dynamic_shapes takes these values: the Literal in its signature
    (torch 2.11), or the `DynamicShapesType` alias that signature names (2.13)."""
    def check(fn: Any) -> None:
        annotation = str(inspect.signature(fn).parameters["dynamic_shapes"].annotation)
        if "DynamicShapesType" in annotation:
            module = importlib.import_module("torch._inductor.standalone_compile")
            literal(*values)(module.DynamicShapesType)
            return
        missing = [v for v in values if repr(v) not in annotation and f'"{v}"' not in annotation]
        assert not missing, f"dynamic_shapes: {annotation} no longer allows {missing}"
    return check


def _triton_gate() -> bool:
    """inductor_metrics._triton_compiles' gate: Triton >= 3.4 has the compile listener."""
    try:
        import triton
    except ImportError:
        return False
    return tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) >= (3, 4)


def _returns_bool(fn: Any) -> None:
    """A builtin without a signature: called with no argument, it still answers a bool."""
    assert isinstance(fn(), bool), f"{fn}() no longer returns a bool"


# ---- the table ------------------------------------------------------------------------------

IC = "torch._inductor.config"
S = "stand-in"
AOT = "torch_private.aot_compile.SUPPORTED"  # the gates (vllm_compile_ray.<module>.<flag>)
BUNDLED = "torch_private.artifact_format.save_options"

TOUCHES: list[Touch] = [
    # inductor.py: compiles, artifacts, tuning
    Touch("torch._inductor:standalone_compile",
          "inductor.compile_static / compile_dynamic",
          call(S, S, dynamic_shapes="from_example_inputs", options={})),
    Touch("torch._inductor:standalone_compile",
          "inductor.compile_static / compile_dynamic (the bundled AOT artifact)",
          call(S, S, dynamic_shapes="from_example_inputs", options={}, aot=True),
          gate=BUNDLED, aspect="aot"),
    Touch("torch._inductor:standalone_compile",
          "inductor.compile_static / compile_dynamic (dynamic_shapes values)",
          _dynamic_shapes_allow("from_example_inputs", "from_tracing_context"),
          aspect="dynamic_shapes"),
    Touch("torch._inductor.standalone_compile:CompiledArtifact.load",
          "artifact_format._load_through_file (the cache format)",
          both(call(path=S, format="binary"), annotation_allows("format", "binary"))),
    Touch("torch._inductor.standalone_compile:CompiledArtifact.save",
          "inductor._artifact_bytes", call(S, path=S, format="binary")),
    Touch("torch._inductor.utils:fresh_cache",
          "inductor.warm_device / tune_once / check_complete",
          call()),
    Touch("torch.compiler._cache:CacheArtifactManager.with_fresh_cache", "inductor.tune_once",
          call()),
    Touch("torch.compiler:save_cache_artifacts", "inductor.tune_once", call()),
    Touch("torch.compiler:load_cache_artifacts", "inductor.load_tuning", call(S)),
    Touch("torch.compiler._cache:CacheInfo", "inductor.tune_once / load_tuning (count)",
          has("autotune_artifacts")),
    Touch("torch._inductor.codecache:torch_key",
          "inductor.torch_fingerprint / artifact_format.load (the build an artifact names)",
          both(call(), lambda torch_key: _is_bytes(torch_key()))),
    Touch(f"{IC}:save_config_portable", "inductor.torch_fingerprint (no absolute paths)",
          both(call(ignore_private_configs=False), _no_path_valued_config)),
    Touch("torch._functorch.config:save_config_portable", "inductor.torch_fingerprint",
          call(ignore_private_configs=False)),
    Touch("torch._functorch.config:error_on_custom_op_aliasing",
          "inductor._UNHASHED_FUNCTORCH_CONFIG (left out of the fingerprint)"),
    Touch("torch._inductor.cpp_builder:get_compiler_version_info", "inductor.device_fingerprint",
          call(S)),
    Touch("torch._inductor.cpp_builder:get_cpp_compiler", "inductor.device_fingerprint", call()),
    Touch("torch._inductor.cpu_vec_isa:pick_vec_isa", "inductor.device_fingerprint", call()),
    Touch("torch._inductor.async_compile:AsyncCompile.warm_pool",
          "inductor.warm_compile_pool (getattr: missing would make it a silent no-op)", call()),
    Touch("torch._subclasses.fake_tensor:FakeTensorMode",
          "inductor.compile_static / _symbolic_inputs", call(shape_env=S)),
    Touch("torch._subclasses.fake_tensor:FakeTensorMode.from_tensor", "inductor.compile_static",
          call(S, S)),
    Touch("torch.fx.passes.fake_tensor_prop:FakeTensorProp",
          "inductor._fake_propagate, aot_compile.TracedModel.deserialize_compile_artifacts",
          call(S, S)),
    Touch("torch.fx.passes.fake_tensor_prop:FakeTensorProp.propagate_dont_convert_inputs",
          "inductor._fake_propagate, aot_compile.TracedModel.deserialize_compile_artifacts",
          call(S, S, S)),
    Touch("torch._dynamo.source:ConstantSource", "inductor._symbolic_inputs", call("vcr_s0")),
    Touch("torch.fx.experimental.symbolic_shapes:DimDynamic.DYNAMIC",
          "inductor._symbolic_inputs"),
    Touch("torch.fx.experimental.symbolic_shapes:ShapeEnv.create_symbol",
          "inductor._symbolic_inputs", call(S, 8, source=S, dynamic_dim=S)),
    Touch("torch.fx.experimental.symbolic_shapes:ShapeEnv.create_symintnode",
          "inductor._symbolic_inputs", call(S, S, hint=None)),
    Touch("torch.fx.experimental.symbolic_shapes:ShapeEnv",
          "inductor.compile_dynamic (reads shape_env.var_to_range for the guard range)",
          _var_to_range),
    Touch("torch._guards:TracingContext", "inductor.compile_dynamic", call(S)),
    Touch("torch._guards:tracing", "inductor.compile_dynamic", call(S)),
    # Inductor config names the package reads, sets or patches
    Touch(f"{IC}:compile_threads",
          "inductor.set_compile_threads, inductor_metrics.kernel_work (patch), fingerprint"),
    Touch(f"{IC}:save_config_portable",
          "inductor.torch_fingerprint (compile threads and worker start left out)",
          _leaves_out("compile_threads", "worker_start_method"), aspect="unhashed"),
    Touch(f"{IC}:autotune_num_choices_displayed",
          "inductor.quiet_autotune_logs (hasattr: missing would make it a silent no-op)"),
    Touch(f"{IC}:max_autotune_report_choices_stats",
          "inductor.quiet_autotune_logs (hasattr: missing would make it a silent no-op)"),
    Touch(f"{IC}:autotune_local_cache", "retarget"),
    Touch(f"{IC}:max_autotune", "cli.options.make_config --max-autotune (inductor_compile_config)"),
    Touch(f"{IC}:coordinate_descent_tuning",
          "cli.options.make_config --max-autotune, compiling.compiler_interface (config_patches)",
          gate="torch_private.inductor.COORDINATE_DESCENT_SHIPS"),
    Touch(f"{IC}:post_grad_custom_post_pass",
          "compiling.compiler_interface.InductorStandaloneAdaptor (config_patches)"),
    Touch(f"{IC}:patch", "inductor_metrics.kernel_work", call(compile_threads=1)),
    Touch("torch._inductor.custom_graph_pass:CustomGraphPass",
          "graph_pass.CustomGraphPass (compiling.passes.InductorPass / PostGradPassManager "
          "subclass it: __call__ and uuid)",
          _abstract_within("__call__", "uuid")),
    # inductor_metrics.py: timers, counters, logs
    Touch("torch._dynamo.utils:compilation_time_metrics",
          "inductor_metrics.phase_times / kernel_work", _timings_by_name),
    Touch("torch._inductor.select_algorithm", "inductor_metrics.AUTOTUNE_FAILURE_LOGGER",
          _logger_name),
    Touch("torch._inductor.select_algorithm",
          "inductor_metrics.AUTOTUNE_FAILURE_MSG, _GEMM_AUTOTUNE_TIMER_SUFFIX; "
          "inductor_metrics.gemm_benchmarks (counter)",
          source_has("Exception %s for benchmark choice %s", "_template_autotuning",
                     "select_algorithm_autotune"), aspect="strings"),
    Touch("torch._inductor.runtime.triton_heuristics", "inductor_metrics._AUTOTUNE_TIMERS",
          source_has("CachingAutotuner.benchmark_all_configs",
                     "CachingAutotuner.coordinate_descent_tuning")),
    Touch("torch._inductor.cpp_builder", "inductor_metrics._KERNEL_BUILD_TIMERS",
          source_has('"compile_file"')),
    Touch("torch._inductor.codecache:_precompile_header",
          "inductor_metrics._header_preprocessings (getattr: missing would miscount)",
          _cache_info),
    Touch("triton.knobs:compilation.listener",
          "inductor_metrics._triton_compiles (Triton compiles of kernel_work)",
          gate="triton>=3.4"),
    # compile_task.py: imports paid before the first compile
    Touch("torch._inductor.compile_fx", "inductor.import_compiler (import warm-up)"),
    Touch("torch._dynamo.utils:counters", "inductor_metrics.gemm_benchmarks", _inductor_counter),
    # retarget.py: the standalone binary format and Inductor's caches inside it
    Touch("torch._inductor.codecache:get_hash", "retarget.retarget / autotune_key", call(S)),
    Touch("torch._inductor.codecache:get_path", "retarget.autotune_key", call(S, "py")),
    Touch("torch._inductor.runtime.autotune_cache:AutotuneCache.create", "retarget.autotune_key",
          both(call({"autotune_local_cache": True}, S, ""), _autotune_key_shape)),
    Touch("torch._inductor.output_code:CompiledFxGraph",
          "retarget.retarget (rewritten in place); artifact_format.cuda_indices (device_idxs)",
          fields("source_code", "cache_key", "device_idxs", "_triton_bundle")),
    Touch("torch.utils._triton:triton_hash_with_backend",
          "triton_key.start (computed early; cached per process)",
          both(call(), lambda fn: _cache_info(fn))),
    Touch("torch.utils._triton:has_triton", "triton_key.start", call()),
    Touch("torch._inductor.runtime.autotune_cache:inductor_meta_from_config",
          "triton_key (where Inductor asks for the hash a loader warms)",
          source_has("triton_hash_with_backend")),
    Touch("torch._inductor.triton_bundler:TritonBundle", "retarget.retarget; bundle_prune.prune",
          fields("kernel_artifacts", "static_autotuners")),
    Touch("torch._inductor.triton_bundler:TritonKernelArtifacts",
          "retarget.retarget; bundle_prune.prune (a group's files)", fields("device", "artifacts")),
    Touch("torch._inductor.triton_bundler:TritonKernelArtifact", "bundle_prune._names",
          fields("filename", "payload")),
    Touch("torch._inductor.utils:GPU_KERNEL_BIN_EXTS", "bundle_prune._loaded_extensions",
          lambda exts: _assert(exts.get("cuda") == ".cubin", f"{exts}")),
    Touch("torch.utils._appending_byte_serializer:BytesWriter",
          "retarget._write_chunks, bundle_prune._repickled / artifact_format.fields (reads what "
          "it writes)",
          both(has("write_bytes", "to_bytes"), _retarget_chunks_round_trip)),
    Touch("torch.utils._appending_byte_serializer:AppendingByteSerializer",
          "retarget._write_caches", both(call(serialize_fn=S), has("extend", "to_bytes"))),
    Touch("torch.compiler._cache:CacheArtifactManager.deserialize", "retarget._read_caches",
          call(S)),
    Touch("torch.compiler._cache:_serialize_single_cache", "retarget._write_caches", call(S, S)),
    Touch("torch.compiler._cache:CacheArtifactFactory",
          "retarget.retarget (cache types 'inductor', 'autotune'; entries type(a)(key, content))",
          both(_category_names("inductor", "autotune"), _retarget_caches_round_trip)),
    Touch("torch._inductor.standalone_compile:AOTCompiledArtifact.AOT_HEADER",
          "retarget.retarget (tells the bundled AOT format apart)",
          _is_bytes,
          gate=BUNDLED),
    Touch("torch._functorch._aot_autograd.aot_autograd_result:GenericAOTAutogradResult",
          "retarget._retarget_bundled (the pickled entry's graphs)",
          fields("compiled_fw", "compiled_bw"), gate=BUNDLED),
    Touch("torch._functorch._aot_autograd.aot_autograd_result:BundledOutputCodeLoadable",
          "retarget._retarget_bundled (`.result`: the CompiledFxGraph)", fields("result"),
          gate=BUNDLED),
    Touch("torch._functorch.config:bundled_autograd_cache",
          "retarget._retarget_bundled (patched while pickling, as torch pickles the entry)",
          gate=BUNDLED),
    # artifact_format.py: the bundled AOT artifact loaded in memory
    Touch("torch._functorch._aot_autograd.aot_autograd_result:BundledAOTAutogradResult",
          "artifact_format.load_unpickled (the pickled entry)",
          fields("guards_expr", "sanitized_aot_config"),
          gate=BUNDLED),
    Touch("torch._functorch._aot_autograd.aot_autograd_result:"
          "GenericAOTAutogradResult.wrap_post_compile", "artifact_format.load_unpickled",
          call(S, [], S, {}), gate=BUNDLED),
    Touch("torch._inductor.standalone_compile:AOTCompiledArtifact.deserialize",
          "artifact_format.load_unpickled (entries with user Triton kernels)", call(S),
          gate=BUNDLED),
    Touch("torch._guards:TracingContext.try_get", "artifact_format.load_unpickled", call()),
    Touch("torch._inductor.cudagraph_utils:BoxedDeviceIndex", "artifact_format.load_unpickled",
          call(None)),
    Touch("torch._inductor.utils:BoxedBool", "artifact_format.load_unpickled", call(False)),
    Touch(f"{IC}:triton.cudagraphs", "artifact_format.load_unpickled"),
    Touch("torch._inductor.runtime.cache_dir_utils:cache_dir",
          "retarget.cache_dir_for (reads TORCHINDUCTOR_CACHE_DIR at each call)",
          both(call(), _cache_dir_follows_env)),
    # aot_compile.py: dynamo's AOT compile (gated by aot_compile.SUPPORTED)
    Touch("torch._dynamo.aot_compile_types:SerializableCallable",
          "aot_compile.TracedModel (subclass)",
          _abstract_within("__call__", "serialize_compile_artifacts",
                           "deserialize_compile_artifacts"),
          gate=AOT),
    Touch("torch._dynamo.config:enable_aot_compile", "aot_compile.trace (patch)", gate=AOT),
    Touch("torch:compile", "aot_compile.trace (torch.compile(...).aot_compile((args, kwargs)))",
          _aot_compile_method, gate=AOT),
    Touch("torch._dynamo.aot_compile:AOTCompiledFunction.serialize", "aot_compile.serialize",
          call(S), gate=AOT),
    Touch("torch._dynamo.aot_compile:AOTCompiledFunction.guard_check",
          "aot_compile.accepts (fn.guard_check(model, *args, **kwargs), read with getattr)",
          call(S), gate=AOT),
    Touch("torch._dynamo.aot_compile:AOTCompileSaveResult", "aot_compile.serialize",
          fields("serialized_data"), gate=AOT),
    Touch("torch._dynamo.aot_compile:AOTCompiledFunction",
          "aot_compile._save_installed_globals (fn._artifacts; fn.fn.__globals__, the function "
          "it builds)",
          both(fields("_artifacts"), source_has("self.fn = self._artifacts.runtime_env")),
          gate=AOT),
    Touch("torch._dynamo.aot_compile:CompileArtifacts", "aot_compile._save_installed_globals",
          fields("runtime_env", "backend_id"), gate=AOT),
    Touch("torch._dynamo.aot_compile:GraphRuntimeEnv",
          "aot_compile._save_installed_globals (external_refs read with getattr: optional)",
          fields("bytecode", "import_sources", "used_globals"), gate=AOT),
    Touch("torch._dynamo.convert_frame:GraphCaptureOutput.get_runtime_env",
          "aot_compile._with_builtins (wrapped while tracing; reads f_globals)", call(S),
          gate="torch_private.aot_compile.BUILTINS_OMITTED"),
    Touch("torch._dynamo.aot_compile:GraphRuntimeEnv", "aot_compile._with_builtins",
          fields("external_refs", "used_globals"),
          gate="torch_private.aot_compile.BUILTINS_OMITTED", aspect="builtins"),
    Touch("torch.compiler:load_compiled_function", "aot_compile.restore", call(S, f_globals={}),
          gate=AOT),
    Touch("torch.fx._graph_pickler:GraphPickler.dumps",
          "aot_compile.TracedModel.serialize_compile_artifacts", call(S, S), gate=AOT),
    Touch("torch.fx._graph_pickler:Options", "aot_compile.TracedModel.serialize_compile_artifacts",
          call(ops_filter=None), gate=AOT),
    Touch("torch.fx._graph_pickler:GraphPickler.loads",
          "aot_compile.TracedModel.deserialize_compile_artifacts", call(S, S), gate=AOT),
    Touch("torch._subclasses:FakeTensorMode",
          "aot_compile.TracedModel.deserialize_compile_artifacts",
          call(shape_env=S)),
    Touch("torch._subclasses.fake_tensor:FakeTensor._is_view", "aot_compile._unviewed"),
    Touch("torch.utils._pytree:tree_map_only", "aot_compile._unviewed, dynamo.shapes_only",
          call(S, S, S)),
    Touch("torch._subclasses.fake_tensor:FakeTensorMode", "dynamo.shapes_only",
          call(allow_non_fake_inputs=True), aspect="non_fake_inputs"),
    # dynamo: marking, settings, errors (inputs.py, plan.py, api.py, load.py, aot_compile.py)
    Touch("torch._C:_is_torch_function_enabled", "dynamo.global_state", _returns_bool),
    Touch("torch._C:_is_torch_function_all_disabled", "dynamo.global_state", _returns_bool),
    Touch("torch._dynamo:mark_dynamic",
          "dynamo.mark_dynamic; marked_dims / unmark read _dynamo_dynamic_indices",
          both(call(S, 0), _mark_dynamic_attributes)),
    Touch("torch._dynamo.config:recompile_limit", "dynamo.capture_settings (patch)"),
    Touch("torch._dynamo.config:accumulated_recompile_limit", "dynamo.capture_settings (patch)"),
    Touch("torch._dynamo.config:patch", "dynamo.capture_settings, aot_compile.trace",
          call(recompile_limit=1, accumulated_recompile_limit=1)),
    Touch("torch.fx.experimental._config:backed_size_oblivious", "dynamo.capture_settings (patch)"),
    Touch("torch.fx.experimental._config:patch", "dynamo.capture_settings",
          call(backed_size_oblivious=True)),
    Touch("torch._dynamo.exc:Unsupported",
          "dynamo.is_unsupported (plan.run_dynamo, api, aot), dynamo.model_code_error"),
    Touch("torch._dynamo.exc:TorchRuntimeError", "dynamo.model_code_error (plan.capture_calls)"),
    Touch("torch._dynamo.exc:BackendCompilerFailed",
          "dynamo.backend_failure_cause (api, load; reads .inner_exception)", _inner_exception),
    # canonical.py / splitting.py: op targets, graph modules
    Touch("torch._ops:OpOverload", "ops.is_op / op_name / qualname_and_overload "
          "(isinstance, ._schema.name, .overloadpacket, ._overloadname)", _op_names),
    Touch("torch._ops:OpOverloadPacket", "ops.is_op / op_name / "
          "qualname_and_overload (._qualified_op_name)", _op_names),
    Touch("torch._library.custom_ops:OPDEFS",
          "ops.defining_module (OPDEFS.get(name)._init_fn.__module__)",
          _opdef_module),
    Touch("torch.fx._lazy_graph_module:_use_lazy_graph_module",
          "graphs.lazy_graph_modules",
          call(True)),
    Touch("torch.fx._lazy_graph_module:_make_graph_module",
          "graphs.make_graph_module", call(S, S)),
    Touch("torch.fx.passes.split_module:split_module", "planning.splitting.split_graph (public)",
          call(S, None, S, keep_original_order=True)),
    Touch("torch.fx.experimental.symbolic_shapes:free_symbols", "graphs.free_symbols",
          call(S)),
    Touch("torch.amp:_enter_autocast", "graphs.GLOBAL_STATE_FUNCTIONS"),
    Touch("torch.amp:_exit_autocast", "graphs.GLOBAL_STATE_FUNCTIONS"),
    Touch("torch._C:_set_grad_enabled", "graphs.GLOBAL_STATE_FUNCTIONS"),
    Touch("torch._C._nn:linear", "ops.LINEAR (warm_plan._GEMM_FUNCTIONS)"),
]


def _resolve(target: str) -> Any:
    module_name, _, attrs = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in filter(None, attrs.split(".")):
        obj = getattr(obj, attr)
    return obj


def _gate(name: str) -> bool:
    if name == "triton>=3.4":
        return _triton_gate()
    module, attr = name.rsplit(".", 1)
    flag = getattr(importlib.import_module(f"vllm_compile_ray.{module}"), attr)
    return bool(flag() if callable(flag) else flag)


def _user(touch: Touch) -> str:
    """`users` as a module path: within torch_private unless it names another subpackage."""
    outside = touch.users.split(".", 1)[0] in ("cli", "compiling", "planning")
    return f"vllm_compile_ray.{'' if outside else 'torch_private.'}{touch.users}"


def _id(touch: Touch) -> str:
    return touch.target.replace(":", ".") + (f"[{touch.aspect}]" if touch.aspect else "")


@pytest.mark.parametrize("touch", TOUCHES, ids=[_id(t) for t in TOUCHES])
def test_torch_contract(touch: Touch) -> None:
    where = f"used by {_user(touch)}; torch {torch.__version__}"
    try:
        obj = _resolve(touch.target)
        if touch.check is not None:
            touch.check(obj)
        return
    except AssertionError as exc:
        broken = f"{touch.target} changed: {exc}"
    except (ImportError, AttributeError) as exc:
        broken = f"{touch.target} moved ({type(exc).__name__}: {exc})"
    # A name only some torch versions have: missing, the package's gate must switch it off.
    if touch.gate is None:
        pytest.fail(f"{broken}; {where}", pytrace=False)
    if _gate(touch.gate):
        pytest.fail(f"{broken}; the package's gate {touch.gate} is True, so it will use it; "
                    f"{where}", pytrace=False)


def test_users_exist() -> None:
    """Each row's first user (`module.name` up to the first space or comma) is still there: the
    table names the code a torch upgrade breaks."""
    stale = []
    for touch in TOUCHES:
        path = re.match(r"[\w.]+", _user(touch)).group().split(".")
        for cut in range(len(path), 0, -1):  # the longest importable module, then attributes
            try:
                obj: Any = importlib.import_module(".".join(path[:cut]))
            except ImportError:
                continue
            for attr in path[cut:]:
                obj = getattr(obj, attr, None)
            break
        if obj is None:
            stale.append(f"{_id(touch)}: {'.'.join(path)}")
    assert not stale, stale


def test_ids_are_distinct() -> None:
    """Each parametrized id names one contract (two rows of a target differ by `aspect`)."""
    ids = [_id(t) for t in TOUCHES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


# ---- nothing outside torch_private/ touches a private name ----------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_compile_ray"
# A private module or attribute under torch (`torch._inductor`, `torch.fx._lazy_graph_module`,
# `torch.amp._enter_autocast`, `torch._C`; not dunders), or torch.fx.experimental.
PRIVATE = re.compile(r"\btorch(?:\.[A-Za-z]\w*)*\._(?!_)\w*|\btorch\.fx\.experimental\b")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    """(root name, ".a.b") of an attribute chain on a name; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id, "".join(f".{p}" for p in reversed(parts))) if isinstance(node, ast.Name) \
        else None


def private_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of every private torch name `source` uses in code: imports, attributes of
    names bound to torch modules (`import torch.fx as fx`: `fx._x` counts) and string constants;
    comments and docstrings are left out."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the torch path it holds
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    bound[a.asname or "torch"] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
    skip, found = _docstrings(tree), []
    for node in ast.walk(tree):
        texts: list[str] = []
        if isinstance(node, ast.Import):
            texts = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            texts = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and (chain := _dotted(node)) and chain[0] in bound:
            texts = [bound[chain[0]] + chain[1]]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            texts = [node.value]
        found += [(node.lineno, m.group()) for t in texts for m in PRIVATE.finditer(t)]
    return sorted(set(found))


def test_private_names_stay_in_torch_private() -> None:
    """Only torch_private/ may name torch's private API: every other module calls a function
    there (issue 25, "lean core")."""
    hits = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
            for path in sorted(PACKAGE.rglob("*.py"))
            if "torch_private" not in path.relative_to(PACKAGE).parts
            for line, name in private_names(path.read_text(encoding="utf-8"))]
    assert not hits, "private torch names outside vllm_compile_ray/torch_private/ (add a " \
        "function there and call it):\n" + "\n".join(hits)


def test_the_scan_finds_private_names() -> None:
    source = textwrap.dedent('''
        """torch._inductor in a docstring is allowed."""
        import torch
        import torch.fx as fx
        from torch._inductor import config
        from torch.fx import _lazy_graph_module
        x = torch._dynamo.mark_dynamic  # torch._C in a comment is allowed
        y = fx._lazy_graph_module
        z = torch.amp._enter_autocast, torch.__version__, torch.ops.aten.add
        logger = "torch._inductor.select_algorithm"
        from torch.fx.experimental.symbolic_shapes import free_symbols
        ''')
    assert [line for line, _ in private_names(source)] == [5, 6, 7, 8, 9, 10, 11]
