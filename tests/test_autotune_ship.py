"""Runtime autotune results travel inside Inductor artifacts (the GPU half is measured by
benchmarks/bench_load.py: a loaded artifact's first call runs tuned kernels).

Here: the framing, and that the Mega-Cache bytes a compile task would attach land where
Inductor's kernels look for them (`<cache_dir>/<xx>/<hash>.best_config`) before loading."""

import json
from pathlib import Path

import pytest
import torch

import vllm_compile_ray as vcr
from vllm_compile_ray.compiling.compiler_interface import (
    InductorStandaloneAdaptor,
    pack_tuned,
    unpack_tuned,
)
from vllm_compile_ray.torch_private import artifact_format, bundle_prune, inductor

BEST = {"XBLOCK": 128, "num_warps": 4, "num_stages": 1, "configs_hash": "c0ffee",
        "found_by_coordesc": True, "time_taken_ms": 12}


def tuning_bytes(entries: dict[str, dict]) -> bytes:
    """Mega-Cache bytes holding `entries` as Inductor's autotune cache artifacts, recorded the way
    Inductor's AutotuneCache records them when a kernel is tuned."""
    from torch._inductor.runtime.autotune_cache import AutotuneCacheArtifact
    from torch.compiler._cache import CacheArtifactManager

    with CacheArtifactManager.with_fresh_cache():
        for key, best in entries.items():
            CacheArtifactManager.record_artifact(AutotuneCacheArtifact.type(), key, best)
        data, info = torch.compiler.save_cache_artifacts()
    assert len(info.autotune_artifacts) == len(entries)
    return data


def test_pack_round_trip_and_plain_artifacts_pass_through() -> None:
    assert pack_tuned(b"standalone", b"") == b"standalone"
    assert unpack_tuned(b"standalone") == (b"standalone", b"")
    packed = pack_tuned(b"standalone", b"tuning")
    assert packed != b"standalone"
    assert unpack_tuned(packed) == (b"standalone", b"tuning")
    assert all(part.obj is packed for part in unpack_tuned(packed))  # views: no copy per load


@pytest.mark.parametrize("cut", [3, 9, 20])
def test_truncated_tuned_artifact_is_refused(cut: int) -> None:
    packed = pack_tuned(b"x" * 16, b"tuning")
    with pytest.raises(ValueError, match="truncated"):
        unpack_tuned(packed[:cut] if cut > 6 else packed[:6] + b"\0" * cut)


