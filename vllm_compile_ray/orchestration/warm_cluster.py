"""The Ray cluster side of `warm`: connecting, what one compile task asks of a node, how many
run at once, the GPU fraction sized from the nodes, and the spec of the standing pool."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray

from ..config import CompilationConfig
from ..errors import ClusterResourceError
from . import pool as compile_pool
from .options import ComputeOptions
from .sizing import NodeResources, Sizing, fits, size_compiles


@dataclass(frozen=True)
class TaskRequest:
    """The resources of one compile task."""

    gpus: float
    cpus: float
    resources: dict[str, float]

    def needs(self) -> dict[str, float]:
        wanted = {"GPU": self.gpus, "CPU": self.cpus, **self.resources}
        return {k: v for k, v in wanted.items() if v > 0}

    def options(self) -> dict[str, Any]:
        return {"num_gpus": self.gpus, "num_cpus": self.cpus, "resources": dict(self.resources)}


def cluster_capacity(request: TaskRequest, nodes: list[dict[str, Any]] | None = None) -> int:
    """How many compile tasks the alive nodes can run at once; ClusterResourceError (naming the
    missing resource) if no node can run one. Does not wait for an autoscaler to add nodes."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    needs = request.needs()
    have = [n.get("Resources", {}) for n in nodes]
    capacity = sum(min((fits(res.get(k, 0.0), v, k) for k, v in needs.items()), default=64)
                   for res in have)
    if capacity:
        return capacity
    missing = [f"{v:g} {k} (largest node has {max((res.get(k, 0.0) for res in have), default=0):g})"
               for k, v in needs.items() if all(res.get(k, 0.0) < v for res in have)]
    what = ", ".join(missing) or " + ".join(f"{v:g} {k}" for k, v in needs.items()) + " on one node"
    raise ClusterResourceError(
        f"no node of the Ray cluster can run a compile task: it needs {what}; {len(nodes)} alive "
        f"node(s) with {ray.cluster_resources() if nodes else {}} in all. Add GPU nodes, or lower "
        "gpus_per_compile / cpus_per_compile (gpus_per_compile=0 compiles on CPUs).")


def cluster_sizing(request: TaskRequest, tasks: int | None = None,
                   nodes: list[dict[str, Any]] | None = None) -> Sizing:
    """`sizing.size_compiles` over the alive nodes that hold `request`'s other resources (its
    `resources`); ClusterResourceError when none has a GPU."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    usable = [NodeResources.from_ray(n) for n in nodes if all(
        n.get("Resources", {}).get(k, 0.0) >= v for k, v in request.resources.items())]
    sizing = size_compiles(usable, tasks, cpus_per_compile=request.cpus)
    if sizing is None:
        extra = f" and {request.resources}" if request.resources else ""
        raise ClusterResourceError(
            f"no node of the Ray cluster can run a cuda compile task: none of its {len(nodes)} "
            f"alive node(s) has a GPU{extra} (their resources: "
            f"{[n.get('Resources', {}) for n in nodes]}). Add GPU nodes, or compile on CPUs "
            "(device_type='cpu', or gpus_per_compile=0).")
    return sizing


def connect(address: str | None, runtime_env: dict | None) -> bool:
    """Connect to Ray unless connected; True if this call connected (and must `ray.shutdown()`:
    that stops an in-process instance it started, or only disconnects from a cluster).
    address None: RAY_ADDRESS (set inside `ray job submit`) or else a new in-process Ray."""
    if ray.is_initialized():
        return False
    # This driver submits every worker start-up, then every compile, at once; beyond Ray's default
    # of 10 lease requests in flight per kind of task the rest wait (its log: "Task submission is
    # being throttled"). Measured on a 64-core host, 32 start-ups, one run each: the last ended
    # 12.9 s into the compile phase with the default, 10.4 s with this.
    os.environ.setdefault("RAY_max_pending_lease_requests_per_scheduling_category", "256")
    # Workers' stdout/stderr (Inductor's and Triton's warnings, per compile) stay in Ray's logs
    # and the dashboard: the terminal gets the progress lines and the summary, whose rows carry
    # every task's error.
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    return True


def pool_spec(config: CompilationConfig, compute: ComputeOptions) -> compile_pool.PoolSpec:
    """The spec of the pool workers that `warm(compute=compute with pool=True)` compiles in, to
    start them ahead with `pool.up`. gpus_per_compile None on cuda: sized from the connected
    cluster, as `warm` sizes a pool."""
    gpus = compute.gpus_per_compile
    if gpus is None:
        gpus = 0.0 if compute.device_type != "cuda" else cluster_sizing(
            TaskRequest(0.0, compute.cpus_per_compile, dict(compute.resources))).gpus_per_compile
    return compile_pool.PoolSpec(compute.device_type, config.backend, float(gpus),
                                 compute.cpus_per_compile, dict(compute.resources),
                                 dict(compute.runtime_env or {}), compute.gpu_sharing)
