"""The driver's plan for `warm`: captured on meta (no weights, no GPU), split and keyed, then
keyed again for the fingerprint a compile node reports; its tasks longest expected first."""

from __future__ import annotations

import operator

import ray
import torch
import torch.fx as fx

from ..compiling.compiler_interface import make_compiler
from ..config import CompilationConfig
from ..errors import VcrError
from ..planning import intake
from ..planning.intake import ModelSpec
from ..planning.plan import CompileTask, Plan
from ..runtime.api import key_context, plan_model
from ..torch_private import ops

# Matmuls Inductor lowers through its GEMM autotuning (tuned_mm / tuned_addmm / tuned_bmm).
_GEMM_FUNCTIONS = (ops.LINEAR, torch.matmul, torch.mm, torch.bmm, torch.addmm,
                   operator.matmul)
_GEMM_METHODS = ("matmul", "mm", "bmm", "addmm")


def order_tasks(tasks: list[CompileTask]) -> list[CompileTask]:
    """Longest expected first: pieces with more GEMMs first, each piece's sizes descending and
    its dynamic compile last, then bigger pieces.

    With max-autotune a compile's time is mostly its GEMMs' benchmarks, and the size barely
    matters. Measured on 4xH200, serial loop (session 11), llama-3-8b: the layer piece (4 GEMMs)
    took 14-26 s at every size and 10 s dynamic, the last piece (3) 8-13 s and 8 s, the first
    piece (1) 1-2 s at every size; the order by size alone put each size's first piece before
    its layer piece, and the layer piece at size 1 among the last tasks of the queue."""
    def cost(task: CompileTask) -> tuple[int, int, int]:
        size = 0 if task.shape == "dynamic" else int(task.shape)
        return (-gemm_count(task.piece.graph), -size, -len(task.piece.graph.graph.nodes))
    return sorted(tasks, key=cost)


def gemm_count(graph: fx.GraphModule) -> int:
    """How many matmuls Inductor will autotune in the graph."""
    def is_gemm(node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target in _GEMM_FUNCTIONS) or (
            node.op == "call_method" and node.target in _GEMM_METHODS)
    return sum(1 for node in graph.graph.nodes if is_gemm(node))


def draft_plan(model: str | ModelSpec, config: CompilationConfig, tp_size: int,
               num_layers: int | None, device_type: str,
               fingerprint: dict[str, str] | None) -> Plan:
    """Capture (on meta; a CPU target on CPU: `intake.build_for_plan`), split and key
    (`plan_model`); keyed for `fingerprint`, or for none yet when None (a compile node is
    computing it: `keyed` keys the plan again once it has come). Its tasks are the run's,
    whatever the fingerprint."""
    spec = intake.build_for_plan(model, tp_size=tp_size, device_type=device_type,
                                 num_layers=num_layers) if isinstance(model, str) else model
    return plan_model(spec.module, config, device_type=device_type,
                      fingerprint=fingerprint or {}, example_inputs=spec.example_inputs)


def keyed(draft: Plan, config: CompilationConfig, device_type: str,
          fp_ref: ray.ObjectRef) -> Plan:
    """`draft` keyed for the fingerprint that `fp_ref` (a `start_worker` task) computes."""
    try:
        fingerprint = ray.get(fp_ref)["fingerprint"]
    except ray.exceptions.RayError as exc:
        raise VcrError(f"a compile node could not compute the environment fingerprint for "
                       f"device_type={device_type!r}: {exc}") from exc
    return draft.rekeyed(key_context(config, make_compiler(config), device_type, fingerprint))
