"""Real Inductor through a real S3-compatible server: process A compiles every unique
(piece, shape) of llama-tiny and publishes; a fresh process B, on another "node" (own staging dir,
own Inductor cache dir), loads them all with zero compiles and matches eager."""

import os
from pathlib import Path

import pytest

import vllm_compile_ray as vcr
from test_compile import run_model

pytestmark = pytest.mark.inductor


def test_process_b_loads_everything_from_s3_with_zero_compiles(
        tmp_path: Path, s3_bucket: str, s3_store_options: dict) -> None:
    cfg = vcr.CompilationConfig(compile_sizes=[4],
                                cache=vcr.CacheConfig(cache_dir=f"s3://{s3_bucket}/vcr",
                                                      storage_options=s3_store_options,
                                                      staging_dir=str(tmp_path / "a")))
    a = run_model(cfg, tmp_path)
    assert a["summary"]["unique_pieces"] == 3
    assert a["counter"]["num_inductor_compiles"] == 6  # 3 unique pieces x (dynamic, 4)
    assert a["counter"]["num_artifacts_saved"] == 6

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-b")}
    b = run_model(cfg.with_cache(staging_dir=str(tmp_path / "b")), tmp_path, env=env)
    assert b["keys"] == a["keys"]
    assert b["counter"]["num_inductor_compiles"] == 0
    assert b["counter"]["num_backend_compilations"] == 0
    assert b["counter"]["num_artifacts_loaded"] == 6
    assert b["inductor_counters"].get("fxgraph_cache_miss", 0) == 0  # Inductor made no code either
    # sizes 3 and 9 run the dynamic artifact, 4 its own, 1 (below the guard s0 >= 2) falls back
    for size, diff in b["max_abs_diff"].items():
        assert diff < 1e-4, (size, diff)
    assert b["counter"]["num_fallback_eager_calls"] == 5
