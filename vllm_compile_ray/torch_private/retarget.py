"""Moving an Inductor artifact to another GPU index.

Inductor's CUDA code names the device it was compiled on: the wrapper's `_DeviceGuard(0)`,
`set_device(0)` and `get_raw_stream(0)`, `device(type='cuda', index=0)` values, and each kernel's
`DeviceProperties(type='cuda', index=0, ...)`, which loads the kernel's binary onto that GPU.
Run on cuda:1 as is, such an artifact computes on GPU 0 (and opens a context there).
`retarget` rewrites those sites and everything keyed by the rewritten sources: the wrapper's
file name, the Triton binaries' device directory, and autotune results (filed by kernel source).
Statically launched kernels, pickled with the old index, are dropped; their kernels load from
the bundled binaries instead. A retargeted artifact loads in its own Inductor cache dir per index
(`cache_dir_for`), because its compiled graph keeps the original's cache key.

Checked against torch 2.11 (GPU host) and 2.13 (tests): benchmarks/gpu_rank_device.py step 3 and
tests/test_retarget.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
from collections.abc import Iterator
from typing import Any

from . import artifact_format

# Every place Inductor's CUDA codegen writes the compile-time device index: the wrapper's device
# guard, set_device and stream, `device(type='cuda', index=N)` values, and each kernel's
# `DeviceProperties(type='cuda', index=N, ...)` (the GPU its binary is loaded onto).
_INDEX_SITES = re.compile(r"(_DeviceGuard\(|set_device\(|get_raw_stream\(|type='cuda', index=|"
                          r"['\"]cuda:)(\d+)(?=[)'\",])")
_GUARD = b"_DeviceGuard("
_KERNEL_SOURCE = re.compile(r"async_compile\.triton\('\w+', '''(.*?)'''", re.S)


def compiled_device_index(data: bytes) -> int | None:
    """The CUDA index an artifact's generated code runs on (None: no CUDA device code).

    A scan with `bytes.find`: an artifact holds its kernels' binaries (llama-3-8b's 33 are
    476 MB), which a regex took 0.38 s to scan at each start."""
    found, at = set(), data.find(_GUARD)
    while at != -1:
        start = at + len(_GUARD)
        end = data.find(b")", start, start + 12)
        if end != -1 and data[start:end].isdigit():
            found.add(int(data[start:end]))
        at = data.find(_GUARD, start)
    return one_index(found)


def one_index(found: set[int]) -> int | None:
    """The one CUDA index of an artifact's code (None: none), else why it cannot move."""
    if len(found) > 1:
        raise ValueError(f"artifact code runs on CUDA devices {sorted(found)}; only a piece on "
                         f"one device can move to another")
    return next(iter(found), None)


def retarget_source(code: str, index: int) -> str:
    """Generated code (wrapper or kernel) with every device index site set to `index`."""
    return _INDEX_SITES.sub(lambda m: f"{m[1]}{index}", code)


def retarget(data: bytes, tuning: bytes, index: int) -> tuple[bytes, bytes]:
    """(artifact, autotune results) moved to CUDA device `index`.

    In each compiled graph the wrapper and kernel sources are rewritten (`retarget_source`), the
    wrapper gets the file name of its new source, bundled Triton binaries are filed under the new
    index, and statically launched kernels (pickled with the old index) are dropped, so kernels
    load from those binaries. Autotune results are keyed by kernel source: each moves to its
    kernel's new key. Both artifact formats move: the bundled AOT one (the compiled graph in a
    pickled AOTAutograd entry) and the cache one (compiled graphs inside Inductor's caches).
    """
    chunks = _read_chunks(data)  # the standalone format: length-prefixed fields, payload last
    if artifact_format.is_bundled(data):
        moved, renamed = _retarget_bundled(chunks[-1], index)
        chunks[-1] = moved
    else:
        caches = _read_caches(chunks[-1])
        renamed = {}  # autotune key of a kernel's old source -> of its new source
        graphs = caches.get("inductor", [])  # each a pickled CompiledFxGraph
        for n, artifact in enumerate(graphs):
            graph = pickle.loads(artifact.content)
            renamed.update(_retarget_graph(graph, index))
            graphs[n] = type(artifact)(artifact.key, pickle.dumps(graph))
        # The artifact's own caches hold autotune results too (of kernels it shares with
        # artifacts compiled before it in the same process): they move like the shipped ones.
        chunks[-1] = _write_caches(_rename_autotune(caches, renamed))
    tuning = _write_caches(_rename_autotune(_read_caches(tuning), renamed)) if tuning else tuning
    return _write_chunks(chunks), tuning


def _retarget_bundled(payload: bytes, index: int) -> tuple[bytes, dict[str, str]]:
    """A bundled AOT artifact's payload (pickled: the AOTAutograd entry, Triton side-table
    kernels, their constant args) with its compiled graphs moved; and the autotune renames."""
    import torch

    entry, *rest = pickle.loads(payload)
    renamed: dict[str, str] = {}
    for part in (entry.compiled_fw, entry.compiled_bw):
        graph = getattr(part, "result", None)  # the CompiledFxGraph of a bundled forward
        if graph is not None:
            renamed.update(_retarget_graph(graph, index))
    with torch._functorch.config.patch("bundled_autograd_cache", True):  # as torch pickles it
        return pickle.dumps((entry, *rest)), renamed


def _retarget_graph(graph: Any, index: int) -> dict[str, str]:
    """Move one CompiledFxGraph to `index` in place; returns its kernels' autotune renames."""
    from torch._inductor.codecache import get_hash

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
    return tuning_renames(old_code, index)


def _rename_autotune(caches: dict[str, list[Any]], renamed: dict[str, str]
                     ) -> dict[str, list[Any]]:
    """Each autotune entry keyed `renamed.get(key, key)`; the other entries as they are."""
    if "autotune" in caches:
        caches["autotune"] = [type(a)(renamed.get(a.key, a.key), a.content)
                              for a in caches["autotune"]]
    return caches


def tuning_renames(kernel_code: str, index: int) -> dict[str, str]:
    """Autotune key of each kernel in generated code -> the key of its retargeted source."""
    kernels = dict.fromkeys(_KERNEL_SOURCE.findall(kernel_code))  # some are listed twice
    return {autotune_key(k): autotune_key(retarget_source(k, index)) for k in kernels}


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
    return [bytes(field) for field in artifact_format.fields(data)]


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


@contextlib.contextmanager
def cache_dir_for(device_index: int) -> Iterator[None]:
    """Inductor's cache dir switched to `<cache dir>/vcr-cuda<index>` while retargeted artifacts
    load: their compiled graphs keep the original's key, so in one dir they would stand beside
    the original's entry and a lookup could pick either. Unlike Inductor's
    `temporary_cache_dir` this keeps the in-memory caches (modules and kernels keyed by their
    source, which names the device): kernels shared by several artifacts load once."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir(), f"vcr-cuda{device_index}")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
