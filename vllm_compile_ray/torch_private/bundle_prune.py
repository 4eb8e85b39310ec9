"""An artifact's Triton bundle cut to what a loader needs.

A bundled AOT artifact carries, per compiled graph, the Triton cache entries of every kernel its
compile built (`TritonBundle.kernel_artifacts`: one group per kernel and config, each with the
kernel's source, its TTIR, TTGIR, LLIR, PTX, cubin and metadata JSON), and a loader writes them
all to Triton's cache directory before the graph runs (`TritonBundler.read_and_emit`). Measured on
one H100 (torch 2.11, llama-3-8b at 4 layers, dynamic + 10 sizes, `--max-autotune`, 33
artifacts, 484 MB): 2482 groups in 19856 files, of which 868 groups hold a kernel the wrappers
launch (the rest are GEMM template choices benchmarked during max-autotune); by bytes, LLIR
178.5 MB, cubin 71.0, source 70.6, PTX 63.8, TTGIR 53.5, TTIR 35.2, JSON 4.2. A new-node rank
spent 0.73 s of its 2.7 s load writing them.

`prune` keeps the groups whose files are named for a kernel the wrapper launches
(`async_compile.triton('<name>', ...)`), and of those only the binary and the JSON metadata
(the group index among them): what Triton's cache (`FileCacheManager.get_group` skips absent
children) and Inductor's static launcher load. The IRs and the source are for debugging. The
compile task checks the pruned artifact in a fresh cache (`inductor.check_complete`): a group a
loader still needed shows as a kernel compile there, and the task then publishes the bundle
whole (`InductorStandaloneAdaptor._cut_and_check`); where no check runs, nothing is cut.
Artifacts whose graphs launch user Triton kernels (a side table) are left whole.

Measured on the same host and workload (`benchmarks/device/ab_warm.sh`, ABBA): the bundles
shrink from 484.5 MB to 31.5 MB (856 of 2470 groups, 2568 of 19760 files), every warm artifact
still checks complete, and a new-node rank's load of the 33 artifacts drops from 1.96 s to
1.26 s (rank ready 3.80 to 2.65 s).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from typing import Any

from . import artifact_format

_LAUNCHED = re.compile(r"async_compile\.triton\('(\w+)'")


def prune(data: bytes) -> tuple[bytes, dict[str, int]]:
    """`data` with its compiled graph's Triton bundle cut to the launched kernels' groups and
    their loaded files, and counts of groups and files before and after ({} when there is no
    bundle to cut); the bytes unchanged when nothing is cut."""
    unpickled = artifact_format.unpickle(data)
    if unpickled is None or any(unpickled.side):
        return data, {}
    graph = getattr(getattr(unpickled.entry, "compiled_fw", None), "result", None)
    bundle = getattr(graph, "_triton_bundle", None)
    if bundle is None or not bundle.kernel_artifacts:
        return data, {}
    launched = set(_LAUNCHED.findall(graph.source_code))
    if not launched:
        return data, {}
    loaded = _loaded_extensions()
    kept = [dataclasses.replace(group, artifacts=[
                f for f in group.artifacts if os.path.splitext(f.filename)[1] in loaded])
            for group in bundle.kernel_artifacts if _names(group) & launched]
    counts = {"bundle_groups": len(bundle.kernel_artifacts), "bundle_groups_kept": len(kept),
              "bundle_files": sum(len(g.artifacts) for g in bundle.kernel_artifacts),
              "bundle_files_kept": sum(len(g.artifacts) for g in kept)}
    if counts["bundle_files_kept"] == counts["bundle_files"]:
        return data, counts
    graph._triton_bundle = dataclasses.replace(bundle, kernel_artifacts=kept)
    return _repickled(data, unpickled), counts


def _loaded_extensions() -> set[str]:
    """The files of a kernel group a loader reads: metadata JSON and the GPU binary."""
    from torch._inductor.utils import GPU_KERNEL_BIN_EXTS

    return {".json", *(f".{ext.lstrip('.')}" for ext in GPU_KERNEL_BIN_EXTS.values())}


def _names(group: Any) -> set[str]:
    """The kernel names a bundle group's files are named for (`<name>.cubin`, ...)."""
    return {os.path.splitext(f.filename)[0] for f in group.artifacts}


def _repickled(data: bytes, unpickled: artifact_format.Unpickled) -> bytes:
    import torch
    from torch.utils._appending_byte_serializer import BytesWriter

    header, key, _ = artifact_format.fields(data)
    with torch._functorch.config.patch("bundled_autograd_cache", True):  # as torch pickles it
        payload = pickle.dumps((unpickled.entry, *unpickled.side))
    writer = BytesWriter()
    for chunk in (bytes(header), bytes(key), payload):
        writer.write_bytes(chunk)
    return writer.to_bytes()
