"""A standing pool of compile workers: detached Ray actors that keep their started process
between warm runs.

A warm run with Ray tasks starts its compile workers every time (Ray starts worker processes per
job): Ray's worker start and the torch import, Inductor's imports, CUDA and a first Triton compile
(~19 s on 4xH200 with 33 started together, against a ~15 s longest compile). Pool workers pay that
once: `up` starts them, `warm(compute=ComputeOptions(pool=True))` compiles in them (starting the
ones missing) and leaves them up for the next run. Each holds its compile resources (GPU
fraction, CPUs) while it lives and exits after `idle_timeout_s` without work, or on `down`.

Workers are named `vcr-compile-<spec>-<i>` in the `vllm_compile_ray` namespace, where <spec>
hashes what they were started for (device type, backend, resources, GPU sharing): a run with
other settings gets workers of its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from ..config import DEFAULT_POOL_IDLE_TIMEOUT_S as DEFAULT_IDLE_TIMEOUT_S
from ..errors import ConfigError
from ..experimental import gpu_sharing
from .compile_task import compile_piece, start_worker
from .trace_task import publish_traced

logger = logging.getLogger(__name__)

NAMESPACE = "vllm_compile_ray"
PREFIX = "vcr-compile-"
_WATCH_S = 5.0  # how often a worker checks its idle time
_RESTARTS = 3  # a crashed worker restarts (cold) and retries its compile, this often in its life


@dataclass(frozen=True)
class PoolSpec:
    """What a pool worker is started for; workers of one spec are interchangeable."""

    device_type: str
    backend: str = "inductor"
    gpus: float = 0.0
    cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    gpu_sharing: str = "time-slice"  # or "mps" (`gpu_sharing`)

    def __post_init__(self) -> None:
        gpu_sharing.check(self.gpu_sharing, self.device_type)

    @property
    def tag(self) -> str:
        """Names this spec with this package's code: a worker keeps the code it was started
        with, so a run of changed code (a new `ray job submit --working-dir`) gets new workers."""
        text = json.dumps({**asdict(self), "code": _code_id()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def options(self) -> dict[str, Any]:
        return {"num_gpus": self.gpus, "num_cpus": self.cpus, "resources": dict(self.resources)}


@functools.cache
def _code_id() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@ray.remote(concurrency_groups={"control": 1})
class CompileWorker:
    """One compile process of the pool. Compiles run one at a time (the default
    concurrency group); `describe` answers while a compile runs."""

    def __init__(self, spec: PoolSpec, idle_timeout_s: float):
        self.spec, self.idle_timeout_s = spec, idle_timeout_s
        self.last_active, self.active, self.served = time.time(), 0, 0
        self.started: dict[str, Any] | None = None
        self.warmed = False
        threading.Thread(target=self._watch, name="vcr-pool-idle", daemon=True).start()

    def start(self, warm: bool = True, delay_s: float = 0.0) -> dict[str, Any]:
        """`start_worker` once per process (warm: with its warm-up compile, which a later call may
        add); a worker already started returns at once, marked "reused"."""
        with self._busy(serves=False):
            if self.started is not None and (self.warmed or not warm):
                return {**self.started, "reused": True, "seconds": 0.0, "steps": {},
                        "entered_at": time.time(), "finished_at": time.time()}
            if self.started is None:
                out = start_worker(self.spec.backend, self.spec.cpus, self.spec.device_type,
                                   warm=warm, delay_s=delay_s, sharing=self.spec.gpu_sharing)
            else:  # started without its warm-up compile: add it
                out = {**self.started, **start_worker(self.spec.backend, self.spec.cpus,
                                                      self.spec.device_type, warm=True,
                                                      sharing=self.spec.gpu_sharing)}
            ctx = ray.get_runtime_context()
            out.update(node_id=ctx.get_node_id(),
                       gpu_ids=list(ctx.get_accelerator_ids().get("GPU", [])))
            self.started, self.warmed = out, warm
            return {**out, "reused": False}

    def compile(self, *args: Any) -> dict[str, Any]:
        """`compile_task.compile_piece` here."""
        with self._busy():
            return compile_piece(*args)

    def trace(self, *args: Any) -> str:
        """`trace_task.publish_traced` here: the warm's traced model, on a worker of the pool
        (which may hold every compile slot)."""
        with self._busy(serves=False):
            return publish_traced(*args)

    @ray.method(concurrency_group="control")
    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "started": self.started is not None, "busy": self.active > 0,
                "served": self.served, "idle_s": round(time.time() - self.last_active, 1),
                "idle_timeout_s": self.idle_timeout_s, "spec": asdict(self.spec)}

    @contextmanager
    def _busy(self, serves: bool = True) -> Iterator[None]:
        """A call at work: not idle meanwhile; `serves`: a compile, counted."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.served += serves
            self.last_active = time.time()

    def _watch(self) -> None:
        """Exit (for good: no restart) after idle_timeout_s without work, freeing the resources."""
        while True:
            time.sleep(min(_WATCH_S, self.idle_timeout_s))
            if not self.active and time.time() - self.last_active > self.idle_timeout_s:
                logger.info("compile worker idle for %.0f s: exiting", self.idle_timeout_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


def up(spec: PoolSpec, size: int, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
       delay_s: float = 0.0) -> list[tuple[ray.actor.ActorHandle, ray.ObjectRef]]:
    """Workers 0..size-1 of `spec` (those already up are reused; the rest are created), each with
    its start-up call: [(worker, start ref)]. Worker 0 answers its start first without the warm-up
    compile (its fingerprint keys a plan sooner), then warms up. Creating a worker does not wait
    for resources: one the cluster cannot place yet starts when they free up."""
    if size < 1:
        raise ConfigError(f"pool size {size!r} is invalid: must be >= 1")
    if idle_timeout_s <= 0:
        raise ConfigError(f"idle_timeout_s={idle_timeout_s!r} is invalid: must be > 0 seconds")
    out = []
    for i in range(size):
        worker = CompileWorker.options(
            name=f"{PREFIX}{spec.tag}-{i}", namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True, max_restarts=_RESTARTS, max_task_retries=_RESTARTS,
            runtime_env=spec.runtime_env or None, **spec.options()).remote(spec, idle_timeout_s)
        start = worker.start.options(name="vcr_start_worker")
        out.append((worker, start.remote(warm=i > 0, delay_s=delay_s)))
        if i == 0:  # its warm-up compile next; calls to a worker run in order
            start.remote(warm=True)
    return out


def names(spec: PoolSpec | None = None) -> list[str]:
    """Names of the live pool workers (of `spec`, or all)."""
    prefix = PREFIX + (f"{spec.tag}-" if spec else "")
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix))


def status(timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """One row per live pool worker: name, pid, node, started, busy, served, idle seconds, spec."""
    handles = {n: ray.get_actor(n, namespace=NAMESPACE) for n in names()}
    refs = {n: h.describe.remote() for n, h in handles.items()}
    rows = []
    for n, ref in refs.items():
        try:
            rows.append({"name": n, **ray.get(ref, timeout=timeout_s)})
        except (ray.exceptions.RayError, TimeoutError) as exc:
            rows.append({"name": n, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
    return rows


def down(spec: PoolSpec | None = None) -> list[str]:
    """Stop the pool's workers (of `spec`, or all, and then the nodes' MPS daemons as well:
    `gpu_sharing`); returns their names."""
    gone = names(spec)
    for n in gone:
        try:
            ray.kill(ray.get_actor(n, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # exited meanwhile
            pass
    if spec is None:
        gone += gpu_sharing.stop_all()
    return gone
