"""warm() on a real local Ray instance with two fake GPUs (`ray.init(num_gpus=2)`).

Compiles use the EagerAdaptor (device "cpu": CPU compiles running in fake-GPU slots), except one
small real-Inductor test. One Ray instance serves the module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from vllm_compile_ray import (CacheConfig, CompilationConfig, ComputeOptions, RetryOptions, models,
                              plan_model)
from vllm_compile_ray.cache import manifest
from vllm_compile_ray.errors import ClusterResourceError
from vllm_compile_ray.orchestration.compile_task import Faults
from vllm_compile_ray.orchestration.warm import warm
from vllm_compile_ray.orchestration.warm_summary import WarmSummary
from vllm_compile_ray.runtime.api import open_store

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SIZES = (1, 2, 4)
SLOT = {"compute": ComputeOptions(device_type="cpu", gpus_per_compile=0.5, cpus_per_compile=0.5)}  # 4 slots


def slot(**changes) -> dict:
    """SLOT's compute options with `changes`."""
    return {"compute": dataclasses.replace(SLOT["compute"], **changes)}


def eager(cache_dir: str, **kw) -> CompilationConfig:
    return CompilationConfig(backend="eager", use_inductor=False, compile_sizes=SIZES, **kw,
                             cache=CacheConfig(cache_dir=cache_dir))


@pytest.fixture(scope="module")
def warmed(ray_local, tmp_path_factory) -> tuple[CompilationConfig, WarmSummary, list[str]]:
    """One warm run of llama-tiny shared by the tests that inspect its outcome."""
    config = eager(str(tmp_path_factory.mktemp("cache")))
    lines: list[str] = []
    return config, warm("llama-tiny", config, progress=lines.append, **SLOT), lines


def test_embedded_default_starts_and_stops_ray(tmp_path, monkeypatch) -> None:
    """No address and no Ray running: warm() starts Ray in-process and shuts it down. First in the
    module, before the shared instance exists."""
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="vcr", dir="/tmp"))
    assert not ray.is_initialized()
    config = eager(str(tmp_path)).replace(compile_sizes=(2,))
    summary = warm("llama-tiny", config, compute=ComputeOptions(device_type="cpu"), progress=None)
    assert (summary.compiled, summary.total) == (6, 6) and summary.ok
    assert not ray.is_initialized()
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def test_tp8_preset_tasks_equal_unique_pieces_times_shapes() -> None:
    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(1, 8, 64))
    plan = plan_model(models.build("llama-3-8b", 8, 0, device="meta", num_layers=4), config,
                      device_type="cpu")
    unique = {p.code_id for p in plan.pieces}
    assert len(unique) == 3  # first layer's piece, middle layers (identical), last + lm head
    assert len(plan.tasks()) == len(unique) * len(config.shapes) == 12
    # Every rank has the same pieces (one artifact serves all ranks).
    rank3 = plan_model(models.build("llama-3-8b", 8, 3, device="meta", num_layers=4), config,
                       device_type="cpu", fingerprint=plan.key_context.fingerprint)
    assert rank3.keys == plan.keys


def test_a_plan_drafted_before_the_fingerprint_is_keyed_as_a_plan_made_with_it() -> None:
    """warm counts the tasks (to size its slots) before a compile node has the fingerprint, then
    keys the same pieces with it (`Plan.rekeyed`)."""
    from vllm_compile_ray.runtime.api import key_context
    from vllm_compile_ray.compiling.compiler_interface import make_compiler

    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(1, 8))
    model = models.build("llama-3-8b", 1, 0, device="meta", num_layers=3)
    fingerprint = {"device_type": "cuda", "device_name": "NVIDIA H200"}
    made = plan_model(model, config, device_type="cuda", fingerprint=fingerprint)
    draft = plan_model(model, config, device_type="cuda", fingerprint={})
    assert len(draft.tasks()) == len(made.tasks()) and draft.keys != made.keys
    keyed = draft.rekeyed(key_context(config, make_compiler(config), "cuda", fingerprint))
    assert keyed.keys == made.keys
    assert [p.keys for p in keyed.pieces] == [p.keys for p in made.pieces]
    assert keyed.key_context.fingerprint_id == made.key_context.fingerprint_id


