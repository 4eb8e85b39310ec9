"""compile() end to end with the EagerAdaptor: cache round trips across processes, dispatch,
miss policies, and clear errors for bad input. (Real Inductor: test_inductor_cache.py.)"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vllm_compile_ray as vcr
from vllm_compile_ray.runtime.manager import LoadedPiece
from vllm_compile_ray.runtime.piece_runner import PieceRunner

SCRIPT = Path(__file__).parent / "scripts" / "run_model.py"
EAGER = dict(backend="eager", use_inductor=False)


def run_model(config: vcr.CompilationConfig, tmp_path: Path, sizes: str = "1,3,4,9",
              env: dict | None = None) -> dict:
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.json"
    subprocess.run([sys.executable, str(SCRIPT), config.to_json(), str(out), sizes], check=True,
                   env=env, timeout=600)
    return json.loads(out.read_text())


def tiny(num_layers: int = 4):
    return vcr.models.build("llama-tiny", num_layers=num_layers, seed=0)


def inputs(n: int):
    return torch.randint(0, 512, (n,)), torch.arange(n)


def test_second_process_compiles_nothing(tmp_path: Path) -> None:
    cfg = vcr.CompilationConfig(compile_sizes=[1, 4], **EAGER,
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage-a")))
    first = run_model(cfg, tmp_path)
    assert first["counter"]["num_backend_compilations"] == 9  # 3 unique pieces x 3 shapes
    assert first["counter"]["num_artifacts_saved"] == 9
    second = run_model(cfg.with_cache(staging_dir=str(tmp_path / "stage-b")), tmp_path)
    assert second["keys"] == first["keys"]
    assert second["counter"]["num_backend_compilations"] == 0
    assert second["counter"]["num_cache_hits"] == 9
    assert second["counter"]["num_artifacts_loaded"] == 9
    assert all(d == 0.0 for d in second["max_abs_diff"].values())


def test_dispatch_exact_then_dynamic_then_fallback(tmp_path: Path) -> None:
    model = tiny()
    cfg = vcr.CompilationConfig(compile_sizes=[4], **EAGER,
                                cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, cfg)
    compiled(*inputs(4))
    runner = next(iter(compiled.backend.runners.values()))
    assert runner.select(4) is runner.static[4]
    assert runner.select(7) is runner.dynamic
    # A dynamic artifact guarded to >= 2 (as Inductor's are) leaves size 1 to the fallback.
    runner.dynamic = LoadedPiece("k", "dynamic", runner.dynamic.fn, (2, None), "store")
    assert runner.select(1) is None
    with compiled.counter.expect(num_fallback_eager_calls=1):
        out = runner(*[torch.zeros(1, dtype=torch.long) if i == 0 else a for i, a in enumerate(
            _piece_args(runner, 1))])
    assert isinstance(out, torch.Tensor) or isinstance(out, tuple)


def _piece_args(runner: PieceRunner, n: int) -> list:
    from vllm_compile_ray.torch_private.inductor import example_tensors
    return example_tensors(runner.piece.input_specs, n, "cpu")


def test_fallback_compile_on_demand(tmp_path: Path) -> None:
    model = tiny(2)
    cfg = vcr.CompilationConfig(compile_sizes=[4], compile_dynamic=False, fallback="compile",
                                **EAGER, cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, cfg)
    ids, pos = inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    with compiled.counter.expect(num_on_demand_compiles=3):  # 3 unique pieces at size 5
        ids, pos = inputs(5)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos))


def test_eager_fallback_when_no_artifact_covers_the_size(tmp_path: Path) -> None:
    model = tiny(2)
    cfg = vcr.CompilationConfig(compile_sizes=[4], compile_dynamic=False, **EAGER,
                                cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, cfg)
    compiled(*inputs(4))
    with compiled.counter.expect(num_fallback_eager_calls=3, num_backend_compilations=0):
        ids, pos = inputs(6)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos))


def test_on_miss_policies(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    base = vcr.CompilationConfig(compile_sizes=[2], **EAGER, cache=vcr.CacheConfig(cache_dir=cache))
    with pytest.raises(vcr.CacheMissError) as info:
        vcr.compile(tiny(2), base.replace(on_miss="error"), model_name="llama-tiny")(*inputs(2))
    assert len(info.value.missing_keys) == 6
    assert "vcr warm --model llama-tiny --sizes 2" in str(info.value)
    assert info.value.missing_keys[0] in str(info.value)

    eager = vcr.compile(tiny(2), base.replace(on_miss="eager"))
    eager(*inputs(2))
    assert eager.counter.num_cache_misses == 6 and eager.counter.num_backend_compilations == 0
    assert eager.counter.num_fallback_eager_calls == 3

    local = vcr.compile(tiny(2), base.replace(on_miss="compile"))
    local(*inputs(2))
    assert local.counter.num_backend_compilations == 6 and local.counter.num_artifacts_saved == 0

    published = vcr.compile(tiny(2), base.replace(on_miss="compile_and_publish"))
    published(*inputs(2))
    assert published.counter.num_artifacts_saved == 6
    again = vcr.compile(tiny(2), base.replace(on_miss="error"))
    again(*inputs(2))
    assert again.counter.num_backend_compilations == 0 and again.counter.num_cache_hits == 6


def test_disable_compile_cache_never_touches_the_store(tmp_path: Path) -> None:
    cfg = vcr.CompilationConfig(compile_sizes=[2], disable_compile_cache=True, **EAGER,
                                cache=vcr.CacheConfig(cache_dir=str(tmp_path / "c")))
    compiled = vcr.compile(tiny(2), cfg)
    compiled(*inputs(2))
    assert compiled.counter.num_artifacts_saved == 0 and not (tmp_path / "c").exists()


def test_dynamo_once_compiles_the_whole_graph(tmp_path: Path) -> None:
    cfg = vcr.CompilationConfig(compile_sizes=[2], compilation_level="dynamo_once", **EAGER,
                                cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    model = tiny(2)
    compiled = vcr.compile(model, cfg)
    ids, pos = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    assert len(compiled.plan.pieces) == 1 and compiled.counter.num_backend_compilations == 2


def test_rejected_foreign_artifact_is_recompiled(tmp_path: Path) -> None:
    cfg = vcr.CompilationConfig(compile_sizes=[2], **EAGER,
                                cache=vcr.CacheConfig(cache_dir=str(tmp_path / "c")))
    first = vcr.compile(tiny(2), cfg)
    first(*inputs(2))
    store = vcr.open_store(cfg)
    key = first.plan.pieces[0].keys[2]
    art = store.fetch(key)
    store.delete(key)
    store.publish(key, art.payload, {**art.meta, "fingerprint": "another-gpu"})
    second = vcr.compile(tiny(2), cfg.replace(on_miss="compile"))
    with second.counter.expect(num_artifacts_rejected=1, num_backend_compilations=1):
        second(*inputs(2))
    assert store.fetch(key).meta["fingerprint"] == "another-gpu"  # "compile" publishes nothing
    third = vcr.compile(tiny(2), cfg)  # compile_and_publish replaces the foreign artifact
    with third.counter.expect(num_artifacts_rejected=1, num_artifacts_saved=1):
        third(*inputs(2))
    assert store.fetch(key).meta["fingerprint"] == third.backend.key_context.fingerprint_id
    fourth = vcr.compile(tiny(2), cfg.replace(on_miss="error"))
    with fourth.counter.expect(num_artifacts_rejected=0, num_backend_compilations=0):
        fourth(*inputs(2))


# ---- bad input gets a clear error ----

def test_unknown_preset() -> None:
    with pytest.raises(vcr.UnknownModelError, match="llama-tiny"):
        vcr.models.build("llama-9000")


def test_unreachable_s3_cache_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {"key": "k", "secret": "s",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    cfg = vcr.CompilationConfig(cache=vcr.CacheConfig(cache_dir="s3://bucket/vcr", store_timeout_s=2,
                                                      storage_options=options))
    with pytest.raises(vcr.StoreUnavailableError, match="s3://bucket/vcr"):
        vcr.compile(tiny(1), cfg)


def test_missing_bucket_is_a_clear_error(s3_bucket: str, s3_store_options: dict) -> None:
    cfg = vcr.CompilationConfig(cache=vcr.CacheConfig(cache_dir="s3://no-such-bucket/vcr",
                                                      storage_options=s3_store_options))
    with pytest.raises(vcr.StoreError, match="no-such-bucket.*does not exist"):
        vcr.compile(tiny(1), cfg)


def test_unwritable_local_cache(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cfg = vcr.CompilationConfig(cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/file/cache"))
    with pytest.raises(vcr.StorePermissionError, match="file/cache"):
        vcr.compile(tiny(1), cfg)


def test_unknown_protocol() -> None:
    cfg = vcr.CompilationConfig(cache=vcr.CacheConfig(cache_dir="nosuch://bucket/x"))
    with pytest.raises(vcr.ConfigError, match="unknown protocol 'nosuch'"):
        vcr.compile(tiny(1), cfg)


def test_meta_model_cannot_be_compiled() -> None:
    with pytest.raises(ValueError, match="plan_model"):
        vcr.compile(vcr.models.build("llama-tiny", device="meta"))
