"""Moving an Inductor artifact to another GPU index (retarget.py).

The CUDA wrapper is real Inductor output (tests/data/cuda_wrapper_h200.py.txt: the dynamic-shape
first piece of llama-tiny, compiled on an H200 as cuda:0, torch 2.11). The byte-level tests run
on a real CPU artifact of this torch, with that CUDA code put in its compiled graph; running
retargeted code on a second GPU is benchmarks/gpu_rank_device.py's job (step 3).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from vllm_compile_ray.compiling.compiler_interface import cuda_index
from vllm_compile_ray.torch_private import artifact_format, inductor, retarget

from test_autotune_ship import BEST, tuning_bytes

WRAPPER = (Path(__file__).parent / "data" / "cuda_wrapper_h200.py.txt").read_text()
# Any way generated code can name a CUDA device index.
INDEX_NAMED = re.compile(r"_DeviceGuard\((\d+)\)|set_device\((\d+)\)|get_raw_stream\((\d+)\)|"
                         r"type='cuda', index=(\d+)|['\"]cuda:(\d+)['\"]")
KERNELS = re.compile(r"^(\w+) = async_compile\.triton\('\w+', '''(.*?)'''", re.S | re.M)


def indices(code: str) -> set[str]:
    return {next(g for g in m.groups() if g is not None) for m in INDEX_NAMED.finditer(code)}


def test_every_index_site_of_real_cuda_code_moves() -> None:
    assert indices(WRAPPER) == {"0"}
    moved = retarget.retarget_source(WRAPPER, 3)
    assert indices(moved) == {"3"}
    for site in ("torch.cuda._DeviceGuard(3)", "torch.cuda.set_device(3)",
                 "stream0 = get_raw_stream(3)", "DeviceProperties(type='cuda', index=3,"):
        assert site in moved
    # Nothing else changes: same lines, and back to 0 gives the original text.
    assert len(moved.splitlines()) == len(WRAPPER.splitlines())
    assert retarget.retarget_source(moved, 0) == WRAPPER
    # Each kernel's source (what its module file and autotune key derive from) moves the same
    # way inside the wrapper as on its own.
    before, after = KERNELS.findall(WRAPPER), KERNELS.findall(moved)
    assert len(before) == len(after) > 0
    for (name, src), (name2, src2) in zip(before, after):
        assert name == name2 and src2 == retarget.retarget_source(src, 3) != src


def test_autotune_keys_follow_kernel_sources() -> None:
    renames = retarget.tuning_renames(WRAPPER, 1)
    kernels = {src for _, src in KERNELS.findall(WRAPPER)}
    assert len(renames) == len(kernels)
    for src in kernels:
        old = retarget.autotune_key(src)
        new = retarget.autotune_key(retarget.retarget_source(src, 1))
        assert renames[old] == new != old
        assert re.fullmatch(r"\w\w/\w+\.best_config", new)
    assert retarget.tuning_renames(WRAPPER, 0) == {k: k for k in renames}


def test_device_index_of_artifact_bytes() -> None:
    assert retarget.compiled_device_index(WRAPPER.encode()) == 0
    assert retarget.compiled_device_index(b"no cuda code here") is None
    with pytest.raises(ValueError, match=r"CUDA devices \[0, 1\]"):
        retarget.compiled_device_index(b"_DeviceGuard(0) ... _DeviceGuard(1)")


def test_retargeted_loads_use_a_cache_dir_per_index(tmp_path, monkeypatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with retarget.cache_dir_for(2):
        assert cache_dir() == str(tmp_path / "vcr-cuda2")
    assert cache_dir() == str(tmp_path)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with pytest.raises(RuntimeError), retarget.cache_dir_for(1):
        raise RuntimeError("a failed load")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_cuda_index_of_a_device_string() -> None:
    assert cuda_index("cuda:3") == 3
    assert cuda_index("cpu") is None and cuda_index("meta") is None


class _Piece(torch.nn.Module):
    def forward(self, x, w):
        return (torch.relu(x @ w) * 2 + 1,)


@pytest.fixture(scope="module", params=["bundled", "cache"])
def cpu_artifact(request, tmp_path_factory) -> tuple[bytes, list[torch.Tensor]]:
    """A real standalone artifact of this torch (CPU, so it compiles and loads here), in both
    formats: the bundled AOT one `compile_static` makes, and the cache one (what torch < 2.10
    made, and caches filled before still hold). Compiled in an empty Inductor cache: a hit in a
    cache an earlier run filled makes other bytes (already in re-serialized form)."""
    gm = fx.symbolic_trace(_Piece())
    args = [torch.randn(4, 8), torch.randn(8, 8)]
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    try:
        if request.param == "bundled":
            assert artifact_format.save_options(), "this torch makes no bundled AOT artifact"
            _, data = inductor.compile_static(gm, args, {})
        else:
            from torch._inductor import standalone_compile

            data = inductor._artifact_bytes(standalone_compile(
                gm, args, dynamic_shapes="from_example_inputs", options={}))
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    assert (retarget._read_chunks(data)[0] == artifact_format.aot_header()) == (
        request.param == "bundled")
    return data, args


def _graphs(data: bytes) -> list:
    """The artifact's compiled graphs (CompiledFxGraph), from either format."""
    chunks = retarget._read_chunks(data)
    if chunks[0] == artifact_format.aot_header():
        entry = pickle.loads(chunks[-1])[0]
        return [entry.compiled_fw.result]
    return [pickle.loads(a.content) for a in retarget._read_caches(chunks[-1])["inductor"]]