def test_tasks_run_longest_expected_first() -> None:
    """Pieces with more GEMMs first (their max-autotune compiles are the long ones at any size),
    each piece's sizes descending, its dynamic compile last."""
    from vllm_compile_ray.orchestration.warm_plan import gemm_count, order_tasks

    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(1, 8, 64))
    plan = plan_model(models.build("llama-3-8b", 1, 0, device="meta", num_layers=4), config,
                      device_type="cpu")
    gemms = {t.code_id: gemm_count(t.piece.graph) for t in plan.tasks()}
    assert sorted(gemms.values()) == [1, 3, 4]  # first piece (qkv), last (3), layer (4)
    order = [(gemms[t.code_id], t.shape) for t in order_tasks(plan.tasks())]
    assert order == [(g, s) for g in (4, 3, 1) for s in (64, 8, 1, "dynamic")]


def test_every_unique_task_compiled_once(warmed) -> None:
    config, summary, lines = warmed
    assert summary.ok and summary.total == 3 * (1 + len(SIZES))
    assert (summary.compiled, summary.cached, summary.failed, summary.timed_out) == (summary.total, 0, 0, 0)
    assert len({r["key"] for r in summary.rows}) == summary.total
    store = open_store(config)
    assert all(store.contains_many([r["key"] for r in summary.rows]).values())
    snap = json.loads(store.get_file(summary.stats_path.removeprefix(store.url + "/")))
    assert snap["counter"]["num_eager_compiles"] == summary.total
    assert snap["counter"]["num_artifacts_saved"] == summary.total
    assert 1 <= snap["max_concurrent"] <= 4 and snap["running"] == 0
    assert snap["status"] == {"compiled": summary.total}
    # Plain progress lines, one per task, then the summary.
    progress = [line for line in lines if re.match(r"compiled \d+/12 compile\[[0-9a-f]{10}/\w+\] ", line)]
    assert len(progress) == 12 and "12/12" in progress[-1]
    # Longest expected first: the dynamic compiles were submitted before the static sizes.
    assert lines[0].startswith("planned llama-tiny tp=1: 3 unique pieces x 4 shapes = 12 tasks")


def test_workers_are_reused(warmed) -> None:
    _, summary, _ = warmed
    pids = {r["pid"] for r in summary.rows}
    assert len(pids) <= 4 < summary.total  # at most one worker per slot, each ran several tasks


def test_second_run_compiles_nothing(warmed) -> None:
    config, first, _ = warmed
    lines: list[str] = []
    again = warm("llama-tiny", config, progress=lines.append, **SLOT)
    assert (again.compiled, again.cached, again.total) == (0, first.total, first.total)
    assert again.fingerprint_id == first.fingerprint_id
    assert "traced model for the ranks: present" in lines


def test_the_first_rank_restores_the_model_warm_traced(warmed) -> None:
    """The warm job publishes the traced model as the first rank would: that rank restores it
    (no dynamo trace) and computes what the model does."""
    from vllm_compile_ray.runtime.load import load

    config, _, lines = warmed
    assert "traced model for the ranks: published" in lines
    model = models.build("llama-tiny", seed=7)
    compiled = load(model, config.replace(on_miss="error"), model_name="llama-tiny")
    assert compiled.report.dynamo == "restored"
    assert (compiled.report.compiles, compiled.report.hits) == (0, 12)
    ids, pos = torch.randint(0, 100, (3,)), torch.arange(3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))


