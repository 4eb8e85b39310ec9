"""warm() across simulated nodes (`ray.cluster_utils.Cluster`): a CPU-only head with the
dashboard and two fake-GPU nodes; and `jobs/warm_cache.py` submitted through the Jobs API
against the moto S3 server, with Ray's default token auth.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_compile_ray import CacheConfig, CompilationConfig, ComputeOptions
from vllm_compile_ray.cache import manifest
from vllm_compile_ray.cache.store import ArtifactStore
from vllm_compile_ray.orchestration.warm import warm

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SLOT = {"compute": ComputeOptions(device_type="cpu", gpus_per_compile=0.5, cpus_per_compile=0.5)}


def _free_port() -> int:
    # Not Ray's fixed defaults (8265, agent 52365): other clusters on this machine may hold them,
    # and a head whose job agent cannot bind answers "No available agent to submit job".
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[object, set[str], str]]:
    """(cluster, ids of the two GPU nodes, dashboard URL); the test process is not connected."""
    from ray.cluster_utils import Cluster

    # A private RAY_TMPDIR: the cluster's address file and sessions stay out of /tmp/ray, so no
    # other process on this shared machine attaches to it by `ray.init()` (short: socket paths).
    tmp = tempfile.mkdtemp(prefix="vcr", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        # Token auth as a real cluster has it (ray.init turns it on by default, Cluster does not);
        # this process's cached Ray config must see it too, as `ray.init` itself does
        # (ray/_private/authentication/authentication_token_setup.py: _enable_token_auth).
        mp.setenv("RAY_AUTH_MODE", "token")
        ray._raylet.Config.initialize("")
        cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(), "dashboard_agent_listen_port": _free_port()})
        try:
            gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1, resources={"vcr_gpu_node": 1},
                                          labels={"vcr/role": "compile"}) for _ in range(2)]
            cluster.wait_for_nodes()
            yield cluster, {n.node_id for n in gpu_nodes}, f"http://{cluster.webui_url}"
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def test_compile_tasks_never_land_on_the_cpu_only_node(cluster, tmp_path) -> None:
    c, gpu_node_ids, _ = cluster
    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(1, 2),
                               cache=CacheConfig(cache_dir=str(tmp_path)))
    summary = warm("llama-tiny", config, progress=None,
                   compute=dataclasses.replace(SLOT["compute"], address=c.address))
    assert summary.ok and summary.compiled == summary.total == 9
    assert {r["node_id"] for r in summary.rows} <= gpu_node_ids
    assert not ray.is_initialized()  # warm() disconnected the driver it connected


def test_jobs_api_warms_the_s3_cache(cluster, s3_bucket, s3_store_options, tmp_path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, gpu_node_ids, dashboard = cluster
    with pytest.raises(urllib.error.HTTPError, match="401"):  # token auth is on
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
    client = JobSubmissionClient(dashboard)  # sends the token from ~/.ray/auth_token
    cache = f"s3://{s3_bucket}/vcr"
    entrypoint = shlex.join([
        "python", "jobs/warm_cache.py", "--model", "llama-tiny", "--tp", "2", "--sizes", "1,4",
        "--device", "cpu", "--backend", "eager", "--gpus-per-compile", "0.5",
        "--cpus-per-compile", "0.5", "--cache", cache,
        "--storage-options", json.dumps(s3_store_options), "--json"])
    runtime_env = {"working_dir": str(REPO),
                   "excludes": ["**/__pycache__", "*.egg-info", ".git", "notebooks", "benchmarks"],
                   "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}
    deadline = time.time() + 60
    while True:  # the head's job agent registers a few seconds after the dashboard answers
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)
    deadline = time.time() + 240
    while (status := client.get_job_status(job_id)) not in JobStatus.__members__.values() or \
            not status.is_terminal():
        assert time.time() < deadline, client.get_job_logs(job_id)
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "compiled 9/9 compile[" in logs
    assert "slowest: compile[" in logs  # the short summary for people (on stderr with --json)
    result = json.loads(next(line for line in logs.splitlines() if line.startswith("{")))
    assert (result["compiled"], result["failed"], result["ok"]) == (9, 0, True)

    store = ArtifactStore(cache, s3_store_options, staging_dir=str(tmp_path / "stage"), timeout_s=5)
    table = manifest.read_manifest(store, "llama-tiny", result["fingerprint_id"])
    keys = table.column("key").to_pylist()
    assert len(keys) == 9 and set(table.column("tp_size").to_pylist()) == {2}
    assert all(store.contains_many(keys).values())
    snap = json.loads(store.get_file(manifest.stats_path("llama-tiny", result["fingerprint_id"])))
    assert {row["node_id"] for row in snap["tasks"]} <= gpu_node_ids
    assert [e["model"] for e in manifest.list_manifests(store)] == ["llama-tiny"]
