"""How many compiles run at once when `warm` is not told: sized from the GPU nodes and the tasks.

Measured on one H200 host (16 cores, llama-3-8b, 33 max-autotune compiles): the compile phase is
CPU-bound. 4 compiles per GPU (the old default, 0.25 GPU each) took 160.7 s end to end, 16
compiles of one CPU each 79.1 s. Session 18, `vcr warm` end to end on one such host: 8 compiles
64.9 s, 12 compiles 58.8 s, 16 compiles 64.1 / 70.7 s (summed compile seconds 380 / 497 / 720:
past 12 the compiles mostly slow each other down, and the driver, Ray and the compiles' own
helper threads need cores too). So a node runs one compile per core of `CPU_SHARE` of its
cores, no more than its memory holds (`MEMORY_PER_COMPILE` each) and no more than the run has
tasks (spread over the nodes, which spreads them over a node's GPUs too: Ray fills one GPU
with fractions before the next).

Pure: node resources and a task count in, a `Sizing` out; no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A compile worker's peak RSS was 1.5-1.6 GiB (llama-3-8b pieces, max-autotune, RESULTS.md);
# 4 GiB each leaves room for larger pieces and Inductor's compile subprocesses.
MEMORY_PER_COMPILE = 4 * 2**30
CPU_SHARE = 0.75  # of a node's cores that run compiles (see above)
_UNITS = 10000  # Ray counts resources in units of 1/10000


@dataclass(frozen=True)
class NodeResources:
    """What one alive Ray node offers: CPUs, GPUs, and bytes of Ray's "memory" resource."""

    cpus: float
    gpus: float
    memory: float = 0.0  # 0: unknown (no memory bound)

    @classmethod
    def from_ray(cls, node: Mapping[str, Any]) -> NodeResources:
        """From an entry of `ray.nodes()`."""
        res = node.get("Resources", {})
        return cls(float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)),
                   float(res.get("memory", 0.0)))


@dataclass(frozen=True)
class Sizing:
    """Compile slots over the GPU nodes, and what each compile asks of Ray to get them."""

    slots: int  # compiles at once, all nodes
    per_gpu: int  # compiles sharing one GPU
    gpus_per_compile: float  # 1/per_gpu, rounded down to Ray's units so per_gpu fit in one GPU
    cpus_per_compile: float
    nodes: int  # GPU nodes
    cpus: float  # of those nodes, in all
    gpus: float
    tasks: int | None = None

    def describe(self) -> str:
        """One progress line, as `warm` prints it."""
        gpus = f"{self.gpus:g} GPU" + ("s" if self.gpus != 1 else "")
        frac = "1" if self.per_gpu == 1 else f"1/{self.per_gpu}"
        cap = f" for {self.tasks} tasks" if self.slots == self.tasks else ""
        return (f"sizing: {self.slots} compile slots{cap} on {self.nodes} GPU node(s): "
                f"{self.cpus:g} CPUs, {gpus} -> {frac} GPU and {self.cpus_per_compile:g} CPU each")


def fits(have: float, need: float, resource: str) -> int:
    """How many requests of `need` a node's `have` of `resource` holds, as Ray counts: in units
    of 1/10000, and a GPU fraction below one must fit within one GPU (so 4 GPUs hold 32 tasks
    of 4/33 GPU: 8 of 0.1212 on each; measured with fake GPUs)."""
    units = max(1, round(need * _UNITS))
    if resource == "GPU" and units < _UNITS:
        return math.floor(have + 1e-9) * (_UNITS // units)
    return round(have * _UNITS) // units


def gpu_fraction(per_gpu: int) -> float:
    """The largest GPU fraction of which `per_gpu` fit in one GPU as Ray counts (1/7 = 0.1429
    would fit 6)."""
    if per_gpu < 1:
        raise ValueError(f"per_gpu={per_gpu!r} is invalid: must be >= 1")
    return math.floor(_UNITS / per_gpu) / _UNITS


def size_compiles(nodes: Sequence[NodeResources], tasks: int | None = None, *,
                  cpus_per_compile: float = 1.0,
                  memory_per_compile: float = MEMORY_PER_COMPILE) -> Sizing | None:
    """Compile slots for `tasks` (None: as many as the nodes hold) on the nodes with a GPU; None
    when no node has one.

    Each GPU node wants min(CPU_SHARE of its CPUs / cpus_per_compile, its share of the tasks)
    compiles, at least one per GPU, spread over its GPUs; its memory caps them at
    memory / memory_per_compile (rounded down per GPU). One GPU fraction serves every node, so the node that takes the
    fewest compiles per GPU sets it (a uniform cluster loses nothing). Ray's CPU request caps
    the rest: a node with fewer CPUs than GPU slots runs as many compiles as it has CPUs."""
    if tasks is not None and tasks < 1:
        raise ValueError(f"tasks={tasks!r} is invalid: must be >= 1 or None")
    if cpus_per_compile < 0 or memory_per_compile <= 0:
        raise ValueError(f"cpus_per_compile={cpus_per_compile!r} must be >= 0 and "
                         f"memory_per_compile={memory_per_compile!r} > 0")
    gpu_nodes = [n for n in nodes if n.gpus >= 1]
    if not gpu_nodes:
        return None
    share = math.ceil(tasks / len(gpu_nodes)) if tasks is not None else math.inf
    per_gpu = None
    for node in gpu_nodes:
        gpus = math.floor(node.gpus + 1e-9)
        by_memory = int(node.memory // memory_per_compile) if node.memory else None
        by_cpus = max(1, math.floor(node.cpus * CPU_SHARE / cpus_per_compile + 1e-9)) \
            if cpus_per_compile else math.inf
        wanted = min(share, by_cpus)
        if wanted == math.inf:  # no CPU request and no task count: memory, else one per GPU
            wanted = by_memory if by_memory is not None else gpus
        here = math.ceil(max(1, wanted) / gpus)
        if by_memory is not None:
            here = min(here, max(1, by_memory // gpus))
        per_gpu = here if per_gpu is None else min(per_gpu, here)
    fraction = gpu_fraction(per_gpu)
    slots = sum(min(fits(n.gpus, fraction, "GPU"),
                    fits(n.cpus, cpus_per_compile, "CPU") if cpus_per_compile else math.inf)
                for n in gpu_nodes)
    if tasks is not None:
        slots = min(slots, tasks)
    return Sizing(slots=int(slots), per_gpu=per_gpu, gpus_per_compile=fraction,
                  cpus_per_compile=cpus_per_compile, nodes=len(gpu_nodes),
                  cpus=sum(n.cpus for n in gpu_nodes), gpus=sum(n.gpus for n in gpu_nodes),
                  tasks=tasks)
