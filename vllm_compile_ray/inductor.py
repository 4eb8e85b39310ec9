"""Every `torch._inductor` call of the package, so a torch upgrade touches one file.

Shipping recipe (see NOTES): static shapes compile from concrete example tensors; the dynamic
shape compiles from symbolic fake inputs inside a tracing context; artifacts move as the bytes
of `CompiledArtifact.save(format="binary")` and load through a temp file.

Device index: generated CUDA code names the GPU it was compiled on (`_DeviceGuard(0)`,
`get_raw_stream(0)`, `DeviceProperties(index=0)` in every kernel). `load_artifact` moves an
artifact to the loader's GPU by rewriting those sites (`retarget`), so keys and artifacts carry no
device index and one artifact serves the ranks on every GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .canonical import InputSpec

# Config keys that change with the machine or process running the compile, not with the code
# made: they stay out of the fingerprint, else two hosts (or CI and a laptop) never share keys.
_UNHASHED_INDUCTOR_CONFIG = ("compile_threads", "worker_start_method", "cache_dir")
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

    inductor = {k: v for k, v in inductor_config.get_config_copy().items()
                if k not in _UNHASHED_INDUCTOR_CONFIG}
    return {
        "torch": torch.__version__,
        "torch_key": torch_key().hex(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "arch": platform.machine(),
        "inductor_config": _hash_config(inductor),
        "functorch_config": _hash_config({k: v for k, v in functorch_config.get_config_copy().items()
                                          if k not in _UNHASHED_FUNCTORCH_CONFIG}),
    }


def _hash_config(config: dict[str, Any]) -> str:
    text = repr(sorted((k, repr(v)) for k, v in config.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment_fingerprint(device_type: str) -> dict[str, str]:
    """Compiler and environment fingerprint: torch, Python, arch, Inductor config, device."""
    return {**torch_fingerprint(), **device_fingerprint(device_type)}


def set_compile_threads(threads: int) -> None:
    """Inductor's parallel compile workers for this process (a Ray task sets it from its CPUs).

    Left out of the environment fingerprint (`_UNHASHED_INDUCTOR_CONFIG`), so keys do not change.
    """
    from torch._inductor import config as inductor_config

    inductor_config.compile_threads = max(1, int(threads))


def warm_compile_pool() -> None:
    """Start Inductor's parallel compile workers now (a no-op with one compile thread)."""
    from torch._inductor.async_compile import AsyncCompile

    warm = getattr(AsyncCompile, "warm_pool", None)
    if warm is not None:
        warm()


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


def compile_static(gm: fx.GraphModule, inputs: Sequence[Any], options: dict[str, Any]
                   ) -> tuple[Callable, bytes]:
    """Compile `gm` for the shapes of `inputs` (`example_tensors` of the piece's specs at one
    size); returns (callable, artifact bytes)."""
    from torch._inductor import standalone_compile
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    with fake_mode:
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    _fake_propagate(gm, fakes, fake_mode)
    with torch.no_grad():
        artifact = standalone_compile(gm, inputs, dynamic_shapes="from_example_inputs",
                                      options=dict(options))
    return artifact, _artifact_bytes(artifact)


def compile_dynamic(gm: fx.GraphModule, specs: Sequence[InputSpec], device: str,
                    options: dict[str, Any]) -> tuple[Callable, bytes, tuple[int, int | None]]:
    """Compile `gm` with symbolic dims; returns (callable, bytes, (lo, hi)) where the artifact is
    valid for lo <= s0 <= hi (hi None: unbounded) according to the guards it recorded."""
    from torch._dynamo.source import ConstantSource
    from torch._guards import TracingContext, tracing
    from torch._inductor import standalone_compile
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
    _fake_propagate(gm, fakes, fake_mode)
    with torch.no_grad(), tracing(TracingContext(fake_mode)):
        artifact = standalone_compile(gm, fakes, dynamic_shapes="from_tracing_context",
                                      options=dict(options))
    lo, hi = 1, None
    if "s0" in symbols:
        value_range = shape_env.var_to_range.get(symbols["s0"])
        if value_range is not None:
            lo = int(value_range.lower)
            upper = value_range.upper
            hi = int(upper) if upper.is_number and upper.is_finite and upper < 2**62 else None
    return artifact, _artifact_bytes(artifact), (lo, hi)