def test_load_puts_best_configs_where_kernels_look(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    entries = {"ab/abcdef.best_config": BEST, "cd/cdef01.best_config": {**BEST, "XBLOCK": 64}}
    assert inductor.load_tuning(tuning_bytes(entries)) == 2
    for rel, best in entries.items():
        assert json.loads((tmp_path / "inductor" / rel).read_text()) == best


def test_adaptor_loads_tuning_before_the_artifact(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The adaptor writes the results first (kernels read them when created), then hands the
    standalone bytes, unchanged, to Inductor's loader."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    seen: list[tuple[bytes, bool]] = []
    best = tmp_path / "inductor" / "ab" / "abcdef.best_config"

    def fake_loader(data: bytes):  # stands in for CompiledArtifact.load; records what it got
        seen.append((data, best.exists()))
        return "loaded"

    monkeypatch.setattr(artifact_format, "load", fake_loader)
    monkeypatch.setattr(artifact_format, "unpickle", lambda data: None)  # the cache format
    adaptor = InductorStandaloneAdaptor(vcr.CompilationConfig())
    payload = pack_tuned(b"standalone-bytes", tuning_bytes({"ab/abcdef.best_config": BEST}))
    assert adaptor.load(payload, None, 4, "cuda:0") == "loaded"
    assert seen == [(b"standalone-bytes", True)]


def test_ship_autotune_is_a_bool_and_not_hashed() -> None:
    with pytest.raises(vcr.ConfigError, match="ship_autotune"):
        vcr.CompilationConfig(ship_autotune="yes")
    assert "ship_autotune" not in vcr.CompilationConfig().hashed_fields()


def test_dynamic_artifacts_tune_at_the_largest_listed_size() -> None:
    assert InductorStandaloneAdaptor(vcr.CompilationConfig(compile_sizes=[4, 64])).dynamic_tune_size == 64
    assert InductorStandaloneAdaptor(vcr.CompilationConfig()).dynamic_tune_size == 8


def test_failed_tuning_ships_the_artifact_untuned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtime autotuning that fails (out of memory, a driver error) costs the loaders their
    first-call tuning, never the artifact: it is published as compiled, with the error noted."""
    monkeypatch.setattr(inductor, "compile_static", lambda *a: ("fn", b"standalone-bytes"))
    monkeypatch.setattr(bundle_prune, "prune", lambda data: (data, {}))  # stand-in bytes
    monkeypatch.setattr(inductor, "example_tensors", lambda *a: [])

    def out_of_memory(fn, inputs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(inductor, "tune_once", out_of_memory)
    adaptor = InductorStandaloneAdaptor(vcr.CompilationConfig())
    result = adaptor.compile(None, [], 4, "cuda")
    assert result.artifact == b"standalone-bytes" and result.guard == (4, 4)
    assert result.info == {"tune_error": "RuntimeError: CUDA out of memory"}
    monkeypatch.setattr(inductor, "tune_once", lambda data, inputs: (b"tuning", 3))
    checked = []

    def check(data, tuning, inputs):
        checked.append((data, tuning))
        return {"check_kernel_compiles": 0, "check_autotunes": 1}

    monkeypatch.setattr(inductor, "check_complete", check)
    tuned = adaptor.compile(None, [], 4, "cuda")
    assert unpack_tuned(tuned.artifact) == (b"standalone-bytes", b"tuning")
    assert tuned.info["tuned_kernels"] == 3
    assert checked == [(b"standalone-bytes", b"tuning")]  # what is published, as published
    assert tuned.info["check_kernel_compiles"] == 0 and tuned.info["check_autotunes"] == 1

    def broken(data, tuning, inputs):
        raise RuntimeError("cannot load")

    monkeypatch.setattr(inductor, "check_complete", broken)
    noted = adaptor.compile(None, [], 4, "cuda").info
    assert noted["check_error"] == "RuntimeError: cannot load" and noted["tuned_kernels"] == 3
    assert adaptor.compile(None, [], 4, "cpu").info == {}  # no runtime autotuning on CPU


def test_a_cut_bundle_ships_only_when_checked_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting the Triton bundle never costs a rank a kernel compile: when the fresh-cache check
    of the cut artifact compiles a kernel or fails, the task ships the whole bundle and checks
    that; where no check runs (CPU, no runtime autotuning) nothing is cut."""
    monkeypatch.setattr(inductor, "compile_static", lambda *a: ("fn", b"whole-bytes"))
    monkeypatch.setattr(inductor, "example_tensors", lambda *a: [])
    monkeypatch.setattr(inductor, "tune_once", lambda data, inputs: (b"tuning", 2))
    monkeypatch.setattr(bundle_prune, "prune",
                        lambda data: (b"cut-bytes", {"bundle_groups": 9, "bundle_groups_kept": 3}))
    checked = []

    def check(data, tuning, inputs):  # the cut bytes miss a kernel the first call launches
        checked.append(data)
        return {"check_kernel_compiles": int(data == b"cut-bytes"), "check_autotunes": 0}

    monkeypatch.setattr(inductor, "check_complete", check)
    result = InductorStandaloneAdaptor(vcr.CompilationConfig()).compile(None, [], 4, "cuda")
    assert checked == [b"cut-bytes", b"whole-bytes"]
    assert unpack_tuned(result.artifact) == (b"whole-bytes", b"tuning")
    assert result.info["check_kernel_compiles"] == 0 and result.info["bundle_cut_undone"] == 1
    monkeypatch.setattr(inductor, "check_complete",
                        lambda data, tuning, inputs: {"check_kernel_compiles": 0})
    kept = InductorStandaloneAdaptor(vcr.CompilationConfig()).compile(None, [], 4, "cuda")
    assert unpack_tuned(kept.artifact) == (b"cut-bytes", b"tuning")
    assert "bundle_cut_undone" not in kept.info and kept.info["bundle_groups_kept"] == 3

    def cut_fails(data, tuning, inputs):  # the cut does not even load: ship it whole
        if data == b"cut-bytes":
            raise RuntimeError("a kernel's binary is missing")
        return {"check_kernel_compiles": 0}

    monkeypatch.setattr(inductor, "check_complete", cut_fails)
    whole = InductorStandaloneAdaptor(vcr.CompilationConfig()).compile(None, [], 4, "cuda")
    assert unpack_tuned(whole.artifact) == (b"whole-bytes", b"tuning")
    assert whole.info["bundle_cut_undone"] == 1 and "check_error" not in whole.info
    cpu = InductorStandaloneAdaptor(vcr.CompilationConfig()).compile(None, [], 4, "cpu")
    assert cpu.artifact == b"whole-bytes"  # nothing checks a cut there