def test_a_checkpoint_vcr_has_no_model_for_warms_and_its_rank_restores(ray_local, tmp_path) -> None:
    """A Gemma3 config.json (transformers' model at tp_size=1: `hf_config`) through the user's
    path: warm compiles its pieces and traces it; a rank restores and compiles nothing."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import hf_models

    from vllm_compile_ray.planning import intake
    from vllm_compile_ray.runtime.load import load

    ckpt = hf_models.save_config("gemma3_text", tmp_path / "gemma3", "Gemma3ForCausalLM")
    config = eager(str(tmp_path / "cache")).replace(compile_sizes=(1, 4))
    lines: list[str] = []
    summary = warm(ckpt, config, progress=lines.append, **SLOT)
    assert summary.ok and summary.compiled == 9  # first, middle, last layer x (dynamic, 1, 4)
    assert "traced model for the ranks: published" in lines
    model = intake.build(ckpt, device="cpu").module
    compiled = load(model, config.replace(on_miss="error"), model_name=ckpt)
    assert compiled.report.dynamo == "restored" and compiled.report.compiles == 0
    reference = intake.build(ckpt, device="cpu").module
    ids = hf_models.tokens(6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_tp_rank_restores_what_warm_traced_in_a_group_of_its_size(ray_local, tmp_path) -> None:
    """With tp_size > 1 the warm task traces under a process group of that size that
    communicates nothing: a rank under its TP group restores it; a process without a group
    has another key (model code may branch on the group) and traces."""
    import torch.distributed as dist

    from vllm_compile_ray.runtime.load import load

    config = eager(str(tmp_path)).replace(compile_sizes=(4,))
    lines: list[str] = []
    summary = warm("llama-tiny", config, tp_size=2, progress=lines.append, **SLOT)
    assert summary.ok and "traced model for the ranks: published" in lines
    rank_config = config.replace(on_miss="error")
    model = models.build("llama-tiny", tp_size=2, rank=1)
    dist.init_process_group("fake", rank=1, world_size=2)
    try:
        in_group = load(model, rank_config, rank=1, world_size=2, model_name="llama-tiny")
    finally:
        dist.destroy_process_group()
    assert in_group.report.dynamo == "restored" and in_group.report.compiles == 0
    alone = load(model, rank_config, rank=1, world_size=2, model_name="llama-tiny")
    assert alone.report.dynamo == "traced+published" and alone.report.compiles == 0


def _sleeps() -> None:
    time.sleep(3600)


def test_a_traced_model_task_that_does_not_end_is_cancelled(ray_local) -> None:
    import sys

    from ray import cloudpickle

    from vllm_compile_ray.orchestration import trace_task

    here = sys.modules[__name__]  # workers cannot import the tests: ship `_sleeps` by value
    cloudpickle.register_pickle_by_value(here)
    try:
        ref = ray.remote(num_cpus=0)(_sleeps).remote()  # a task that does not end
    finally:
        cloudpickle.unregister_pickle_by_value(here)
    assert trace_task.outcome(ref, wait_s=1).startswith("off: not done 1 s after the compiles")
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=60)
    assert trace_task.outcome("off: why") == "off: why"


def test_the_traced_model_task_counts_pieces_the_warm_did_not_plan(tmp_path) -> None:
    """Model code that branches on the device type traces other pieces on the ranks' device than
    the warm planned: the summary line says how many compile at the ranks' first start."""
    from vllm_compile_ray.orchestration import trace_task

    config = eager(str(tmp_path)).replace(compile_sizes=(2,))
    store = open_store(config)
    said = trace_task.publish_traced("llama-tiny", config, store, 1, None, "cpu",
                                     planned=frozenset())
    assert re.fullmatch(r"published; but (\d+) of the \1 compiled pieces its ranks load are not "
                        r"in this warm's plan \(the model traces another graph on its device\): "
                        r"they compile at the ranks' first start", said), said


def test_the_traced_model_task_publishes_a_graph_for_a_size_outside_its_guards(tmp_path) -> None:
    """DeepSeek-V3's graph traced at 8 tokens excludes 1 (`2 <= tokens`): the warm's task also
    publishes the function a rank's warm-up at 1 token needs, and the rank restores both (no
    dynamo trace at its start); a second publish finds them present."""
    import hf_models

    from vllm_compile_ray.orchestration import trace_task
    from vllm_compile_ray.planning import intake
    from vllm_compile_ray.runtime.load import load

    ckpt = hf_models.save_config("deepseek_v3", tmp_path / "ds", "DeepseekV3ForCausalLM")
    config = eager(str(tmp_path / "cache")).replace(compile_sizes=(1, 2))
    store = open_store(config)
    said = trace_task.publish_traced(ckpt, config, store, 1, None, "cpu")
    assert said == "published (and 1 for size(s) 1, outside its guards)", said
    built = intake.build(ckpt, device="cpu")
    rank = load(built.module, config, model_name=ckpt, example_inputs=built.example_inputs)
    assert rank.report.dynamo == "restored" and rank.report.later == "restored"
    assert rank.report.graphs == 2 and set(rank.later) == {1}
    assert trace_task.publish_traced(ckpt, config, store, 1, None, "cpu") == "present"