def tune_once(fn: Callable, inputs: Sequence[Any]) -> tuple[bytes, int]:
    """Run a freshly compiled CUDA artifact once so Triton's runtime autotuning (pointwise and
    reduction configs, coordinate descent) happens now; return its results as Mega-Cache bytes
    and how many kernels they cover ((b"", 0) when nothing was tuned).

    Inductor keeps these results beside the kernel sources (`<kernel>.best_config`), outside the
    standalone artifact, so a loader without them autotunes again at its first call.
    """
    from torch.compiler._cache import CacheArtifactManager

    with CacheArtifactManager.with_fresh_cache():
        with torch.no_grad():
            fn(*inputs)
        torch.cuda.synchronize()
        saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return b"", 0
    data, info = saved
    return data, len(getattr(info, "autotune_artifacts", ()))


def load_tuning(data: bytes) -> int:
    """Put autotune results from `tune_once` into this process's Inductor cache, where kernels
    loaded afterwards find them; returns how many kernels they cover."""
    info = torch.compiler.load_cache_artifacts(data)
    return len(getattr(info, "autotune_artifacts", ())) if info is not None else 0


def load_artifact(data: bytes, tuning: bytes = b"", device_index: int | None = None
                  ) -> Callable:
    """Load artifact bytes written by `compile_static` / `compile_dynamic` (with the autotune
    results of `tune_once`, if any) to run on CUDA device `device_index` (None: as compiled).

    An artifact compiled on another GPU index is retargeted first (`retarget`) and loads into an
    Inductor cache directory of its own per index, so one process can hold a piece on two GPUs.
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir, temporary_cache_dir

    source = compiled_device_index(data)
    if device_index is None or source is None or source == device_index:
        if tuning:  # before the kernels load: they read their tuned config when created
            load_tuning(tuning)
        return _load_binary(data)
    data, tuning = retarget(data, tuning, device_index)
    with temporary_cache_dir(os.path.join(cache_dir(), f"vcr-cuda{device_index}")):
        if tuning:
            load_tuning(tuning)
        return _load_binary(data)


def _load_binary(data: bytes) -> Callable:
    from torch._inductor.standalone_compile import CompiledArtifact

    with tempfile.TemporaryDirectory(prefix="vcr-load-") as tmp:
        path = os.path.join(tmp, "artifact.bin")
        with open(path, "wb") as f:
            f.write(data)
        return CompiledArtifact.load(path=path, format="binary")


# Every place Inductor's CUDA codegen writes the compile-time device index: the wrapper's device
# guard, set_device and stream, `device(type='cuda', index=N)` values, and each kernel's
# `DeviceProperties(type='cuda', index=N, ...)` (the GPU its binary is loaded onto).
_INDEX_SITES = re.compile(r"(_DeviceGuard\(|set_device\(|get_raw_stream\(|type='cuda', index=|"
                          r"['\"]cuda:)(\d+)(?=[)'\",])")
_GUARD_INDEX = re.compile(rb"_DeviceGuard\((\d+)\)")
_KERNEL_SOURCE = re.compile(r"async_compile\.triton\('\w+', '''(.*?)'''", re.S)


def compiled_device_index(data: bytes) -> int | None:
    """The CUDA index an artifact's generated code runs on (None: no CUDA device code)."""
    found = {int(i) for i in _GUARD_INDEX.findall(data)}
    if len(found) > 1:
        raise ValueError(f"artifact code runs on CUDA devices {sorted(found)}; only a piece on "
                         f"one device can move to another")
    return found.pop() if found else None


def retarget_source(code: str, index: int) -> str:
    """Generated code (wrapper or kernel) with every device index site set to `index`."""
    return _INDEX_SITES.sub(lambda m: f"{m[1]}{index}", code)


