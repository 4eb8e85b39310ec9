"""cluster/: the Ray cluster launcher config, the KubeRay RayCluster and RayJob, and the script
that starts a head and two simulated GPU nodes on this machine.

The YAML files are parsed and checked for what the project relies on: the job's entrypoint is
accepted by jobs/warm_cache.py's own parser, GPUs are on worker groups and not on the head, S3
credentials come from a Secret, and every file deploys the same Ray, Python and torch. The local
script is run for real (start, place a task on a GPU node, stop).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import ray
import ray.autoscaler

from vllm_compile_ray import models
from vllm_compile_ray.models import TPShapes

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
from packaging.requirements import Requirement  # noqa: E402  (a dependency of Ray and pip)
from packaging.version import Version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(?:-(?P<flavor>[\w.-]+))?$")
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


@functools.cache
def warm_job() -> ModuleType:
    """jobs/warm_cache.py as a module (its parser is the judge of the entrypoints)."""
    spec = importlib.util.spec_from_file_location("warm_cache_job", REPO / "jobs" / "warm_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_entrypoint(entrypoint: str) -> argparse.Namespace:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "jobs/warm_cache.py"], argv
    assert (REPO / argv[1]).is_file()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return warm_job().parse_args(argv[2:])
        except SystemExit:
            pytest.fail(f"jobs/warm_cache.py rejects the entrypoint {entrypoint!r}: {err.getvalue()}")


def pins(packages: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(p) for p in packages]
    return {r.name: r for r in reqs}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def image_parts(image: str) -> tuple[str, str]:
    match = IMAGE.match(image)
    assert match, f"{image!r} is not a rayproject/ray:<ray>-py<XY>[-flavor] image"
    return match["ray"], match["py"]


# ---- the cluster launcher ----

def test_launcher_config_is_valid_for_ray() -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load("ray-cluster.yaml"), json.loads(schema_path.read_text()))


def test_launcher_gpus_are_on_workers_not_on_the_head() -> None:
    config = load("ray-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"^(p\d|g\d)", head["node_config"]["InstanceType"])  # not a GPU instance
    assert all("--num-gpus=0" in cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd)
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert re.match(r"^(p\d|g\d)", node_type["node_config"]["InstanceType"]), name
        assert node_type["max_workers"] <= config["max_workers"]


def test_launcher_nodes_get_the_package_cache_and_auth() -> None:
    config = load("ray-cluster.yaml")
    mounts = config["file_mounts"]
    repo_mount = next(remote for remote, local in mounts.items() if local == ".")
    assert "~/.ray/auth_token" in mounts  # every node gets the same token
    setup = " ".join(config["setup_commands"])
    assert f"pip install --no-cache-dir -e {repo_mount}" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start, key
        cache = re.search(r"VCR_CACHE=(\S+?);", start)
        assert cache and cache.group(1).startswith("s3://"), key
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


# ---- KubeRay ----

def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(file, RayCluster spec): the standalone cluster and the one the RayJob creates."""
    return [("raycluster.yaml", load("kuberay/raycluster.yaml")["spec"]),
            ("rayjob-warm.yaml", load("kuberay/rayjob-warm.yaml")["spec"]["rayClusterSpec"])]


SPECS = [pytest.param(name, spec, id=name) for name, spec in cluster_specs()]


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["template"]["spec"]["containers"]


def test_kuberay_kinds() -> None:
    assert load("kuberay/raycluster.yaml")["kind"] == "RayCluster"
    assert load("kuberay/rayjob-warm.yaml")["kind"] == "RayJob"
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob-warm.yaml"):
        assert load(name)["apiVersion"] == "ray.io/v1", name


