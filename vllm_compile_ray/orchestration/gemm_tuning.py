"""GEMM tuning fan-out: max-autotune's GEMM benchmarking split out of the piece compiles.

With `max_autotune`, most of a piece's compile is Inductor precompiling and benchmarking every
GEMM template config of each matmul in it, and the longest piece compile bounds a warm run however
many GPUs it has. The matmuls are few and shared: every layer piece has the same four GEMMs, the
first and last pieces repeat some of them, and the same (M, N, K) recurs at each size. So a warm
run first tunes each unique GEMM problem (one matmul, its input shapes, strides and dtypes, at
one size) as a task of its own: a graph of that one matmul, compiled with the run's options in a
private Inductor cache, whose autotune timings (Inductor's local autotune cache entries) are the
result. A piece compile then installs the timings of its GEMMs first: Inductor finds every choice
timed, skips precompiling and benchmarking them and picks the fastest as it would have.

A timing that does not match (another layout in the piece, a choice set that differs) only costs
the speed-up: Inductor benchmarks that GEMM itself, which the compile row reports.

Two ways to run them (`warm(tune_gemms=...)`):
- "ahead": tunes first, each in a private Inductor cache; the driver hands each compile the
  timings of its GEMMs when they are all tuned. Works across nodes, but adds a step to the
  critical path.
- "alongside": tunes and compiles at once; each tune benchmarks in its node's Inductor cache
  under the per-GEMM lock of `autotune_cache.share_gemm_timings`, so a compile that reaches that
  GEMM waits for the tune's timings instead of benchmarking it, and the GEMMs of one long piece
  are benchmarked side by side by several tunes rather than one after another by its compile.
  Node-local: a compile on another node than a tune benchmarks that GEMM itself.

Measured: benchmarks/RESULTS.md. Off by default.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..compiling import autotune_cache, inductor
from ..keys import problem_id
from ..planning.canonical import CanonicalPiece, canonicalize

# Matmuls Inductor lowers through its GEMM autotuning (tuned_mm / tuned_addmm / tuned_bmm).
_GEMM_FUNCTIONS = (torch._C._nn.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm,
                   operator.matmul)
_GEMM_METHODS = ("matmul", "mm", "bmm", "addmm")
_ADDS = (operator.add, torch.add)
# Measured on an H200 (torch 2.11): every tune task at sizes 1, 2 and 4 failed its worker (12 of
# 54 in a llama-3-8b run; cause not found yet), while the compiles at those sizes are short.
# Those compiles tune their own GEMMs.
MIN_TUNED_SIZE = 8


@dataclass(frozen=True)
class GemmProblem:
    """One matmul of a piece as a graph of its own (canonical: equal problems are equal)."""

    piece: CanonicalPiece = field(compare=False, repr=False)
    problem_id: str  # digest of the graph code and input specs

    @property
    def flops_hint(self) -> int:
        """Static size of the operands (elements), to tune big problems first."""
        total = 1
        for spec in self.piece.input_specs:
            for dim in spec.shape:
                total *= dim if isinstance(dim, int) else 1
        return total


@dataclass(frozen=True)
class TuneTask:
    """One GEMM problem at one shape ("dynamic" or a size)."""

    problem: GemmProblem
    shape: int | str

    @property
    def name(self) -> str:
        return f"tune[{self.problem.problem_id}/{self.shape}]"


def is_gemm(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _GEMM_FUNCTIONS
    return node.op == "call_method" and node.target in _GEMM_METHODS


def gemm_count(piece: CanonicalPiece) -> int:
    """How many matmuls Inductor will autotune in the piece (`is_gemm` nodes)."""
    return sum(1 for node in piece.graph.graph.nodes if is_gemm(node))


def gemm_problems(piece: CanonicalPiece, device_type: str) -> list[GemmProblem]:
    """The piece's matmuls, each as a one-op graph over placeholders with the piece's input
    specs at that op (symbolic sizes kept), deduplicated. Propagates fake tensors on the meta
    device, so it needs no GPU."""
    gemms = [n for n in piece.graph.graph.nodes if is_gemm(n)]
    if not gemms:
        return []
    values = inductor.symbolic_values(piece.graph, piece.input_specs)
    out: dict[str, GemmProblem] = {}
    for node in gemms:
        # A residual add right after a matmul may become one addmm, which Inductor tunes under
        # its own key; whether it does depends on the rest of the piece, so tune both forms.
        for add in [None, *(u for u in node.users if _is_residual_add(u, node, values))]:
            problem = _problem(node, add, values, device_type)
            out.setdefault(problem.problem_id, problem)
    return list(out.values())


def _is_residual_add(user: fx.Node, gemm: fx.Node, values: dict[fx.Node, Any]) -> bool:
    if not (user.op == "call_function" and user.target in _ADDS and len(user.args) == 2
            and not user.kwargs):
        return False
    other = user.args[1] if user.args[0] is gemm else user.args[0]
    return (isinstance(other, fx.Node) and other is not gemm
            and isinstance(values.get(other), torch.Tensor)
            and values[other].shape == values[gemm].shape)


def _problem(node: fx.Node, add: fx.Node | None, values: dict[fx.Node, Any],
             device_type: str) -> GemmProblem:
    """The one-op graph of `node` (then `add`, its residual add, when given)."""
    graph = fx.Graph()
    inputs: dict[fx.Node, fx.Node] = {}

    def placeholder(arg: fx.Node) -> fx.Node:
        if arg not in inputs:
            new = inputs[arg] = graph.placeholder(f"arg{len(inputs)}")
            new.meta["example_value"] = values[arg]
        return inputs[arg]

    args = fx.node.map_arg(node.args, placeholder)
    kwargs = fx.node.map_arg(node.kwargs, placeholder)
    result = graph.create_node(node.op, node.target, args, kwargs)
    if add is not None:
        result = graph.create_node("call_function", add.target, tuple(
            result if a is node else placeholder(a) for a in add.args))
    graph.output((result,))
    piece = canonicalize(fx.GraphModule(torch.nn.Module(), graph), device_type)
    return GemmProblem(piece, problem_id(piece.code, piece.input_specs))


def tune_tasks(todo: list[Any], device_type: str) -> tuple[list[TuneTask], dict[str, list[str]]]:
    """The unique tune tasks that compile tasks `todo` (`plan.CompileTask`s) want, biggest first,
    and for each compile task's key the names of its tune tasks."""
    problems: dict[str, list[GemmProblem]] = {}  # code id -> the piece's problems
    tasks: dict[str, TuneTask] = {}
    needs: dict[str, list[str]] = {}
    for task in todo:
        if isinstance(task.shape, int) and task.shape < MIN_TUNED_SIZE:
            continue
        if task.code_id not in problems:
            problems[task.code_id] = gemm_problems(task.piece, device_type)
        wanted = [TuneTask(p, task.shape) for p in problems[task.code_id]]
        needs[task.key] = [t.name for t in wanted]
        for tune_task in wanted:
            tasks.setdefault(tune_task.name, tune_task)
    size = {t.shape: 1 << 30 if t.shape == "dynamic" else int(t.shape) for t in tasks.values()}
    ordered = sorted(tasks.values(), key=lambda t: (-size[t.shape], -t.problem.flops_hint,
                                                    t.problem.problem_id))
    return ordered, needs