def test_manifest_lists_every_artifact(warmed) -> None:
    config, summary, _ = warmed
    store = open_store(config)
    table = manifest.read_manifest(store, "llama-tiny", summary.fingerprint_id)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {r["key"] for r in summary.rows}
    for key, row in rows.items():
        payload = store.fetch(key).payload
        assert row["bytes"] == len(payload) and len(row["sha256"]) == 64
        assert row["model"] == "llama-tiny" and row["tp_size"] == 1
        assert row["torch"] == torch.__version__ and row["node"] == "127.0.0.1"
    assert summary.manifest_path.endswith(manifest.manifest_path("llama-tiny", summary.fingerprint_id))
    assert [e["rows"] for e in manifest.list_manifests(store)] == [summary.total]


def _scrape(pattern: str, timeout_s: float = 30.0) -> list[tuple[str, float]]:
    """Series of the head node's Prometheus endpoint matching `pattern`, waited for."""
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline = time.time() + timeout_s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        found = [(m.group(1), float(m.group(2)))
                 for m in re.finditer(rf"^({pattern}(?:\{{[^}}]*\}})?) (\S+)$", text, re.M)]
        if found or time.time() > deadline:
            return found
        time.sleep(1.0)


def test_metrics_endpoint_shows_the_counters(ray_local, tmp_path) -> None:
    # A run of its own, scraped at once: Ray's metrics agent drops a process's series once it has
    # not reported for a while (`RAY_WORKER_TIMEOUT_S`), and the driver reports a gauge only
    # when it changes, so a run made tests ago may have no tasks-remaining series left.
    config = eager(str(tmp_path / "cache")).replace(compile_sizes=(2,))
    summary = warm("llama-tiny", config, progress=None, **SLOT)
    assert summary.ok and summary.compiled == summary.total
    # each process exports on its own report interval; the driver's gauge took over 30 s once
    # at the end of a CI run on the 2-core machine
    deadline = time.monotonic() + 60
    while True:
        compiled = _scrape(r"ray_vcr_compiles_total")
        done = sum(v for name, v in compiled if 'status="compiled"' in name)
        remaining = _scrape(r"ray_vcr_tasks_remaining")  # the driver's last value may lag
        finished = any(f'run="{summary.run_id}"' in name and v == 0 for name, v in remaining)
        if (done >= summary.total and finished) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done >= summary.total
    assert sum(v for _, v in _scrape(r"ray_vcr_bytes_published_total")) > 0
    assert sum(v for _, v in _scrape(r"ray_vcr_compile_seconds_count")) >= summary.total
    assert finished, remaining


def test_killed_worker_task_is_retried_and_counted_once(ray_local, tmp_path) -> None:
    config = eager(str(tmp_path / "cache")).replace(compile_sizes=(2,), compile_dynamic=False)
    (tmp_path / "markers").mkdir()
    faults = Faults(crash_once="compile[*/2]", marker_dir=str(tmp_path / "markers"))
    summary = warm("llama-tiny", config, faults=faults, progress=None, **SLOT)
    assert (summary.compiled, summary.failed, summary.total) == (3, 0, 3)
    assert len(list((tmp_path / "markers").iterdir())) == 3  # every task's worker died once
    assert all(r["retries"] == 1 for r in summary.rows)
    snap = json.loads(open_store(config).get_file(summary.stats_path.removeprefix(
        open_store(config).url + "/")))
    assert snap["counter"]["num_eager_compiles"] == 3 and snap["retried_tasks"] == 3


def test_infeasible_request_fails_fast_naming_the_resource(ray_local, tmp_path) -> None:
    """Before any task is submitted (Ray would hold an infeasible one forever)."""
    with pytest.raises(ClusterResourceError, match=r"needs 4 GPU \(largest node has 2\)"):
        warm("llama-tiny", eager(str(tmp_path)),
             compute=ComputeOptions(device_type="cpu", gpus_per_compile=4), progress=None)
    with pytest.raises(ClusterResourceError, match="1 compile_node"):
        warm("llama-tiny", eager(str(tmp_path)), progress=None, **slot(resources={"compile_node": 1}))
    with pytest.raises(ClusterResourceError, match="has a GPU and {'compile_node': 1}"):
        warm("llama-tiny", eager(str(tmp_path)), compute=ComputeOptions(resources={"compile_node": 1}),
             progress=None)
    assert not open_store(eager(str(tmp_path))).list_keys()  # nothing compiled or published


