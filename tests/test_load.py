"""load(): a TP rank's startup from the shared cache.

Tiers: pure (keys per rank, device guard, report); in-process through a moto S3 server (miss
policies, node-shared staging); real 2-rank TP runs over gloo (EagerAdaptor, then Inductor); one
real local Ray for the stats push.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vllm_compile_ray as vcr
from vllm_compile_ray.cache.staging import SharedStaging
from vllm_compile_ray.cache.store import ArtifactStore
from vllm_compile_ray.errors import ConfigError
from vllm_compile_ray.runtime.load import (StartupReport, check_device, format_reports, push_report,
                                   rank_device_env)

EAGER = dict(backend="eager", use_inductor=False)
SIZES = (3, 4, 7)  # 4: static artifact; 3, 7: the dynamic one


def s3_config(bucket: str, options: dict, staging: Path, **kw) -> vcr.CompilationConfig:
    opts = {**options, "config_kwargs": {"connect_timeout": 5, "read_timeout": 10,
                                         "retries": {"max_attempts": 1}}}
    cache = vcr.CacheConfig(cache_dir=f"s3://{bucket}/cache-{uuid.uuid4().hex[:8]}",
                            storage_options=opts, staging_dir=str(staging), store_timeout_s=10)
    return vcr.CompilationConfig(**kw, cache=cache)


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(0, 512, (n,), generator=g), torch.arange(n)


def fill(cfg: vcr.CompilationConfig, num_layers: int, tp_size: int = 2) -> list[str]:
    """Warm the cache the way a warm job would: compile at rank 0 and publish (keys carry no
    rank, so one rank's artifacts serve all)."""
    model = vcr.models.build("llama-tiny", tp_size=tp_size, rank=0, num_layers=num_layers)
    compiled = vcr.compile(model, cfg.replace(on_miss="compile_and_publish"),
                           model_name="llama-tiny")
    compiled(*inputs(4))
    assert compiled.counter.num_artifacts_saved == len(compiled.plan.keys)
    return compiled.plan.keys


# ------------------------------------------------------------------------------------ pure tier


def test_ranks_compute_identical_keys() -> None:
    cfg = vcr.CompilationConfig(compile_sizes=[1, 4], **EAGER)
    plans = [vcr.plan_model(vcr.models.build("llama-tiny", tp_size=2, rank=r, device="meta"),
                            cfg, device_type="cpu") for r in range(2)]
    assert plans[0].keys == plans[1].keys and len(plans[0].keys) == 9


def test_a_rank_traces_at_the_size_the_warm_plans_at() -> None:
    """Not at 1 token (dynamo specializes what broadcasts over it); a static size nearest the
    plan's when no artifact takes the plan's size."""
    from vllm_compile_ray import CompilationConfig
    from vllm_compile_ray.runtime.api import PLAN_TOKENS
    from vllm_compile_ray.runtime.load import trace_size

    assert trace_size(CompilationConfig(compile_sizes=[1, 2, 4])) == PLAN_TOKENS == 8
    static = dict(compile_dynamic=False)
    assert trace_size(CompilationConfig(compile_sizes=[1, 4, 16], **static)) == 4
    assert trace_size(CompilationConfig(compile_sizes=[1, 8, 64], **static)) == 8
    assert trace_size(CompilationConfig(compile_sizes=[1, 12, 4], **static)) == 4
    assert trace_size(CompilationConfig(compile_sizes=[1], **static)) == 1


def test_device_check_and_rank_env() -> None:
    check_device(torch.device("cuda:3"))  # artifacts are retargeted to any GPU index
    with pytest.raises(ConfigError, match="meta"):
        check_device(torch.device("meta"))
    assert rank_device_env(1) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert rank_device_env(1, "4,6") == {"CUDA_VISIBLE_DEVICES": "6"}
    with pytest.raises(ConfigError, match="local_rank=2"):
        rank_device_env(2, "4,6")


def test_rank_arguments_are_checked(tmp_path: Path) -> None:
    model = vcr.models.build("llama-tiny", tp_size=2, rank=1, num_layers=1)
    cfg = vcr.CompilationConfig(**EAGER, cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.rank=1"):
        vcr.load(model, cfg, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="model.tp_size=2"):
        vcr.load(model, cfg, rank=1, world_size=4)
    with pytest.raises(ConfigError, match="must be < world_size"):
        vcr.load(model, cfg, rank=2, world_size=2)


def test_report_table_and_round_trip() -> None:
    reports = [StartupReport(rank=r, model="llama-tiny", tasks=9, hits=9, pieces=3, key_s=0.003,
                             fetch_s=0.009, warm_sizes=(4, 2)) for r in (1, 0)]
    table = format_reports(reports)
    lines = table.splitlines()
    assert "llama-tiny" in lines[0] and "fetch(s)" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["0", "1"]
    data = reports[0].to_dict()
    assert data["key_ms_per_piece"] == pytest.approx(1.0) and data["lookup_ms_per_key"] == 1.0
    assert StartupReport.from_dict(data) == reports[0]
    # with the warm job's manifest, the lookup is the manifest read, not the data transfer
    listed = StartupReport(tasks=9, fetch_s=0.9, lookup_s=0.018, manifest_keys=9)
    assert listed.lookup_ms_per_key == pytest.approx(2.0)
    assert push_report(reports[0]) is False  # no Ray in this process: nothing to push to


def test_kernel_work_counts_what_startup_compiles_and_tunes() -> None:
    """The names `inductor_metrics.kernel_work` counts are Inductor's (a moved timer fails here); the
    GPU-only events are recorded through the same timer and counter Inductor uses. Triton is
    not on the CPU image: its listener is checked on its own. (A real C++ build is counted in
    test_tp2_ranks_pull_inductor_artifacts.)"""
    import inspect

    from torch._dynamo.utils import counters, dynamo_timed
    from torch._inductor import cpp_builder
    from torch._inductor.runtime import triton_heuristics

    from vllm_compile_ray.torch_private import inductor_metrics

    for name in inductor_metrics._AUTOTUNE_TIMERS:
        assert f'"{name}"' in inspect.getsource(triton_heuristics), name
    from torch._inductor import select_algorithm
    assert f'f"{{name}}{inductor_metrics._GEMM_AUTOTUNE_TIMER_SUFFIX}"' in inspect.getsource(select_algorithm)
    for name in inductor_metrics._KERNEL_BUILD_TIMERS:
        assert f'dynamo_timed("{name}")' in inspect.getsource(cpp_builder), name
    from torch._inductor import codecache
    assert codecache._precompile_header.cache_info  # a functools.cache: its misses are counted
    with inductor_metrics.kernel_work() as work:
        for name in inductor_metrics._AUTOTUNE_TIMERS:
            with dynamo_timed(name):
                pass
        with dynamo_timed("mm_template_autotuning"):  # a GEMM autotune
            pass
        # a cache hit replays the counters of its compile: not work done here
        counters["inductor"]["select_algorithm_autotune"] += 63
    assert work == {"kernel_compiles": 0, "autotunes": 3}
    with inductor_metrics.kernel_work() as nothing:
        pass
    assert nothing == {"kernel_compiles": 0, "autotunes": 0}
    seen = []
    listener = inductor_metrics._TritonCompiles(lambda **kw: seen.append(kw["cache_hit"]))
    listener(src=None, cache_hit=True)
    listener(src=None, cache_hit=False)
    assert listener.count == 1 and seen == [True, False]  # misses counted, the one before called


# ------------------------------------------------------------------- in-process, moto S3 cache


def test_miss_policies_error_then_publish_then_nothing(tmp_path: Path, s3_bucket: str,
                                                       s3_store_options: dict) -> None:
    model = vcr.models.build("llama-tiny", num_layers=2)
    cfg = s3_config(s3_bucket, s3_store_options, tmp_path / "stage-a", compile_sizes=[4], **EAGER)

    counter = vcr.CompilationCounter()
    with pytest.raises(vcr.CacheMissError) as info:
        vcr.load(model, cfg.replace(on_miss="error"), model_name="llama-tiny", counter=counter)
    message, missing = str(info.value), info.value.missing_keys
    assert len(missing) == 6  # 3 unique pieces x (dynamic, 4)
    assert all(key in message for key in missing)
    assert f"vcr warm --model llama-tiny --sizes 4 --cache {cfg.cache.cache_dir}" in message
    assert counter.num_backend_compilations == 0

    first = vcr.load(model, cfg.replace(on_miss="compile_and_publish"), model_name="llama-tiny")
    r = first.report
    assert (r.misses, r.compiles, r.hits, r.tasks) == (6, 6, 0, 6)
    assert first.counter.num_artifacts_saved == 6

    # A second start on another node (fresh staging dir): everything from the store.
    cfg_b = cfg.replace(on_miss="error").with_cache(staging_dir=str(tmp_path / "stage-b"))
    second = vcr.load(model, cfg_b, model_name="llama-tiny")
    r = second.report
    assert (r.misses, r.compiles, r.hits, r.downloaded, r.staged) == (0, 0, 6, 6, 0)
    assert r.keys_id == first.report.keys_id and r.bytes_loaded > 0
    assert r.warm_sizes == (8, 4)  # trace at 8 (the dynamic artifact), then the static size
    # A restart on that node reads its staging dir and downloads nothing.
    third = vcr.load(model, cfg_b, model_name="llama-tiny")
    assert (third.report.downloaded, third.report.staged, third.report.compiles) == (0, 6, 0)
    assert third.counter.num_cache_hits_staging == 6
    for n in SIZES:
        torch.testing.assert_close(third(*inputs(n)), model(*inputs(n)), rtol=0, atol=0)
    with third.counter.expect(num_backend_compilations=0, num_fallback_eager_calls=0):
        third(*inputs(5))


def test_on_miss_eager_runs_eagerly_and_counts(tmp_path: Path, s3_bucket: str,
                                               s3_store_options: dict) -> None:
    model = vcr.models.build("llama-tiny", num_layers=2)
    cfg = s3_config(s3_bucket, s3_store_options, tmp_path / "stage", compile_sizes=[4],
                    on_miss="eager", **EAGER)
    compiled = vcr.load(model, cfg, model_name="llama-tiny")
    r = compiled.report
    assert (r.misses, r.compiles, r.hits) == (6, 0, 0)
    assert r.eager_fallbacks == 6  # the trace call at 8 and the warm-up at 4: 3 pieces each
    with compiled.counter.expect(num_fallback_eager_calls=3, num_backend_compilations=0):
        out = compiled(*inputs(7))
    torch.testing.assert_close(out, model(*inputs(7)), rtol=0, atol=0)
    store = ArtifactStore(cfg.cache.cache_dir, cfg.cache.storage_options)
    # no compiled piece: only the traced model (`aot`), which skips the next rank's trace
    assert [store.fetch(k).meta["kind"] for k in store.list_keys()] == ["dynamo"]


def test_on_miss_compile_compiles_locally_without_publishing(tmp_path: Path) -> None:
    model = vcr.models.build("llama-tiny", num_layers=1)
    cfg = vcr.CompilationConfig(compile_sizes=[4], on_miss="compile", **EAGER,
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage")))
    r = vcr.load(model, cfg).report
    assert (r.misses, r.compiles) == (r.tasks, r.tasks)
    assert ArtifactStore(cfg.cache.cache_dir).list_keys() == []


def test_a_rank_warms_sizes_past_the_models_positions(tmp_path: Path) -> None:
    """A compile size past max_position_embeddings (llama-tiny: 256) is a batch of several
    sequences, as vLLM batches tokens: the rank's calls at that size keep positions in range."""
    model = vcr.models.build("llama-tiny", num_layers=1)
    cfg = vcr.CompilationConfig(compile_sizes=[1, 512], on_miss="compile", **EAGER,
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage")))
    r = vcr.load(model, cfg).report
    assert 512 in r.warm_sizes
    assert (r.misses, r.compiles) == (r.tasks, r.tasks)


def test_a_rank_starts_with_the_collector_paused_but_its_compiles_collect(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Automatic collection is off while a rank loads its pieces (each full pass walks every
    object of the process), on while one compiles, and back on after the startup."""
    import gc

    from vllm_compile_ray.compiling.compiler_interface import EagerAdaptor

    collecting: dict[str, list[bool]] = {"compile": [], "load": []}
    for name in collecting:
        def noting(self, *args, _name=name, _fn=getattr(EagerAdaptor, name), **kwargs):
            collecting[_name].append(gc.isenabled())
            return _fn(self, *args, **kwargs)
        monkeypatch.setattr(EagerAdaptor, name, noting)
    cfg = vcr.CompilationConfig(compile_sizes=[4], on_miss="compile_and_publish", **EAGER,
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage")))
    assert vcr.load(vcr.models.build("llama-tiny", num_layers=1), cfg).report.compiles > 0
    assert collecting["compile"] and all(collecting["compile"])
    assert gc.isenabled()
    collecting["load"].clear()
    report = vcr.load(vcr.models.build("llama-tiny", num_layers=1),
                      cfg.replace(on_miss="error")).report
    assert report.hits == report.tasks > 0
    assert len(collecting["load"]) == report.tasks and not any(collecting["load"])
    assert gc.isenabled()


def test_importing_the_package_leaves_the_collector_as_it_was() -> None:
    """The import pauses the collector for its own imports only."""
    import subprocess
    import sys

    for before, want in (("", "True"), ("gc.disable(); ", "False")):
        code = f"import gc; {before}import vllm_compile_ray; print(gc.isenabled())"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, timeout=300)
        assert done.stdout.split()[-1] == want


def test_manifest_keys_are_fetched_while_tracing(tmp_path: Path) -> None:
    manifest = pytest.importorskip("vllm_compile_ray.cache.manifest")
    model = vcr.models.build("llama-tiny", tp_size=2, rank=1, num_layers=2)
    cfg = vcr.CompilationConfig(compile_sizes=[4], on_miss="error", **EAGER,
                                cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                      staging_dir=str(tmp_path / "stage")))
    warm = vcr.compile(model, cfg.replace(on_miss="compile_and_publish")
                       .with_cache(staging_dir=str(tmp_path / "warm")))
    warm(*inputs(4))
    plan, store = warm.plan, ArtifactStore(cfg.cache.cache_dir)
    fp_id = plan.key_context.fingerprint_id
    rows = [manifest.make_row(key=t.key, model="llama-tiny", tp_size=2, piece=t.code_id,
                              shape=t.shape, bytes=1, sha256="", compile_seconds=0.0, node="n",
                              torch=torch.__version__, fingerprint={}, fingerprint_id=fp_id)
            for t in plan.tasks()]
    other = dict(rows[0], key="ab" * 32, shape="16")  # a shape this config does not use
    manifest.update_manifest(store, "llama-tiny", fp_id, rows + [other])

    r = vcr.load(model, cfg, rank=1, world_size=2, model_name="llama-tiny").report
    assert (r.manifest_keys, r.prefetched_unused, r.hits, r.downloaded) == (6, 0, 6, 6)
    assert 0 < r.lookup_s < 10 and r.lookup_ms_per_key == pytest.approx(1e3 * r.lookup_s / 6)


# ---------------------------------------------------------------------- node-shared staging


def _published(tmp_path: Path, n: int = 2) -> tuple[ArtifactStore, list[str]]:
    remote = ArtifactStore(f"file://{tmp_path}/remote", staging_dir=str(tmp_path / "publisher"))
    keys = [f"{i:02x}" * 32 for i in range(1, n + 1)]
    for key in keys:
        remote.publish(key, os.urandom(4096), {"shape": 4})
    return ArtifactStore(remote.url, staging_dir=str(tmp_path / "node")), keys


def test_second_rank_waits_and_reuses_the_staged_download(tmp_path: Path) -> None:
    store, keys = _published(tmp_path)
    rank0, rank1 = SharedStaging(store), SharedStaging(ArtifactStore(store.url,
                                                                    staging_dir=store.staging_dir))
    # rank0 is mid-download of keys[0]: it holds that key's lock.
    import fcntl
    os.makedirs(os.path.dirname(rank0.lock_path(keys[0])), exist_ok=True)
    fd = os.open(rank0.lock_path(keys[0]), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(rank1.fetch_many(keys)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "rank1 must wait for the key rank0 is downloading"
    assert rank1.stats.downloaded == 1  # the free key went out at once, in the first batch
    rank0.store.fetch(keys[0])  # rank0's download lands in the shared staging dir
    os.close(fd)
    waiter.join(10)
    assert sorted(result) == keys
    assert (rank1.stats.downloaded, rank1.stats.staged, rank1.stats.waited) == (1, 1, 1)


def test_crashed_download_is_never_taken_for_a_valid_file(tmp_path: Path) -> None:
    store, keys = _published(tmp_path, 1)
    staged = store._staged_path(keys[0])
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    Path(staged + ".tmp-crashed.part").write_bytes(b"half")  # a temp file a crash left behind
    Path(staged).write_bytes(store.read_raw(keys[0])[:100])  # a truncated copy, worst case
    staging = SharedStaging(store)
    found = staging.fetch_many(keys)
    assert list(found) == keys and len(found[keys[0]].payload) == 4096
    assert (staging.stats.downloaded, staging.stats.staged) == (1, 0)
    again = SharedStaging(store)
    again.fetch_many(keys)
    assert (again.stats.downloaded, again.stats.staged) == (0, 1)


# ------------------------------------------------------------------- real 2-rank TP over gloo


def _tp_rank(rank: int, world: int, cfg_json: str, num_layers: int, out_dir: str,
             fresh_cache_rank: int = -1) -> None:
    if rank == fresh_cache_rank:  # an Inductor cache without the kernels the fill built
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(out_dir, f"inductor-{rank}")
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank,
                            world_size=world)
    try:
        cfg = vcr.CompilationConfig.from_json(cfg_json)
        model = vcr.models.build("llama-tiny", tp_size=world, rank=rank, num_layers=num_layers)
        compiled = vcr.load(model, cfg, rank=rank, world_size=world, model_name="llama-tiny")
        with torch.no_grad():
            eager = {n: model(*inputs(n)) for n in SIZES}  # all_reduce live: the eager TP run
        before = compiled.counter.clone()
        outs = {n: compiled(*inputs(n)) for n in SIZES}
        torch.save({"report": compiled.report.to_dict(), "counter": compiled.counter.to_dict(),
                    "serve": compiled.counter.diff(before), "eager": eager, "out": outs},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_tp(cfg: vcr.CompilationConfig, num_layers: int, tmp_path: Path, keys: list[str],
            fresh_cache_rank: int = -1) -> list[dict]:
    mp.spawn(_tp_rank, args=(2, cfg.to_json(), num_layers, str(tmp_path), fresh_cache_rank),
             nprocs=2)
    ref = vcr.models.build("llama-tiny", num_layers=num_layers)  # tp=1 equals the TP run
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, res in enumerate(results):
        rep, counter = res["report"], res["counter"]
        assert rep["rank"] == rank and rep["tasks"] == len(keys)
        assert counter["num_backend_compilations"] == 0, (rank, counter)
        assert counter["num_inductor_compiles"] == counter["num_eager_compiles"] == 0
        assert (rep["misses"], rep["hits"], rep["eager_fallbacks"]) == (0, len(keys), 0)
        assert res["serve"].get("num_fallback_eager_calls", 0) == 0
        for n in SIZES:
            torch.testing.assert_close(res["out"][n], res["eager"][n], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(res["out"][n], ref(*inputs(n)), atol=1e-5, rtol=1e-4)
    assert results[0]["report"]["keys_id"] == results[1]["report"]["keys_id"]
    # One node, one staging dir: each artifact downloaded once, the other rank found it staged.
    assert sum(r["report"]["downloaded"] for r in results) == len(keys)
    assert sum(r["report"]["staged"] for r in results) == len(keys)
    return [r["report"] for r in results]


def test_tp2_ranks_pull_from_s3_and_compile_nothing(tmp_path: Path, s3_bucket: str,
                                                    s3_store_options: dict) -> None:
    cfg = s3_config(s3_bucket, s3_store_options, tmp_path / "node-stage", compile_sizes=[4],
                    on_miss="error", **EAGER)
    keys = fill(cfg.with_cache(staging_dir=str(tmp_path / "warm-stage")), num_layers=2)
    reports = _run_tp(cfg, 2, tmp_path, keys)
    assert [(r["kernel_compiles"], r["autotunes"]) for r in reports] == [(0, 0), (0, 0)]


@pytest.mark.inductor
def test_tp2_ranks_pull_inductor_artifacts(tmp_path: Path, s3_bucket: str,
                                           s3_store_options: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")  # faster on 2 cores (NOTES)
    cfg = s3_config(s3_bucket, s3_store_options, tmp_path / "node-stage", compile_sizes=[4],
                    on_miss="error")
    keys = fill(cfg.with_cache(staging_dir=str(tmp_path / "warm-stage")), num_layers=1)
    assert len(keys) == 4  # 2 pieces x (dynamic, 4)
    reports = _run_tp(cfg, 1, tmp_path, keys, fresh_cache_rank=1)
    # CPU artifacts carry C++ source, not the built kernels: rank 0 finds them in the Inductor
    # cache the fill built them in, rank 1 (a cache of its own, as on another node) builds them
    # again at startup, and its report counts it. Nothing autotunes on CPU.
    assert reports[0]["kernel_compiles"] == 0 and reports[1]["kernel_compiles"] > 0, reports
    assert reports[0]["autotunes"] == reports[1]["autotunes"] == 0


# ------------------------------------------------------------------------------ real Ray


@pytest.mark.ray
def test_report_reaches_the_stats_actor(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from vllm_compile_ray.orchestration.stats import get_stats_actor

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = get_stats_actor()  # the warm job's actor: named, namespaced, detached
        model = vcr.models.build("llama-tiny", num_layers=1)
        cfg = vcr.CompilationConfig(compile_sizes=[2], **EAGER,
                                    cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
        compiled = vcr.load(model, cfg, model_name="llama-tiny")
        got = ray.get(actor.startup_reports.remote())
        assert [StartupReport.from_dict(r) for r in got] == [compiled.report]
    finally:
        ray.shutdown()
