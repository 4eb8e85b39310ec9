"""The miss policy as documented (RELIABILITY.md, "Miss policy"): on_miss="error" never compiles,
and a shared artifact is deleted only after a verified mismatch, never because one process
failed to load it. EagerAdaptor, a local file:// cache, no Ray."""

import logging
from pathlib import Path

import pytest
import torch

import vllm_compile_ray as vcr
from vllm_compile_ray.cache import manifest
from vllm_compile_ray.cache.artifact import encode_artifact
from vllm_compile_ray.compiling.compiler_interface import EagerAdaptor

EAGER = dict(backend="eager", use_inductor=False)


def tiny():
    return vcr.models.build("llama-tiny", num_layers=2, seed=0)


def run(compiled: vcr.CompiledModel) -> None:
    ids, pos = torch.randint(0, 512, (2,)), torch.arange(2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), compiled.model(ids, pos))


def warmed(tmp_path: Path) -> tuple[vcr.CompilationConfig, vcr.ArtifactStore, list[str]]:
    """A cache holding every artifact of tiny() at size 2; the config, its store, the keys."""
    cfg = vcr.CompilationConfig(compile_sizes=[2], **EAGER,
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage-warm")))
    first = vcr.compile(tiny(), cfg)
    run(first)
    assert first.counter.num_artifacts_saved == len(first.plan.keys) == 6
    return cfg, vcr.open_store(cfg), first.plan.keys


def node(cfg: vcr.CompilationConfig, tmp_path: Path, name: str, **kw) -> vcr.CompiledModel:
    """A loader on a fresh node: its own staging dir, so it reads the shared store."""
    return vcr.compile(tiny(), cfg.replace(**kw)
                       .with_cache(staging_dir=str(tmp_path / f"stage-{name}")))


def test_rejected_artifacts_fail_on_miss_error_with_reasons_and_compile_nothing(
        tmp_path: Path) -> None:
    cfg, store, keys = warmed(tmp_path)
    corrupt, foreign = keys[0], keys[1]
    blob = store.read_raw(corrupt)
    store.write_raw(corrupt, blob[:-1] + bytes([blob[-1] ^ 1]))  # payload bit flip
    art = store.fetch(foreign)
    store.write_raw(foreign, encode_artifact(foreign, art.payload,
                                             {**art.meta, "fingerprint": "other-gpu"}))
    raw = {k: store.read_raw(k) for k in keys}
    loader = node(cfg, tmp_path, "gpu", on_miss="error")
    with loader.counter.expect(num_backend_compilations=0, num_artifacts_rejected=2,
                               num_artifacts_deleted=0, num_artifacts_loaded=4):
        with pytest.raises(vcr.CacheMissError) as info:
            run(loader)
    err = info.value
    assert err.missing_keys == [] and sorted(err.rejected) == sorted([corrupt, foreign])
    assert "sha256 mismatch" in err.rejected[corrupt]
    assert "other-gpu" in err.rejected[foreign]
    for key, why in err.rejected.items():
        assert f"{key}  compile[" in str(err) and why in str(err)
    assert {k: store.read_raw(k) for k in keys} == raw  # "error" deletes nothing either


def test_rejected_and_missing_are_listed_together(tmp_path: Path) -> None:
    cfg, store, keys = warmed(tmp_path)
    store.delete(keys[0])
    store.write_raw(keys[1], b"garbage")
    loader = node(cfg, tmp_path, "gpu", on_miss="error")
    with loader.counter.expect(num_backend_compilations=0):
        with pytest.raises(vcr.CacheMissError) as info:
            run(loader)
    assert info.value.missing_keys == [keys[0]] and list(info.value.rejected) == [keys[1]]
    assert f"{keys[0]}  compile[" in str(info.value) and "missing" in str(info.value)


def test_a_miss_of_everything_names_the_environment_the_cache_holds_the_model_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A rank whose environment the warm never ran in (another torch, another GPU) misses every
    key; the error says which environment the cache holds the model for and what differs."""
    cfg = vcr.CompilationConfig(compile_sizes=[2], **EAGER, on_miss="error",
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage")))
    there = {"torch": "2.11.0+cu130", "device_type": "cuda", "device_name": "NVIDIA H200"}
    row = manifest.make_row(key="a" * 64, model="llama-tiny", tp_size=1, piece="p", shape=2,
                            bytes=1, sha256="0" * 64, compile_seconds=1.0, node="n",
                            torch=there["torch"], fingerprint=there,
                            fingerprint_id="0123456789abcdef")
    manifest.update_manifest(vcr.open_store(cfg), "llama-tiny", "0123456789abcdef", [row])
    loader = vcr.compile(tiny(), cfg, model_name="llama-tiny")
    with pytest.raises(vcr.CacheMissError) as info:
        run(loader)
    message = str(info.value)
    assert "holds llama-tiny warmed in 1 other environment(s)" in message
    assert "fingerprint 0123456789abcdef" in message
    assert f"torch: 2.11.0+cu130 there, {torch.__version__} here" in message
    assert "device_type: cuda there, cpu here" in message
    other = vcr.compile(tiny(), cfg, model_name="another-model")  # nothing of it anywhere
    with pytest.raises(vcr.CacheMissError) as info:
        run(other)
    assert "other environment" not in str(info.value)
    # Under a compiling policy the rank compiles, and the log says why nothing served.
    with caplog.at_level(logging.WARNING, logger="vllm_compile_ray.runtime.backend"):
        run(vcr.compile(tiny(), cfg.replace(on_miss="compile"), model_name="llama-tiny"))
    assert any("none of llama-tiny's" in r.message and "torch: 2.11.0+cu130 there" in r.message
               for r in caplog.records)


@pytest.mark.parametrize("model_name, advice", [
    ("<model>", "vcr warm --model package.module:function --sizes 2 --cache file://"),
    ("LlamaForCausalLM", "vcr warm --model package.module:function --sizes 2 --cache file://"),
    ("llama-tiny", "vcr warm --model llama-tiny --sizes 2 --cache file://"),
    ("mypkg.serve:build", "vcr warm --model mypkg.serve:build --sizes 2 --cache file://"),
    ("/ckpt/qwen3/config.json", "vcr warm --model /ckpt/qwen3/config.json --sizes 2"),
])
def test_miss_advice_warms_a_model_vcr_warm_can_build(tmp_path: Path, model_name: str,
                                                      advice: str) -> None:
    """A module passed in ("<model>", its class name) is no preset: the advice names an entry
    point or a config.json, not `vcr warm --model <model>`."""
    cfg = vcr.CompilationConfig(compile_sizes=[2], on_miss="error", **EAGER,
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage")))
    loader = vcr.compile(tiny(), cfg, model_name=model_name)
    with loader.counter.expect(num_backend_compilations=0):
        with pytest.raises(vcr.CacheMissError) as info:
            run(loader)
    message = str(info.value)
    assert advice in message, message
    runnable = model_name not in ("<model>", "LlamaForCausalLM")
    assert (f"--model {model_name} " in message) == runnable, message
    entry_point_advice = "package.module:function" in message and "/path/to/config.json" in \
        message and "model_name=NAME" in message
    assert entry_point_advice != runnable, message


def _failing_load(*args, **kwargs):
    raise MemoryError("CUDA out of memory (injected by the test)")


def test_load_failure_keeps_the_shared_artifact(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, store, keys = warmed(tmp_path)
    raw = {k: store.read_raw(k) for k in keys}
    monkeypatch.setattr(EagerAdaptor, "load", _failing_load)
    strict = node(cfg, tmp_path, "oom-strict", on_miss="error")
    with strict.counter.expect(num_backend_compilations=0, num_artifacts_rejected=6):
        with pytest.raises(vcr.CacheMissError) as info:
            run(strict)
    assert sorted(info.value.rejected) == sorted(keys)
    assert all("could not load (MemoryError: CUDA out of memory" in why
               for why in info.value.rejected.values())
    # compile_and_publish, the policy that replaces verified-bad objects, compiles locally and
    # leaves the objects alone: they are fine, this process is not.
    oom = node(cfg, tmp_path, "oom")
    with oom.counter.expect(num_artifacts_rejected=6, num_backend_compilations=6,
                            num_artifacts_deleted=0, num_artifacts_saved=0):
        run(oom)
    assert {k: store.read_raw(k) for k in keys} == raw
    monkeypatch.undo()
    other = node(cfg, tmp_path, "gpu", on_miss="error")
    with other.counter.expect(num_artifacts_loaded=6, num_backend_compilations=0,
                              num_artifacts_rejected=0):
        run(other)


@pytest.mark.parametrize("damage", ["corrupt", "foreign"])
def test_verified_mismatch_is_deleted_counted_and_replaced(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cfg, store, keys = warmed(tmp_path)
    key = keys[0]
    if damage == "corrupt":
        blob = store.read_raw(key)
        store.write_raw(key, blob[:-1] + bytes([blob[-1] ^ 1]))
    else:
        art = store.fetch(key)
        store.write_raw(key, encode_artifact(key, art.payload, {**art.meta, "fingerprint": "x"}))
    loader = node(cfg, tmp_path, "gpu")  # compile_and_publish
    with loader.counter.expect(num_artifacts_rejected=1, num_artifacts_deleted=1,
                               num_backend_compilations=1, num_artifacts_saved=1):
        run(loader)
    deleted = [r.getMessage() for r in caplog.records if "deleted artifact" in r.getMessage()]
    assert len(deleted) == 1 and key in deleted[0]
    assert ("sha256 mismatch" if damage == "corrupt" else "fingerprint") in deleted[0]
    assert store.fetch(key).meta["fingerprint"] == loader.backend.key_context.fingerprint_id
    again = node(cfg, tmp_path, "gpu2", on_miss="error")
    with again.counter.expect(num_artifacts_loaded=6, num_artifacts_rejected=0):
        run(again)


def test_load_counts_a_corrupt_artifact_once(tmp_path: Path) -> None:
    """vcr.load fetches through SharedStaging: its batch and the manager saw the same rejection."""
    cfg, store, keys = warmed(tmp_path)
    store.write_raw(keys[0], b"garbage")
    compiled = vcr.load(tiny(), cfg.replace(compile_sizes=(2,))
                        .with_cache(staging_dir=str(tmp_path / "stage-gpu")))
    c = compiled.counter
    assert (c.num_artifacts_rejected, c.num_artifacts_deleted, c.num_artifacts_saved) == (1, 1, 1)
    assert compiled.report.rejected == 1