def test_cuda_default_sizes_slots_from_the_cluster_and_the_plan(ray_local, tmp_path) -> None:
    """No gpus_per_compile on cuda: one slot per CPU of the GPU node (2 CPUs, 2 fake GPUs: a
    whole GPU each), said in a progress line. The compiles themselves fail here (no CUDA to
    fingerprint on this machine): what is checked is the sizing and that the run ends."""
    lines: list[str] = []
    summary = warm("llama-tiny", eager(str(tmp_path)), fingerprint={"device_type": "cuda"},
                   progress=lines.append)
    assert "sizing: 2 compile slots on 1 GPU node(s): 2 CPUs, 2 GPUs -> 1 GPU and 1 CPU each" \
        in lines, lines
    assert summary.failed == summary.total > 2 and summary.max_concurrent <= 2


@pytest.mark.parametrize("gpus, cpus, slots", [(4 / 33, 1, 32), (1 / 8, 1, 32), (0.25, 0.75, 16),
                                              (0.25, 3, 5), (1, 1, 4), (2, 1, 2), (0, 0.75, 85)])
def test_capacity_counts_resources_as_ray_does(gpus, cpus, slots) -> None:
    """A GPU fraction below one fits within one GPU, in Ray's units of 1/10000: 4 GPUs hold 8
    tasks of 4/33 GPU each, not 33 (the 33rd waits for a slot)."""
    from vllm_compile_ray.orchestration.warm import _Request, cluster_capacity

    nodes = [{"Alive": True, "Resources": {"GPU": 4.0, "CPU": 16.0 if cpus == 3 else 64.0}},
             {"Alive": False, "Resources": {"GPU": 8.0, "CPU": 64.0}}]
    assert cluster_capacity(_Request(gpus, cpus, {}), nodes) == slots


