"""The standing pool of compile workers (`pool.py`, `ComputeOptions(pool=True)`) on a real local
Ray instance with two fake GPUs (`ray_local`, conftest). Compiles use the EagerAdaptor; one Ray
instance serves the module and every test stops the workers it started."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import pytest

from vllm_compile_ray import CacheConfig, CompilationConfig, ComputeOptions
from vllm_compile_ray.cli import commands as cli
from vllm_compile_ray.errors import ConfigError
from vllm_compile_ray.orchestration import pool as compile_pool
from vllm_compile_ray.orchestration.compile_task import Faults
from vllm_compile_ray.orchestration.warm import warm
from vllm_compile_ray.runtime.api import open_store

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SLOT = {"compute": ComputeOptions(device_type="cpu", gpus_per_compile=0.5, cpus_per_compile=0.5)}  # 4 slots


def slot(**changes) -> dict:
    """SLOT's compute options with `changes`."""
    return {"compute": dataclasses.replace(SLOT["compute"], **changes)}


def eager(cache_dir: str, **kw) -> CompilationConfig:
    return CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(1, 2), **kw,
                             cache=CacheConfig(cache_dir=cache_dir))


@pytest.fixture
def pool(ray_local) -> Iterator[None]:
    """Stops every pool worker a test left, and checks their resources came back."""
    yield
    compile_pool.down()
    deadline = time.time() + 30
    while ray.available_resources().get("GPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 2


def test_a_second_run_compiles_in_the_first_runs_workers(pool, tmp_path) -> None:
    first = warm("llama-tiny", eager(str(tmp_path / "a")), progress=None,
                 **slot(pool=True, max_in_flight=2))
    assert first.ok and first.compiled == first.total == 9
    assert first.pool_reused == 0
    names = compile_pool.names()
    assert len(names) == 2 and all(n.startswith(compile_pool.PREFIX) for n in names)
    deadline = time.time() + 60  # eager compiles are quick: one worker may still be starting
    while not all(r.get("started") for r in compile_pool.status()) and time.time() < deadline:
        time.sleep(0.5)
    pool_pids = {r["pid"] for r in compile_pool.status()}
    assert len(pool_pids) == 2 and {r["pid"] for r in first.rows} <= pool_pids

    second = warm("llama-tiny", eager(str(tmp_path / "b")), progress=None,
                  **slot(pool=True, max_in_flight=2))
    assert second.ok and second.compiled == 9
    assert (second.prestarted, second.pool_reused) == (2, 2)
    assert {r["pid"] for r in second.rows} <= pool_pids
    assert compile_pool.names() == names
    rows = compile_pool.status()
    assert [r["name"] for r in rows] == names
    assert sum(r["served"] for r in rows) == 18 and not any(r["busy"] for r in rows)


def test_a_pool_run_publishes_the_traced_model_its_first_rank_restores(pool, tmp_path) -> None:
    """The pool's workers hold every compile slot: one of them traces the model for the ranks."""
    import torch

    from vllm_compile_ray import models
    from vllm_compile_ray.runtime.load import load

    config = eager(str(tmp_path))
    lines: list[str] = []
    summary = warm("llama-tiny", config, progress=lines.append, **slot(pool=True, max_in_flight=4))
    assert summary.ok and "traced model for the ranks: published" in lines
    assert len(compile_pool.names()) == 4  # every slot a pool worker: no task took one
    model = models.build("llama-tiny", seed=3)
    compiled = load(model, config.replace(on_miss="error"), model_name="llama-tiny")
    assert compiled.report.dynamo == "restored" and compiled.report.compiles == 0
    ids, pos = torch.randint(0, 100, (3,)), torch.arange(3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    lines.clear()
    warm("llama-tiny", config, progress=lines.append, **slot(pool=True, max_in_flight=4))
    assert "traced model for the ranks: present" in lines


def test_other_settings_get_workers_of_their_own(pool, tmp_path) -> None:
    warm("llama-tiny", eager(str(tmp_path / "a")), progress=None,
         **slot(pool=True, max_in_flight=1))
    warm("llama-tiny", eager(str(tmp_path / "b")), progress=None,
         **slot(pool=True, max_in_flight=1, gpus_per_compile=0.25))
    names = compile_pool.names()
    assert len(names) == 2 and len({n.rsplit("-", 1)[0] for n in names}) == 2
    assert len(compile_pool.down()) == 2 and compile_pool.names() == []


def test_a_run_without_the_pool_says_that_it_holds_resources(pool, tmp_path, caplog) -> None:
    spec = compile_pool.PoolSpec("cpu", "eager", gpus=0.5, cpus=0.5)
    ray.get([ref for _, ref in compile_pool.up(spec, 1)])
    config = eager(str(tmp_path)).replace(compile_sizes=(1,), compile_dynamic=False)
    with caplog.at_level("WARNING", logger="vllm_compile_ray.orchestration.warm"):
        summary = warm("llama-tiny", config, progress=None, **slot(max_in_flight=2))
    assert summary.ok and summary.compiled == 3
    assert "1 compile workers of a standing pool hold their resources" in caplog.text


def test_an_idle_worker_exits_and_frees_its_resources(pool) -> None:
    spec = compile_pool.PoolSpec("cpu", "eager", gpus=0.5, cpus=0.5)
    (worker, start), = compile_pool.up(spec, 1, idle_timeout_s=1.0)
    assert not ray.get(start)["reused"]
    assert ray.available_resources().get("GPU", 0) == 1.5
    deadline = time.time() + 30
    while compile_pool.names() and time.time() < deadline:
        time.sleep(0.5)
    assert compile_pool.names() == []
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(worker.describe.remote(), timeout=30)


def test_a_crashed_worker_restarts_and_its_compile_counts_once(pool, tmp_path) -> None:
    config = eager(str(tmp_path / "cache")).replace(compile_sizes=(2,), compile_dynamic=False)
    (tmp_path / "markers").mkdir()
    faults = Faults(crash_once="compile[*/2]", marker_dir=str(tmp_path / "markers"))
    summary = warm("llama-tiny", config, faults=faults, progress=None,
                   **slot(pool=True, max_in_flight=2))
    assert (summary.compiled, summary.failed, summary.total) == (3, 0, 3)
    assert len(list((tmp_path / "markers").iterdir())) == 3  # every compile's worker died once
    store = open_store(config)
    snap = json.loads(store.get_file(summary.stats_path.removeprefix(store.url + "/")))
    assert snap["counter"]["num_eager_compiles"] == 3 and snap["retried_tasks"] == 3
    assert len(compile_pool.names()) == 2  # restarted, still in the pool


def test_a_compile_past_max_compile_time_restarts_its_worker(pool, tmp_path) -> None:
    config = eager(str(tmp_path / "a"), max_compile_time=3.0).replace(compile_sizes=(1,),
                                                                       compile_dynamic=False)
    faults = Faults(sleep="compile[*/1]", sleep_s=600)
    start = time.perf_counter()
    summary = warm("llama-tiny", config, faults=faults, progress=None,
                   **slot(pool=True, max_in_flight=3))
    assert time.perf_counter() - start < 120  # stopped, not slept out
    assert summary.timed_out == 3 and summary.compiled == 0
    assert all("max_compile_time=3s" in e for e in summary.errors.values())
    # The workers restarted (their calls were retried and found the run's rows recorded):
    # the pool serves the next run.
    moved = config.replace(max_compile_time=60.0).with_cache(cache_dir=str(tmp_path / "b"))
    again = warm("llama-tiny", moved, progress=None, **slot(pool=True, max_in_flight=3))
    assert again.ok and again.compiled == 3 and len(compile_pool.names()) == 3


def test_a_pool_that_never_starts_fails_the_run_naming_the_pool(pool, tmp_path) -> None:
    config = eager(str(tmp_path), max_compile_time=2.0).replace(compile_sizes=(1,),
                                                                 compile_dynamic=False)
    summary = warm("llama-tiny", config, progress=None, fingerprint=_cpu_fingerprint(),
                   faults=Faults(startup_sleep_s=60), **slot(pool=True, max_in_flight=1))
    assert summary.failed == 3 and not summary.ok
    assert all("no compile worker of the pool" in e for e in summary.errors.values())


def test_bad_pool_settings_are_refused(ray_local) -> None:
    spec = compile_pool.PoolSpec("cpu", "eager")
    with pytest.raises(ConfigError, match="pool size 0 is invalid"):
        compile_pool.up(spec, 0)
    with pytest.raises(ConfigError, match="idle_timeout_s=0 is invalid"):
        compile_pool.up(spec, 1, idle_timeout_s=0)
    assert compile_pool.names() == []


def test_cli_starts_shows_and_stops_the_pool(pool, tmp_path, capsys) -> None:
    """`vcr pool up` starts the workers a warm with `ComputeOptions(pool=True)` and the same
    options compiles in."""
    assert cli.main(["pool", "up", "--device", "cpu", "--backend", "eager", "--workers", "2",
                     "--gpus-per-compile", "0.5", "--cpus-per-compile", "0.5"]) == 0
    assert "2 of 2 compile workers started" in capsys.readouterr().out
    summary = warm("llama-tiny", eager(str(tmp_path)), progress=None,
                   **slot(pool=True, max_in_flight=2))
    assert summary.ok and summary.pool_reused == 2
    assert cli.main(["pool", "status"]) == 0
    out = capsys.readouterr().out
    assert out.count(compile_pool.PREFIX) == 2 and "served" in out
    assert cli.main(["pool", "down"]) == 0
    assert "stopped 2 compile workers" in capsys.readouterr().out
    assert compile_pool.names() == []
    assert cli.main(["pool", "status"]) == 0
    assert "no compile workers" in capsys.readouterr().out
    assert cli.main(["pool", "up", "--device", "cpu", "--workers", "0"]) == 2  # bad size: usage


def _cpu_fingerprint() -> dict[str, str]:
    from vllm_compile_ray.torch_private.inductor import environment_fingerprint
    return environment_fingerprint("cpu")


def test_idle_workers_take_turns_across_gpus() -> None:
    from vllm_compile_ray.orchestration.dispatch import _spread

    workers = [f"w{i}" for i in range(7)]  # any hashable stands in for an actor handle
    places = {w: ("node", (str(i // 3),)) for i, w in enumerate(workers)}  # GPU 0,0,0,1,1,1,2
    assert _spread(workers, places) == ["w0", "w3", "w6", "w1", "w4", "w2", "w5"]
    assert _spread(workers[:2], {}) == ["w0", "w1"]  # no place known: order kept