@pytest.mark.parametrize("name,spec", SPECS)
def test_kuberay_gpus_are_on_worker_groups_not_on_the_head(name: str, spec: dict[str, Any]) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    for c in containers(head):
        for part in ("limits", "requests"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(part, {}), (name, c["name"])
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        for c in containers(group):
            gpus = c["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert gpus >= 1, (name, group["groupName"])
            assert c["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus
            assert str(gpus) == group["rayStartParams"].get("num-gpus", str(gpus))
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("name,spec", SPECS)
def test_kuberay_s3_credentials_come_from_a_secret(name: str, spec: dict[str, Any]) -> None:
    assert spec["authOptions"]["mode"] == "token"
    secrets = set()
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in containers(group):  # head (driver) and GPU pods (tasks publish) alike
            env = {e["name"]: e for e in c.get("env", [])}
            for var in SECRET_VARS:
                assert "value" not in env[var], (name, c["name"], var)
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert ref["key"] == var
                secrets.add(ref["name"])
            if "VCR_CACHE" in env:
                assert env["VCR_CACHE"]["value"].startswith("s3://")
    assert len(secrets) == 1


def test_rayjob_entrypoint_is_accepted_by_the_warm_job() -> None:
    job = load("kuberay/rayjob-warm.yaml")["spec"]
    args = parse_entrypoint(job["entrypoint"])
    cfg = models.get_config(args.model)  # a known preset
    TPShapes.of(cfg, args.tp, 0)  # the TP size divides the model's heads
    assert (args.model, args.tp, args.device, args.backend) == ("llama-3-8b", 8, "cuda", "inductor")
    assert list(args.sizes) == sorted(set(args.sizes)) and args.sizes[0] >= 1
    assert args.cache.startswith("s3://")
    # The compile slots fit a GPU pod: a whole number of compiles per GPU, CPUs for all of them.
    [group] = job["rayClusterSpec"]["workerGroupSpecs"]
    [worker] = containers(group)
    gpus, cpus = worker["resources"]["limits"]["nvidia.com/gpu"], float(worker["resources"]["limits"]["cpu"])
    slots = gpus / args.gpus_per_compile
    assert slots == int(slots) and slots * args.cpus_per_compile <= cpus


def test_rayjob_runtime_env_brings_the_code_and_pinned_dependencies() -> None:
    job = load("kuberay/rayjob-warm.yaml")["spec"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    url = urllib.parse.urlparse(runtime_env["working_dir"])
    assert url.scheme in ("https", "s3", "gs") and url.path.endswith(".zip")  # a pod has no local path
    shared = load("kuberay/runtime-env.yaml")
    assert runtime_env["pip"] == shared["pip"]  # the RayCluster's jobs get the same list
    packages = pins(runtime_env["pip"]["packages"])
    needed = {Requirement(d).name for d in pyproject()["project"]["dependencies"]} - {"ray"}  # the image's
    assert needed <= set(packages), needed - set(packages)
    torch = packages["torch"]
    assert str(torch.specifier).startswith("=="), "torch must be pinned: its version is in every key"
    assert not set(runtime_env.get("env_vars", {})) & set(SECRET_VARS)  # the dashboard shows env_vars


def test_every_file_deploys_the_same_ray_python_and_torch() -> None:
    launcher = load("ray-cluster.yaml")
    images = {launcher["docker"]["image"]}
    for name, spec in cluster_specs():
        ray_version = spec["rayVersion"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in containers(group):
                assert image_parts(c["image"])[0] == ray_version, (name, c["image"])
                images.add(c["image"])
    assert len(images) == 1, images  # one image: head and workers share Python and Ray
    ray_version, py = image_parts(images.pop())
    project = pyproject()["project"]
    python = f"{py[0]}.{py[1:]}"
    assert Requirement(f"python{project['requires-python']}").specifier.contains(python)
    ray_req = next(Requirement(d) for d in project["dependencies"] if d.startswith("ray"))
    assert ray_req.specifier.contains(ray_version)
    # What the tests run against is what the configs deploy (major.minor).
    assert Version(ray_version).release[:2] == Version(ray.__version__).release[:2]
    launcher_torch = re.search(r'"torch==([^"]+)"', " ".join(launcher["setup_commands"])).group(1)
    job_torch = pins(load("kuberay/runtime-env.yaml")["pip"]["packages"])["torch"]
    assert str(job_torch.specifier) == f"=={launcher_torch}"
    torch_req = next(Requirement(d) for d in project["dependencies"] if d.startswith("torch"))
    assert torch_req.specifier.contains(launcher_torch)


# ---- local-cluster.sh, for real ----

_DRIVER = r"""
import json, os, ray
ray.init()
nodes = [n for n in ray.nodes() if n["Alive"]]
head = next(n for n in nodes if "node:__internal_head__" in n["Resources"])

@ray.remote(num_gpus=1)
def where():
    return ray.util.get_node_ip_address(), os.environ.get("CUDA_VISIBLE_DEVICES")

print(json.dumps({
    "nodes": {n["NodeManagerAddress"]: n["Resources"] for n in nodes},
    "head": head["NodeManagerAddress"],
    "gpu_task": ray.get(where.remote()),
    "gpu2_task": ray.get(where.options(resources={"vcr_sim_gpu2": 1}).remote()),
}))
ray.shutdown()
"""


@pytest.fixture
def local_cluster() -> Iterator[tuple[dict[str, str], Path]]:
    # Short state dir: Ray's socket paths below it must stay under 107 characters.
    state = Path(tempfile.mkdtemp(prefix="vcr-lc-", dir="/tmp"))
    env = {**os.environ, "VCR_LOCAL_DIR": str(state), "VCR_LOCAL_CPUS": "1"}
    script = str(CLUSTER / "local-cluster.sh")
    try:
        started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", started.stdout, re.M))
        assert set(exports) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        yield {**env, **exports}, state
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.ray
def test_local_cluster_script_starts_a_head_and_two_gpu_nodes(local_cluster) -> None:
    env, state = local_cluster
    pids = [int((state / f"{node}.pid").read_text()) for node in ("head", "gpu1", "gpu2")]
    run = subprocess.run([sys.executable, "-c", _DRIVER], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    nodes = seen["nodes"]
    assert len(nodes) == 3 and all(ip.startswith("127.") for ip in nodes)  # loopback only
    assert sum(r.get("GPU", 0) for r in nodes.values()) == 2
    assert nodes[seen["head"]].get("GPU", 0) == 0
    ip, visible = seen["gpu_task"]
    assert ip != seen["head"] and nodes[ip]["GPU"] == 1 and visible == "0"
    assert nodes[seen["gpu2_task"][0]].get("vcr_sim_gpu2") == 1

    status = subprocess.run([str(CLUSTER / "local-cluster.sh"), "stop"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "stopped 3 node(s)" in status.stdout, status.stdout + status.stderr
    for pid in pids:  # exactly the processes it started are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