class _Tiny(torch.nn.Module):
    """One piece, one GEMM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.embed(ids))) + positions[:, None]


@pytest.mark.inductor
def test_one_real_inductor_compile(ray_local, tmp_path) -> None:
    """A tiny one-piece model compiled by Inductor in a Ray task; the artifact loads and runs."""
    config = CompilationConfig(compile_sizes=(4,), compile_dynamic=False,
                               cache=CacheConfig(cache_dir=str(tmp_path)))
    summary = warm(_Tiny(), config, model_name="tiny", progress=None, **slot(max_in_flight=1))
    assert (summary.compiled, summary.total) == (1, 1), summary.errors
    # Inductor: the worker started (imports, fingerprint) while the driver planned, then compiled
    assert (summary.prestarted, summary.ran_in_prestarted) == (1, 1)
    assert summary.prestart_s > 0
    # its fingerprint keyed the plan, so it had finished before the compile phase began
    assert summary.prestart_ready == 1 and summary.prestart_last_s < 0
    # and froze what its start-up left alive (torch, Inductor, Ray: far more than 100k objects)
    assert summary.prestart_rows[0]["frozen_objects"] > 100_000
    row = summary.rows[0]
    # the collector ran during the compile (its young generation, at least), and was timed
    assert sum(row["gc_collections"]) > 0 and 0 <= row["gc_s"] < row["seconds"], row
    # and its CPU use (`cpu_time`): the compile thread ran, its process at least as much (its
    # clock ticks at 10 ms)
    assert 0 < row["run_s"] <= row["cpu_s"] + 0.02, row
    assert row["runq_s"] >= 0 and row["child_cpu_s"] >= 0, row
    assert row["bytes"] > 1000 and row["seconds"] > 0
    # where the compile's seconds went, by Inductor phase (benchmarks compare them with serial)
    # (cold here, or an FX graph cache hit: the tests share Inductor's cache), each within it
    phases = row["phases"]
    assert phases["PyCodeCache.load_by_key_path"] > 0, phases
    assert all(0 <= s <= row["seconds"] for s in phases.values()), phases
    assert row["autotune_failed"] == 0  # counted in the row (a CPU GEMM has one choice)
    assert manifest.read_manifest(open_store(config), "tiny", summary.fingerprint_id).num_rows == 1


def test_compiles_wait_for_started_workers(ray_local, tmp_path) -> None:
    """Slots are free (4) but the two started workers are still starting up: the compiles wait
    for them rather than take the free slots, where Ray would start new worker processes that
    pay the whole start-up inside the compile phase."""
    from vllm_compile_ray.torch_private.inductor import environment_fingerprint

    summary = warm("llama-tiny", eager(str(tmp_path)),
                   fingerprint=environment_fingerprint("cpu"), progress=None,
                   faults=Faults(startup_sleep_s=4.0), **slot(prestart=True, max_in_flight=2))
    assert summary.ok and summary.compiled == summary.total == 12
    started = {r["pid"] for r in summary.prestart_rows}
    # the compile phase began while the start-ups slept, and every compile ran in a started
    # worker (one start-up may still be waiting for Ray's worker process when the other's
    # worker has run every eager compile: it is then cancelled, and not counted)
    assert summary.prestart_ready == 0 and summary.prestart_last_s > 0
    assert started and {r["pid"] for r in summary.rows} <= started
    assert min(r["entered_at"] for r in summary.rows) >= min(
        r["finished_at"] for r in summary.prestart_rows)
    assert all(r["steps"]["sleep"] >= 4.0 for r in summary.prestart_rows)


def test_job_main_exit_codes(ray_local, tmp_path) -> None:
    """jobs/warm_cache.py: 0 when everything compiled, 1 when a compile failed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("warm_cache", REPO / "jobs" / "warm_cache.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    common = ["--model", "llama-tiny", "--sizes", "2", "--no-dynamic", "--device", "cpu",
              "--gpus-per-compile", "0.5", "--cpus-per-compile", "0.5", "--cache", str(tmp_path)]
    assert job.main(common + ["--backend", "eager"]) == 0
    # An Inductor option that does not exist fails every compile (after one retry each).
    out = tmp_path / "summary.json"
    assert job.main(common + ["--backend", "inductor", "--inductor-config", '{"no_such_option": 1}',
                              "--summary-json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["failed"] == 3 and not summary["ok"]
    assert all("no_such_option" in e for e in summary["errors"].values()), summary["errors"]

def test_failed_and_timed_out_compiles_are_recorded(ray_local, tmp_path) -> None:
    """Last in the module: cancelling a timed-out task kills its worker."""
    config = eager(str(tmp_path), max_compile_time=3.0).replace(compile_sizes=(1,))
    faults = Faults(fail="compile[*/1]", sleep="compile[*/dynamic]", sleep_s=600)
    lines: list[str] = []
    summary = warm("llama-tiny", config, faults=faults, retry=RetryOptions(compile_retries=1),
                   progress=lines.append, **SLOT)
    assert not summary.ok
    assert (summary.failed, summary.timed_out, summary.compiled) == (3, 3, 0)
    assert all("injected compile failure" in e for n, e in summary.errors.items() if n.endswith("/1]"))
    assert all("max_compile_time=3s" in e for n, e in summary.errors.items() if n.endswith("/dynamic]"))
    assert all(r["compile_attempts"] == 2 for r in summary.rows if r["status"] == "failed")
    assert sum(line.startswith("TIMED OUT") for line in lines) == 3
    assert not any(open_store(config).contains_many([r["key"] for r in summary.rows]).values())



def test_a_transformers_model_warmed_on_meta_loads_with_weights_compiling_nothing(
        ray_local, tmp_path) -> None:
    """The user's path for a transformers model: warm it built on meta (no weights), then a
    rank with real weights loads every piece the warm job published."""
    import hf_models
    from vllm_compile_ray.runtime.load import load

    config = eager(str(tmp_path)).replace(compile_sizes=(4,))
    summary = warm(hf_models.build("gemma2", device="meta"), config, model_name="hf-gemma2",
                   progress=None, **SLOT)
    assert summary.ok and summary.compiled == 6  # 3 unique pieces x (dynamic, 4)
    model = hf_models.build("gemma2")
    compiled = load(model, config.replace(on_miss="error"), model_name="hf-gemma2")
    assert compiled.report.compiles == 0 and compiled.report.hits == 6
    ids = hf_models.tokens(9)
    with torch.no_grad():
        want = hf_models.build("gemma2")(input_ids=ids).logits
    assert (compiled(input_ids=ids).logits - want).abs().max() <= 1e-5