def tune(problem: GemmProblem, shape: int | str, options: dict[str, Any], device: str,
         before: Callable[[], None] | None = None, shared: bool = False) -> dict[str, Any]:
    """Compile the problem's graph for `shape` in a private Inductor cache; returns a row with
    the autotune timings it recorded ("timings"), the GEMM selections it benchmarked and its
    seconds. shared=True compiles in this process's Inductor cache, where the timings stay for
    the node's compiles (none in the row: "alongside" tuning). Never raises: a failed tuning
    leaves the piece compiles to tune for themselves. `before` runs first, inside the same error
    handling (fault injection in tests)."""
    start = time.perf_counter()
    piece = problem.piece
    try:
        if before is not None:
            before()
        if shape == "dynamic":
            def compile_it() -> Any:
                return inductor.compile_dynamic(piece.graph, piece.input_specs, device, options,
                                                save=False)  # only its timings are wanted
        else:
            inputs = inductor.example_tensors(piece.input_specs, int(shape), device)

            def compile_it() -> Any:
                return inductor.compile_static(piece.graph, inputs, options, save=False)
        timings, benchmarked = autotune_cache.gemm_timings(compile_it, private=not shared)
    except Exception as exc:  # reported in the row; the compiles benchmark this GEMM themselves
        return {"status": "failed", "timings": {}, "benchmarked": 0,
                "seconds": round(time.perf_counter() - start, 4),
                "error": f"{type(exc).__name__}: {exc}"[:1000]}
    return {"status": "tuned", "timings": timings, "benchmarked": benchmarked,
            "choices": autotune_cache.count_timings(timings),
            "seconds": round(time.perf_counter() - start, 4), "error": ""}