def retarget(data: bytes, tuning: bytes, index: int) -> tuple[bytes, bytes]:
    """(artifact, autotune results) moved to CUDA device `index`.

    In each compiled graph the wrapper and kernel sources are rewritten (`retarget_source`), the
    wrapper gets the file name of its new source, bundled Triton binaries are filed under the new
    index, and statically launched kernels (pickled with the old index) are dropped, so kernels
    load from those binaries. Autotune results are keyed by kernel source: each moves to its
    kernel's new key.
    """
    from torch._inductor.codecache import get_hash

    chunks = _read_chunks(data)  # the standalone format: length-prefixed fields, caches last
    caches = _read_caches(chunks[-1])
    renamed: dict[str, str] = {}  # autotune key of a kernel's old source -> of its new source
    for artifact_type, artifacts in caches.items():
        if artifact_type != "inductor":
            continue
        for n, artifact in enumerate(artifacts):
            graph = pickle.loads(artifact.content)
            old_code = graph.source_code
            graph.source_code = retarget_source(old_code, index)
            graph.cache_key = get_hash(graph.source_code.strip())
            graph.device_idxs = type(graph.device_idxs)([index])
            bundle = getattr(graph, "_triton_bundle", None)
            if bundle is not None:
                graph._triton_bundle = dataclasses.replace(
                    bundle, static_autotuners=[],
                    kernel_artifacts=[dataclasses.replace(k, device=index)
                                      for k in bundle.kernel_artifacts])
            renamed.update(tuning_renames(old_code, index))
            artifacts[n] = type(artifact)(artifact.key, pickle.dumps(graph))
    # The artifact's own caches hold autotune results too (of kernels it shares with artifacts
    # compiled before it in the same process): they move like the shipped ones.
    chunks[-1] = _write_caches(_rename_autotune(caches, renamed))
    tuning = _write_caches(_rename_autotune(_read_caches(tuning), renamed)) if tuning else tuning
    return _write_chunks(chunks), tuning


def _rename_autotune(caches: dict[str, list[Any]], renamed: dict[str, str]
                     ) -> dict[str, list[Any]]:
    """Each autotune entry keyed `renamed.get(key, key)`; the other entries as they are."""
    if "autotune" in caches:
        caches["autotune"] = [type(a)(renamed.get(a.key, a.key), a.content)
                              for a in caches["autotune"]]
    return caches


def tuning_renames(kernel_code: str, index: int) -> dict[str, str]:
    """Autotune key of each kernel in generated code -> the key of its retargeted source."""
    return {autotune_key(k): autotune_key(retarget_source(k, index))
            for k in _KERNEL_SOURCE.findall(kernel_code)}


def autotune_key(kernel_source: str) -> str:
    """Where Inductor files a kernel's autotune result, relative to its cache dir
    (`<xx>/<hash>.best_config`): derived from the kernel module's file name, the hash of its
    source, by the AutotuneCache a kernel of that file would open."""
    from torch._inductor.codecache import get_hash, get_path
    from torch._inductor.runtime.autotune_cache import AutotuneCache

    filename = get_path(get_hash(kernel_source.strip()), "py")[2]
    cache = AutotuneCache.create({"autotune_local_cache": True}, filename, "")
    if cache is None or not cache.local_cache:
        raise ValueError("Inductor's local autotune cache is off (autotune_local_cache)")
    return os.path.join(*str(cache.local_cache[1]).split(os.sep)[-2:])


def _read_chunks(data: bytes) -> list[bytes]:
    from torch.utils._appending_byte_serializer import BytesReader

    reader, chunks = BytesReader(data), []
    while not reader.is_finished():
        chunks.append(reader.read_bytes())
    return chunks


def _write_chunks(chunks: list[bytes]) -> bytes:
    from torch.utils._appending_byte_serializer import BytesWriter

    writer = BytesWriter()
    for chunk in chunks:
        writer.write_bytes(chunk)
    return writer.to_bytes()


def _read_caches(data: bytes) -> dict[str, list[Any]]:
    from torch.compiler._cache import CacheArtifactManager

    caches = CacheArtifactManager.deserialize(data)
    if caches is None:
        raise ValueError("the artifact's Inductor caches could not be read (other torch?)")
    return caches


def _write_caches(caches: dict[str, list[Any]]) -> bytes:
    from torch.compiler._cache import _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    serializer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    serializer.extend(caches.items())
    return serializer.to_bytes()