def _with_graph(data: bytes, graph, autotune: list) -> bytes:
    """`data` with its one compiled graph replaced by `graph` (and, in the cache format, the
    autotune entries `autotune` added to its caches)."""
    chunks = retarget._read_chunks(data)
    if chunks[0] == artifact_format.aot_header():
        entry, *rest = pickle.loads(chunks[-1])
        entry.compiled_fw.result = graph
        chunks[-1] = pickle.dumps((entry, *rest))
    else:
        caches = retarget._read_caches(chunks[-1])
        caches["inductor"] = [type(caches["inductor"][0])(caches["inductor"][0].key,
                                                          pickle.dumps(graph))]
        caches.setdefault("autotune", []).extend(autotune)
        chunks[-1] = retarget._write_caches(caches)
    return retarget._write_chunks(chunks)


def test_retargeted_bytes_still_load_and_run(cpu_artifact) -> None:
    """Re-serializing the artifact's caches keeps it a valid artifact of this torch."""
    data, args = cpu_artifact
    assert retarget.compiled_device_index(data) is None  # CPU code: nothing to move
    unpickled = artifact_format.unpickle(data)
    assert unpickled is None or artifact_format.cuda_indices(unpickled) == set()
    moved, tuning = retarget.retarget(data, b"", 2)
    assert tuning == b"" and moved != data
    want = _Piece()(*args)[0]
    assert torch.allclose(artifact_format.load(moved)(*args)[0], want)
    assert torch.allclose(inductor.load_artifact(data, b"", 2)(*args)[0], want)


