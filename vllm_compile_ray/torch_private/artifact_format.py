"""The bytes of a standalone Inductor artifact, and loading them.

`CompiledArtifact.save(format="binary")` writes a crc32, then length-prefixed fields:
- bundled AOT (`standalone_compile(aot=True)`, torch 2.10+; what `inductor.compile_static` and
  `compile_dynamic` make): the header `AOTCompiledArtifact`, torch's build key, and a pickle of
  (the AOTAutograd entry holding the compiled graph, Triton side-table kernels, their constants);
- cache (older torch; caches filled before still hold it): the compiled graph inside Inductor's
  caches (Mega-Cache bytes), which torch loads by writing them to its disk caches first.

`load` reads a bundled artifact in memory: the payload is unpickled and its entry's post-compile
step runs (Inductor imports the generated module and loads its kernels). torch's own
`CompiledArtifact.load` first writes the bytes to a file and reads them back, checks their crc32
and deep-copies the entry so it could serialize it again; here the bytes come sha256-verified from
the store (or straight from the compile) and a loaded artifact is never serialized again. Measured
on one H200 by cProfile of `vcr load` (llama-3-8b, 32 layers, 33 artifacts, 476 MB): the deep
copies 2.5 s, the crc32 0.2 s, of ~20 s profiled.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import tempfile
from collections.abc import Callable
from typing import Any

import torch

_CHECKSUM = 4  # the crc32 in front of the fields
_LENGTH = 8  # each field's big-endian u64 length


@functools.cache
def save_options() -> dict[str, bool]:
    """standalone_compile's option for the bundled AOT artifact, where this torch has it."""
    import inspect

    from torch._inductor import standalone_compile

    return {"aot": True} if "aot" in inspect.signature(standalone_compile).parameters else {}


def aot_header() -> bytes | None:
    """The first field of a bundled AOT artifact (None: this torch makes none)."""
    try:
        from torch._inductor.standalone_compile import AOTCompiledArtifact
    except ImportError:
        return None
    return AOTCompiledArtifact.AOT_HEADER


def fields(data: bytes | memoryview) -> list[memoryview]:
    """The artifact's fields, as views of `data` (no copy, crc32 not checked)."""
    view, at, out = memoryview(data), _CHECKSUM, []
    while at < len(view):
        size = int.from_bytes(view[at:at + _LENGTH], "big")
        at += _LENGTH
        if at + size > len(view):
            raise ValueError(f"artifact is truncated: a field of {size} bytes at offset {at} "
                             f"runs past its {len(view)} bytes")
        out.append(view[at:at + size])
        at += size
    return out


def is_bundled(data: bytes | memoryview) -> bool:
    return _is_bundled(fields(data))


def _is_bundled(parts: list[memoryview]) -> bool:
    return len(parts) == 3 and parts[0] == aot_header()


@dataclasses.dataclass(frozen=True)
class Unpickled:
    """A bundled AOT artifact's payload, unpickled once: the AOTAutograd entry, Triton side-table
    kernels and their constants, and the payload they came from."""

    entry: Any
    side: tuple
    payload: memoryview


def unpickle(data: bytes | memoryview) -> Unpickled | None:
    """The bundled artifact in `data`, unpickled (None: the cache format, loaded from bytes)."""
    parts = fields(data)
    if not _is_bundled(parts):
        return None
    from torch._inductor.codecache import torch_key

    if parts[1] != torch_key():
        raise ValueError("the artifact was compiled by another torch build (torch_key "
                         "differs); it loads only where it was made")
    bundle = pickle.loads(parts[2])
    entry, side = (bundle[0], tuple(bundle[1:])) if isinstance(bundle, tuple) else (bundle, ())
    return Unpickled(entry, side, parts[2])


def cuda_indices(unpickled: Unpickled) -> set[int]:
    """The CUDA device indices the artifact's compiled graph runs on (empty: no CUDA code), as
    Inductor recorded them (`CompiledFxGraph.device_idxs`): read from the unpickled entry, so a
    loader need not scan the artifact's bytes for them."""
    graph = getattr(getattr(unpickled.entry, "compiled_fw", None), "result", None)
    return {int(i) for i in getattr(graph, "device_idxs", None) or ()}


def load(data: bytes | memoryview) -> Callable:
    """A callable of artifact bytes of either format (positional tensors in, a tuple out)."""
    unpickled = unpickle(data)
    return _load_through_file(data) if unpickled is None else load_unpickled(unpickled)


def load_unpickled(unpickled: Unpickled) -> Callable:
    from torch._functorch._aot_autograd.aot_autograd_result import BundledAOTAutogradResult
    from torch._guards import TracingContext, tracing
    from torch._inductor.cudagraph_utils import BoxedDeviceIndex
    from torch._inductor.utils import BoxedBool
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    entry = unpickled.entry
    if any(unpickled.side) or not isinstance(entry, BundledAOTAutogradResult):
        # User Triton kernels in the side table (not Inductor's own): torch's load registers them.
        from torch._inductor.standalone_compile import AOTCompiledArtifact

        return AOTCompiledArtifact.deserialize(bytes(unpickled.payload))
    entry.guards_expr = None  # no guards to check: the piece's key and meta chose this artifact
    context = TracingContext.try_get() or TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
    with tracing(context):
        compiled = entry.wrap_post_compile(
            [], entry.sanitized_aot_config,
            {"cudagraphs": BoxedBool(torch._inductor.config.triton.cudagraphs),
             "boxed_forward_device_index": BoxedDeviceIndex(None)})

    def forward(*args: Any) -> Any:
        return compiled(list(args))

    return forward


def _load_through_file(data: bytes | memoryview) -> Callable:
    from torch._inductor.standalone_compile import CompiledArtifact

    with tempfile.TemporaryDirectory(prefix="vcr-load-") as tmp:
        path = os.path.join(tmp, "artifact.bin")
        with open(path, "wb") as f:
            f.write(data)
        return CompiledArtifact.load(path=path, format="binary")
