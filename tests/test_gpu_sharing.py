"""GPU sharing through NVIDIA MPS (`gpu_sharing.py`): the daemon's life, its actor per node and
the pool workers that join it, on a real local Ray instance with two fake GPUs.

NVIDIA's `nvidia-cuda-mps-control` exists only where the NVIDIA driver does; these CPU tests run
`tests/mps_stand_in/nvidia-cuda-mps-control` in its place (the same interface: `-f` serves the
control socket until a client sends "quit"). The real daemon runs in the GPU benchmarks
(`bench_warm.py --gpu-sharing mps`, benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_compile_ray import CompilationConfig, ComputeOptions
from vllm_compile_ray.errors import ConfigError, VcrError
from vllm_compile_ray.experimental import gpu_sharing
from vllm_compile_ray.orchestration import pool as compile_pool
from vllm_compile_ray.orchestration.warm import pool_spec, warm

STAND_IN = Path(__file__).parent / "mps_stand_in" / gpu_sharing.CONTROL


def test_modes_are_checked() -> None:
    assert gpu_sharing.check("mps", "cuda") == "mps"
    with pytest.raises(ConfigError, match=r"gpu_sharing='mig' is invalid: allowed 'time-slice', 'mps'"):
        gpu_sharing.check("mig", "cuda")
    with pytest.raises(ConfigError, match="shares CUDA GPUs, but device_type='cpu'"):
        gpu_sharing.check("mps", "cpu")
    with pytest.raises(ConfigError, match="gpu_sharing='mps' shares CUDA GPUs"):
        warm("llama-tiny", compute=ComputeOptions(device_type="cpu", gpu_sharing="mps"),
             progress=None)
    with pytest.raises(ConfigError, match="allowed 'time-slice', 'mps'"):
        pool_spec(CompilationConfig(), ComputeOptions(gpu_sharing="MPS"))


def test_a_node_without_the_daemon_binary_gets_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="needs nvidia-cuda-mps-control .* on PATH on every "
                                          "compile node; not found on"):
        gpu_sharing.Daemon()


def test_a_daemon_that_does_not_start_says_why(tmp_path) -> None:
    broken = tmp_path / "control"
    broken.write_text('#!/bin/sh\necho "no GPU here" > "$CUDA_MPS_LOG_DIRECTORY/control.log"\n'
                      "exit 3\n")
    broken.chmod(0o755)
    with pytest.raises(VcrError, match=r"did not start on .* \(exit 3\): no GPU here"):
        gpu_sharing.Daemon(str(broken), root=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["control"]  # its directory removed


def test_the_daemon_serves_until_its_processes_are_gone_then_stops(tmp_path) -> None:
    daemon = gpu_sharing.Daemon(str(STAND_IN), root=str(tmp_path))
    assert (daemon.pipe / "control").exists() and daemon.proc.poll() is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert daemon.add(child.pid) == str(daemon.pipe)
    time.sleep(0.2)
    assert daemon.idle_for() < 0.1  # a process that joined is alive
    child.kill()
    child.wait()
    time.sleep(0.3)
    assert daemon.idle_for() >= 0.3 and daemon.pids == set()
    daemon.stop()
    assert daemon.proc.returncode == 0  # quit through its control socket, not killed
    assert not daemon.root.exists()


@pytest.fixture
def stand_in_env(ray_local) -> dict:
    """A runtime env that finds the stand-in daemon first on PATH; stops the daemons after."""
    yield {"env_vars": {"PATH": f"{STAND_IN.parent}:{os.environ['PATH']}"}}
    compile_pool.down()


def test_workers_on_a_node_share_one_daemon_that_stops_with_the_pool(stand_in_env) -> None:
    import ray

    class Worker:  # here, not at module level: Ray pickles it by value
        """A worker process that joins GPU sharing as compile workers do before CUDA starts."""

        def join(self, mode: str) -> tuple[int, dict, str]:
            return (os.getpid(), gpu_sharing.join(mode),
                    os.environ.get("CUDA_MPS_PIPE_DIRECTORY", ""))

    workers = [ray.remote(num_cpus=0)(Worker).options(runtime_env=stand_in_env).remote()
               for _ in range(3)]
    joined = ray.get([w.join.remote("mps") for w in workers])
    assert len({pid for pid, _, _ in joined}) == 3
    assert {j["mps_daemon"] for _, j, _ in joined} == {"vcr"}
    pipes = {j["mps_pipe"] for _, j, _ in joined} | {env for _, _, env in joined}
    assert len(pipes) == 1  # one daemon for the node, and CUDA will find it
    pipe = Path(pipes.pop())
    assert (pipe / "control").exists()
    (name,) = gpu_sharing.names()
    info = ray.get(ray.get_actor(name, namespace=gpu_sharing.NAMESPACE).describe.remote())
    assert info["pipe"] == str(pipe) and info["pids"] == sorted(pid for pid, _, _ in joined)
    assert Path(f"/proc/{info['daemon_pid']}").exists()
    assert ray.get(workers[0].join.remote("mps"))[1] == joined[0][1]  # once per process

    assert name in compile_pool.down() and gpu_sharing.names() == []
    deadline = time.time() + 10
    while Path(f"/proc/{info['daemon_pid']}").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{info['daemon_pid']}").exists() and not pipe.exists()
    for w in workers:
        ray.kill(w)


def test_an_unused_daemon_stops_and_a_later_worker_gets_a_new_one(stand_in_env) -> None:
    import ray

    name = gpu_sharing.PREFIX + ray.get_runtime_context().get_node_id()[:16]
    actor = gpu_sharing.MpsDaemon.options(name=name, namespace=gpu_sharing.NAMESPACE,
                                          runtime_env=stand_in_env, num_cpus=0).remote(1.0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    old_pipe = Path(ray.get(actor.join.remote(gone.pid)))
    daemon_pid = ray.get(actor.describe.remote())["daemon_pid"]
    deadline = time.time() + 30
    while gpu_sharing.names() and time.time() < deadline:
        time.sleep(0.2)
    assert gpu_sharing.names() == [] and not old_pipe.exists()
    assert not Path(f"/proc/{daemon_pid}").exists()

    @ray.remote(num_cpus=0, runtime_env=stand_in_env)
    def join() -> str:
        return gpu_sharing.join("mps")["mps_pipe"]

    new_pipe = Path(ray.get(join.remote()))
    assert new_pipe != old_pipe and (new_pipe / "control").exists()
    assert gpu_sharing.names() == [name]


def test_time_slice_joins_nothing_and_mps_workers_are_a_pool_of_their_own() -> None:
    assert gpu_sharing.join("time-slice") == {"gpu_sharing": "time-slice"}
    assert compile_pool.PoolSpec("cuda", gpu_sharing="mps").tag != compile_pool.PoolSpec("cuda").tag


def test_a_node_that_runs_its_own_daemon_is_used_as_it_is(tmp_path, monkeypatch) -> None:
    (tmp_path / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    gpu_sharing.join.cache_clear()
    try:
        assert gpu_sharing.join("mps") == {"gpu_sharing": "mps", "mps_pipe": str(tmp_path),
                                           "mps_daemon": "node"}
    finally:
        gpu_sharing.join.cache_clear()