def test_retarget_moves_code_binaries_and_tuning(cpu_artifact, tmp_path, monkeypatch) -> None:
    """An artifact whose compiled graph holds the H200 wrapper: after retarget(…, 1) the graph's
    code, file name and device set name GPU 1, its Triton binaries are filed under index 1, the
    statically launched kernels (pickled for GPU 0) are gone, and every autotune result, shipped
    beside the artifact or inside it, sits where the moved kernels look."""
    from torch._inductor.codecache import get_hash
    from torch._inductor.triton_bundler import TritonBundle, TritonKernelArtifacts
    from torch.compiler._cache import CacheArtifactFactory

    data, _ = cpu_artifact
    (graph,) = _graphs(data)
    graph.source_code, graph.device_idxs = WRAPPER, type(graph.device_idxs)([0])
    graph._triton_bundle = TritonBundle([TritonKernelArtifacts("kernelhash", 0, [])],
                                        ["static autotuner pickled for GPU 0"])
    kernels = list(dict.fromkeys(src for _, src in KERNELS.findall(WRAPPER)))  # listed twice
    assert len(kernels) >= 3
    inside = CacheArtifactFactory.create("autotune", retarget.autotune_key(kernels[0]),
                                         json.dumps(BEST).encode())
    cuda_like = _with_graph(data, graph, [inside])
    bundled = retarget._read_chunks(data)[0] == artifact_format.aot_header()
    # The bundled format has no caches inside: every result is shipped beside it.
    shipped = tuning_bytes({retarget.autotune_key(k): BEST
                            for k in (kernels if bundled else kernels[1:])})
    assert retarget.compiled_device_index(cuda_like) == 0
    if bundled:  # the loader reads the index from the unpickled entry, not by a scan
        assert artifact_format.cuda_indices(artifact_format.unpickle(cuda_like)) == {0}

    moved, moved_tuning = retarget.retarget(cuda_like, shipped, 1)
    assert retarget.compiled_device_index(moved) == 1
    if bundled:
        assert artifact_format.cuda_indices(artifact_format.unpickle(moved)) == {1}
    (new,) = _graphs(moved)
    assert new.source_code == retarget.retarget_source(WRAPPER, 1)
    assert new.cache_key == get_hash(new.source_code.strip()) != graph.cache_key
    assert set(new.device_idxs) == {1}
    assert [k.device for k in new._triton_bundle.kernel_artifacts] == [1]
    assert new._triton_bundle.static_autotuners == []
    def moved_key(kernel: str) -> str:
        return retarget.autotune_key(retarget.retarget_source(kernel, 1))

    if not bundled:
        new_caches = retarget._read_caches(retarget._read_chunks(moved)[-1])
        assert [a.key for a in new_caches["autotune"]] == [moved_key(kernels[0])]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    shipped_kernels = kernels if bundled else kernels[1:]
    assert inductor.load_tuning(moved_tuning) == len(shipped_kernels)
    landed = {p.relative_to(tmp_path / "inductor").as_posix()
              for p in (tmp_path / "inductor").rglob("*.best_config")}
    assert landed == {moved_key(k) for k in shipped_kernels}


def test_prune_keeps_the_groups_of_launched_kernels(cpu_artifact) -> None:
    """A bundle cut to what the wrapper launches: groups named for its kernels stay with their
    binary and JSON files, a group of a kernel it never launches (a GEMM choice benchmarked
    during max-autotune) goes; an artifact with nothing to cut, or no bundle, or in the cache
    format comes back as it was."""
    from torch._inductor.triton_bundler import (
        TritonBundle,
        TritonKernelArtifact,
        TritonKernelArtifacts,
    )

    from vllm_compile_ray.torch_private import bundle_prune

    data, _ = cpu_artifact
    assert bundle_prune.prune(data) == (data, {})  # CPU code: no Triton bundle
    if artifact_format.unpickle(data) is None:
        return  # the cache format is loaded by torch as it is
    (graph,) = _graphs(data)
    launched = sorted(set(bundle_prune._LAUNCHED.findall(WRAPPER)))
    assert len(launched) >= 2

    def group(n: int, name: str) -> TritonKernelArtifacts:
        files = [f"{name}.{ext}" for ext in ("source", "ttir", "ttgir", "llir", "ptx", "cubin",
                                             "json")] + [f"__grp__{name}.json"]
        return TritonKernelArtifacts(f"hash{n}", 0,
                                     [TritonKernelArtifact(f, f.encode()) for f in files])

    graph.source_code = WRAPPER
    graph._triton_bundle = TritonBundle(
        [group(0, launched[0]), group(1, "triton_mm_choice_7"), group(2, launched[1])], [])
    pruned, counts = bundle_prune.prune(_with_graph(data, graph, []))
    assert counts == {"bundle_groups": 3, "bundle_groups_kept": 2, "bundle_files": 24,
                      "bundle_files_kept": 6}
    (new,) = _graphs(pruned)
    kept = new._triton_bundle.kernel_artifacts
    assert [g.kernel_hash for g in kept] == ["hash0", "hash2"]
    assert [f.filename for f in kept[0].artifacts] == [
        f"{launched[0]}.cubin", f"{launched[0]}.json", f"__grp__{launched[0]}.json"]
    assert kept[0].artifacts[0].payload == f"{launched[0]}.cubin".encode()
    assert new.source_code == WRAPPER and artifact_format.cuda_indices(
        artifact_format.unpickle(pruned)) == set(graph.device_idxs)
    assert bundle_prune.prune(pruned) == (pruned, {"bundle_groups": 2, "bundle_groups_kept": 2,
                                                   "bundle_files": 6, "bundle_files_kept": 6})
