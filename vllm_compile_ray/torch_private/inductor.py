"""Compiling, loading and tuning through Inductor: `standalone_compile` and its artifacts.

Shipping recipe (see NOTES): static shapes compile from concrete example tensors; the dynamic
shape compiles from symbolic fake inputs inside a tracing context; artifacts move as the bytes
of `CompiledArtifact.save(format="binary")`. Where torch has it (2.10+), the artifact is
Inductor's bundled AOT one (`standalone_compile(aot=True)`): the compiled graph pickled whole,
which `artifact_format.load` loads in memory. The older cache format goes through Inductor's disk
caches at load (each entry written, then looked up): on one H200 the 33 artifacts of llama-3-8b
loaded in 2.9-3.4 s bundled vs 4.0-4.4 s (restart) and 4.1 vs 4.6 s (new node), both through
torch's loader. Both formats load, so a cache filled before keeps serving.

What Inductor did in a process (phase seconds, failed autotune choices, kernel compiles at
startup) is read in `inductor_metrics.py`; the artifact's bytes in `artifact_format.py`.

Device index: generated CUDA code names the GPU it was compiled on; `load_artifact` moves an
artifact to the loader's GPU first (`retarget.py`), so keys and artifacts carry no device index
and one artifact serves every GPU.

tests/test_torch_contract.py lists every private torch name the package uses (this module and
the rest of `torch_private/`) and fails, naming it, when one moves.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from ..specs import InputSpec
from . import artifact_format
from .inductor_metrics import kernel_work

# Config keys that change with the machine or process running the compile, not with the code
# made: they stay out of the fingerprint, else two hosts (or CI and a laptop) never share keys.
# A consistency check whose default follows the CI environment variable (torch/_functorch/config.py).
_UNHASHED_FUNCTORCH_CONFIG = ("error_on_custom_op_aliasing",)


def device_fingerprint(device_type: str) -> dict[str, str]:
    """What of the target device changes the generated code."""
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        return {"device_type": "cuda", "device_name": props.name,
                "capability": f"{props.major}.{props.minor}", "cuda": str(torch.version.cuda),
                "triton": triton_version}
    if device_type == "cpu":
        from torch._inductor import cpp_builder, cpu_vec_isa
        cxx = cpp_builder.get_compiler_version_info(cpp_builder.get_cpp_compiler())
        versions = [part for part in cxx.split("_") if " version " in part]
        return {"device_type": "cpu", "isa": str(cpu_vec_isa.pick_vec_isa()),
                "cxx": versions[-1].strip() if versions else cxx}
    raise ValueError(f"device_type {device_type!r} is not supported; allowed: 'cpu', 'cuda'")


@functools.cache
def torch_fingerprint() -> dict[str, str]:
    """The device-independent part of `environment_fingerprint` (cached per process)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import torch_key
    from torch._functorch import config as functorch_config

    # What Inductor's own cache key hashes of its config (`save_config_portable`): it leaves out
    # absolute paths (`cutlass_dir`s: on torch 2.13 `xpu.cutlass_dir` is the working directory,
    # so a rank started elsewhere than the warm missed every key), compile threads, tracing and
    # cache switches.
    return {
        "torch": torch.__version__,
        "torch_key": torch_key().hex(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "arch": platform.machine(),
        "inductor_config": _hash_config(_portable(inductor_config)),
        "functorch_config": _hash_config({k: v for k, v in _portable(functorch_config).items()
                                          if k not in _UNHASHED_FUNCTORCH_CONFIG}),
    }


def _portable(config_module: Any) -> dict[str, Any]:
    """A torch config module's values as its cache keys see them, private ones included."""
    return config_module.save_config_portable(ignore_private_configs=False)


def _hash_config(config: dict[str, Any]) -> str:
    text = repr(sorted((k, repr(v)) for k, v in config.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment_fingerprint(device_type: str) -> dict[str, str]:
    """Compiler and environment fingerprint: torch, Python, arch, Inductor config, device."""
    return {**torch_fingerprint(), **device_fingerprint(device_type)}


# torch 2.11 restores a bundled kernel's tuned config only among the configs the bundle compiled
# and drops the ones coordinate descent found (`recheck_autotune_cache`): a loader re-runs
# coordinate descent and compiles its kernels at the first call (measured: 139 tunings, 79 Triton
# compiles, llama-3-8b x 33 artifacts). torch 2.12 compiles the tuned config instead.
COORDINATE_DESCENT_SHIPS = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 12)


def quiet_autotune_logs() -> None:
    """No per-GEMM autotune tables on stderr (a warm job's log would be mostly them); the
    choices and timings stay in Inductor's debug logs."""
    from torch._inductor import config as inductor_config

    for name, value in (("autotune_num_choices_displayed", 0),
                        ("max_autotune_report_choices_stats", False)):
        if hasattr(inductor_config, name):
            setattr(inductor_config, name, value)


def set_compile_threads(threads: int) -> None:
    """Inductor's parallel compile workers for this process (a Ray task sets it from its CPUs).

    Inductor leaves it out of its portable config, so the environment fingerprint and keys do not
    change with it.
    """
    from torch._inductor import config as inductor_config

    inductor_config.compile_threads = max(1, int(threads))


def import_compiler() -> None:
    """Import what a first compile imports (Inductor's compile and GEMM autotuning), now."""
    import importlib

    for name in ("torch._inductor.compile_fx", "torch._inductor.select_algorithm"):
        importlib.import_module(name)


def warm_compile_pool() -> None:
    """Start Inductor's parallel compile workers now (a no-op with one compile thread)."""
    from torch._inductor.async_compile import AsyncCompile

    warm = getattr(AsyncCompile, "warm_pool", None)
    if warm is not None:
        warm()


def warm_device(device_type: str) -> None:
    """Pay a process's first-compile costs on the device now: one tiny compile and run in a
    throwaway Inductor cache starts CUDA, Triton's driver, compiler and launcher, and Inductor's
    code cache, which a worker's first real compile would otherwise pay. CUDA only (a CPU
    compile shares nothing worth warming but the fingerprint)."""
    if device_type != "cuda":
        return
    from torch._inductor.utils import fresh_cache

    # (no annotations: a string one would land in the graph's globals and spoil its cache key)
    gm = fx.symbolic_trace(lambda x: torch.relu(x * 2 + 1))
    inputs = [torch.zeros(64, device="cuda")]
    with fresh_cache():
        fn, _ = compile_static(gm, inputs, {}, save=False)
        fn(*inputs)
    torch.cuda.synchronize()


def _fake_propagate(gm: fx.GraphModule, fake_inputs: Sequence[Any], fake_mode: Any) -> None:
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*fake_inputs)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def _artifact_bytes(artifact: Any) -> bytes:
    with tempfile.TemporaryDirectory(prefix="vcr-save-") as tmp:
        path = os.path.join(tmp, "artifact.bin")
        artifact.save(path=path, format="binary")
        with open(path, "rb") as f:
            return f.read()


def example_tensors(specs: Sequence[InputSpec], size: int, device: str) -> list[Any]:
    """Concrete example inputs of the specs' shapes with every symbol set to `size` (zeros:
    values never matter to the compile, and zero indices are valid for embeddings)."""
    import sympy

    def resolve(entry: int | str) -> int:
        if isinstance(entry, int):
            return entry
        return int(sympy.sympify(entry).subs(_symbol_values(entry, size)))

    out: list[Any] = []
    for spec in specs:
        if spec.kind == "tensor":
            shape, stride = tuple(map(resolve, spec.shape)), tuple(map(resolve, spec.stride))
            out.append(torch.empty_strided(shape, stride, dtype=spec.torch_dtype,
                                           device=device).zero_())
        elif spec.kind == "symint":
            out.append(resolve(spec.expr))
        else:
            out.append(spec.value)
    return out


def _symbol_values(entry: str, size: int) -> dict[str, int]:
    import re
    return {name: size for name in re.findall(r"\bs\d+\b", entry)}


def compile_static(gm: fx.GraphModule, inputs: Sequence[Any], options: dict[str, Any],
                   save: bool = True) -> tuple[Callable, bytes]:
    """Compile `gm` for the shapes of `inputs` (`example_tensors` of the piece's specs at one
    size); returns (callable, artifact bytes; b"" with save=False)."""
    from torch._inductor import standalone_compile
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    with fake_mode:
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    _fake_propagate(gm, fakes, fake_mode)
    with torch.no_grad():
        artifact = standalone_compile(gm, inputs, dynamic_shapes="from_example_inputs",
                                      options=dict(options), **artifact_format.save_options())
    return artifact, _artifact_bytes(artifact) if save else b""


def _symbolic_inputs(specs: Sequence[InputSpec], device: str
                     ) -> tuple[Any, list[Any], dict[str, Any]]:
    """(fake mode, fake inputs, symbols): the specs' inputs with one backed symbol per canonical
    symbol (hint 8), made in a fake mode of their own."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv()
    fake_mode = FakeTensorMode(shape_env=shape_env)
    symbols: dict[str, Any] = {}

    def symbol(name: str) -> Any:
        if name not in symbols:
            symbols[name] = shape_env.create_symbol(8, source=ConstantSource(f"vcr_{name}"),
                                                    dynamic_dim=DimDynamic.DYNAMIC)
        return symbols[name]

    def resolve(entry: int | str) -> Any:
        if isinstance(entry, int):
            return entry
        import sympy
        names = _symbol_values(entry, 0)
        expr = sympy.sympify(entry, locals={n: symbol(n) for n in names})
        return shape_env.create_symintnode(expr, hint=None)

    fakes: list[Any] = []
    with fake_mode:
        for spec in specs:
            if spec.kind == "tensor":
                fakes.append(torch.empty_strided(tuple(map(resolve, spec.shape)),
                                                 tuple(map(resolve, spec.stride)),
                                                 dtype=spec.torch_dtype, device=device))
            elif spec.kind == "symint":
                fakes.append(resolve(spec.expr))
            else:
                fakes.append(spec.value)
    return fake_mode, fakes, symbols


def symbolic_values(gm: fx.GraphModule, specs: Sequence[InputSpec]) -> dict[fx.Node, Any]:
    """Fake value (symbolic sizes) of every node of `gm` run on the specs' inputs, on the meta
    device (no GPU needed); the graph's own metadata is left alone."""
    fake_mode, fakes, _ = _symbolic_inputs(specs, "meta")
    values: dict[fx.Node, Any] = {}

    class Record(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            values[node] = result = super().run_node(node)
            return result

    with fake_mode, torch.no_grad():
        Record(gm).run(*fakes)
    return values


def compile_dynamic(gm: fx.GraphModule, specs: Sequence[InputSpec], device: str,
                    options: dict[str, Any], save: bool = True
                    ) -> tuple[Callable, bytes, tuple[int, int | None]]:
    """Compile `gm` with symbolic dims; returns (callable, bytes, (lo, hi)) where the artifact is
    valid for lo <= s0 <= hi (hi None: unbounded) according to the guards it recorded."""
    from torch._guards import TracingContext, tracing
    from torch._inductor import standalone_compile

    fake_mode, fakes, symbols = _symbolic_inputs(specs, device)
    _fake_propagate(gm, fakes, fake_mode)
    with torch.no_grad(), tracing(TracingContext(fake_mode)):
        artifact = standalone_compile(gm, fakes, dynamic_shapes="from_tracing_context",
                                      options=dict(options), **artifact_format.save_options())
    lo, hi = 1, None
    if "s0" in symbols:
        value_range = fake_mode.shape_env.var_to_range.get(symbols["s0"])
        if value_range is not None:
            lo = int(value_range.lower)
            upper = value_range.upper
            hi = int(upper) if upper.is_number and upper.is_finite and upper < 2**62 else None
    return artifact, _artifact_bytes(artifact) if save else b"", (lo, hi)


def tune_once(data: bytes, inputs: Sequence[Any]) -> tuple[bytes, int]:
    """Load artifact bytes in a fresh Inductor and Triton cache, as a rank on a new node would,
    and run them once so Triton's runtime autotuning (pointwise and reduction configs,
    coordinate descent) happens now for every kernel; return the results as Mega-Cache bytes
    and how many kernels they cover ((b"", 0) when nothing was tuned).

    Inductor keeps these results beside the kernel sources (`<kernel>.best_config`), outside the
    standalone artifact, so a loader without them autotunes again at its first call. Running
    the freshly compiled callable instead misses kernels this worker already tuned for an
    earlier task (their results are found, not made, so nothing records them).
    """
    from torch._inductor.utils import fresh_cache
    from torch.compiler._cache import CacheArtifactManager

    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
    with fresh_cache():
        fn = artifact_format.load(data)
        with CacheArtifactManager.with_fresh_cache():
            with torch.no_grad():
                fn(*inputs)
            torch.cuda.synchronize(device)  # the inputs' GPU (None: current), no other
            saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return b"", 0
    data, info = saved
    return data, len(getattr(info, "autotune_artifacts", ()))


def check_complete(data: bytes, tuning: bytes, inputs: Sequence[Any]) -> dict[str, int]:
    """Load artifact bytes (with their tuning) as a rank on a new node would, in a fresh Inductor
    and Triton cache, and run them once on `inputs`: the kernel compiles and autotunes that
    first call needed ("check_kernel_compiles", "check_autotunes"; both 0 for a complete one)."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache(), kernel_work() as work:
        fn = load_artifact(data, tuning)
        with torch.no_grad():
            fn(*inputs)
        torch.cuda.synchronize()
    return {"check_kernel_compiles": work["kernel_compiles"],
            "check_autotunes": work["autotunes"]}


def load_tuning(data: bytes | memoryview) -> int:
    """Put autotune results from `tune_once` into this process's Inductor cache, where kernels
    loaded afterwards find them; returns how many kernels they cover."""
    info = torch.compiler.load_cache_artifacts(bytes(data))
    return len(getattr(info, "autotune_artifacts", ())) if info is not None else 0


def load_artifact(data: bytes | memoryview, tuning: bytes | memoryview = b"",
                  device_index: int | None = None) -> Callable:
    """Load artifact bytes written by `compile_static` / `compile_dynamic` (with the autotune
    results of `tune_once`, if any) to run on CUDA device `device_index` (None: as compiled).

    An artifact compiled on another GPU index is retargeted first (`retarget`) and loads into an
    Inductor cache directory of its own per index, so one process can hold a piece on two GPUs.
    The compiled index comes from the unpickled entry (the older cache format: a scan of the
    bytes), and the bytes are unpickled once.
    """
    from . import retarget

    unpickled = artifact_format.unpickle(data)
    if device_index is None:
        source = None
    elif unpickled is None:
        source = retarget.compiled_device_index(bytes(data))
    else:
        source = retarget.one_index(artifact_format.cuda_indices(unpickled))
    if source is None or source == device_index:
        if tuning:  # before the kernels load: they read their tuned config when created
            load_tuning(tuning)
        if unpickled is None:
            return artifact_format.load(data)
        return artifact_format.load_unpickled(unpickled)
    data, tuning = retarget.retarget(bytes(data), bytes(tuning), device_index)
    with retarget.cache_dir_for(device_index):
        if tuning:
            load_tuning(tuning)
        return artifact_format.load(data)
