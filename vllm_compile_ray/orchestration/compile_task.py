"""The Ray side of a warm run: one task compiles one (piece, shape) and publishes it to the store.

Tasks run in long-lived workers (`max_calls=0`, see `compile_remote`), get their canonical piece
by object reference (put once by the driver), publish artifact bytes straight to the store and
return a small row; counts and timings go to the stats actor, deduplicated by task id.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from ..cache.store import ArtifactStore
from ..compiling import cpu_time, heap
from ..compiling.compiler_interface import make_compiler
from ..compiling.counters import CompilationCounter
from ..compiling.monitor import PerformanceMonitor
from ..config import CompilationConfig
from ..errors import CompileError, VcrError
from ..experimental import gpu_sharing
from ..keys import fingerprint_hash
from ..planning.canonical import CanonicalPiece
from ..runtime.manager import CompilerManager
from ..torch_private import inductor, inductor_metrics
from . import metrics
from .stats import get_stats_actor


@dataclass(frozen=True)
class Faults:
    """Fault injection for tests. Patterns match task names, with * and ? as wildcards."""

    crash_once: str = ""  # the worker exits (os._exit) after the first attempt reported its result
    fail: str = ""  # every compile attempt raises CompileError
    sleep: str = ""  # sleep `sleep_s` before compiling (to outlast max_compile_time)
    sleep_s: float = 0.0
    startup_sleep_s: float = 0.0  # every worker start-up (`start_worker`) sleeps this long first
    marker_dir: str = ""  # crash_once markers, one file per task id, and sleeping-<pid> files
    # written as a `sleep` starts (so a test can kill exactly a worker that is mid-compile);
    # must be shared by all nodes

    def __post_init__(self) -> None:
        if self.crash_once and not self.marker_dir:
            raise VcrError("Faults.crash_once needs Faults.marker_dir (a directory every node sees)")

    def _hit(self, pattern: str, name: str) -> bool:
        # Brackets are literal ("compile[*/2]"): only * and ? are wildcards.
        return bool(pattern) and fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))

    def before_compile(self, name: str) -> None:
        if self._hit(self.sleep, name):
            if self.marker_dir:
                open(os.path.join(self.marker_dir, f"sleeping-{os.getpid()}"), "w").close()
            time.sleep(self.sleep_s)
        if self._hit(self.fail, name):
            raise CompileError(f"injected compile failure in {name}")

    def after_report(self, name: str, task_id: str) -> None:
        if not self._hit(self.crash_once, name):
            return
        try:  # O_EXCL: exactly one attempt of this task id creates the marker and crashes
            fd = os.open(os.path.join(self.marker_dir, f"crash-{task_id}"), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


@dataclass(frozen=True)
class TaskContext:
    """What every task of one warm run shares; put in the object store once per run."""

    run_id: str
    config: CompilationConfig
    store: ArtifactStore
    device_type: str
    fingerprint_id: str
    compile_retries: int = 1
    faults: Faults = field(default_factory=Faults)
    gpu_sharing: str = "time-slice"  # or "mps": see `gpu_sharing`


class CompileTaskError(CompileError):
    """A compile task gave up; `row` is its result row (status "failed", error)."""

    def __init__(self, row: dict[str, Any]):
        super().__init__(row.get("error", "compile failed"))
        self.row = row

    def __reduce__(self) -> tuple:  # Ray pickles the exception to the driver
        return (CompileTaskError, (self.row,))


@functools.cache
def _local_fingerprint(device_type: str) -> dict[str, str]:
    return inductor.environment_fingerprint(device_type)


def _before_cuda(sharing: str) -> dict[str, Any]:
    """What a task does before CUDA can start in its process: note the GPUs it binds to, and
    join the GPU sharing (`gpu_sharing.join`); both once per process."""
    _process_gpu_ids()
    return gpu_sharing.join(sharing)


def start_worker(backend: str, cpus: float, device_type: str, warm: bool = True,
                 delay_s: float = 0.0, sharing: str = "time-slice") -> dict[str, Any]:
    """Pay a compile worker's start-up while the driver plans: torch, Triton and Inductor
    imports, the torch fingerprint, Inductor's compile pool, this node's environment fingerprint
    for `device_type` and, on CUDA with `warm`, one tiny compile (`inductor.warm_device`: CUDA
    context, Triton's compiler and launcher). CUDA binds the worker to the GPUs Ray gives this
    start-up, and the worker keeps them for every later task (as it would from its first
    compile; rows report both, see `_process_gpu_ids`). Then it freezes the heap (`heap.freeze`:
    measured on 1xH200, a layer piece's max-autotune compile at 512 took 7.8-7.9 s instead of
    8.5-8.8 s). delay_s: `Faults.startup_sleep_s`. sharing: how it shares its GPU
    (`gpu_sharing.join`, first: before CUDA starts).
    Returns {"pid", "fingerprint", "seconds", "entered_at", "finished_at", "frozen_objects",
    "gpu_sharing" (what `gpu_sharing.join` returned), "steps": seconds by step}."""
    entered_at, start = time.time(), time.perf_counter()
    steps: dict[str, float] = {}
    mark = start

    def step(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        steps[name] = round(now - mark, 3)
        mark = now

    if delay_s:
        time.sleep(delay_s)
        step("sleep")
    shared = _before_cuda(sharing)
    step("gpu_sharing")

    if backend == "inductor":
        inductor.import_compiler()  # the heavy imports of a first compile
        try:
            import triton  # noqa: F401
        except ImportError:
            pass
        inductor.torch_fingerprint()
        inductor.set_compile_threads(int(cpus))  # more than one: Inductor's compile processes
        inductor.quiet_autotune_logs()
        inductor.warm_compile_pool()
        step("imports")
    found = _local_fingerprint(device_type)  # after _before_cuda: it may start CUDA
    step("fingerprint")
    if backend == "inductor" and warm:
        inductor.warm_device(device_type)
        step("warm_compile")
    frozen = heap.freeze()  # full collections during compiles skip what start-up left alive
    step("freeze_heap")
    return {"pid": os.getpid(), "fingerprint": found, "steps": steps, "frozen_objects": frozen,
            "gpu_sharing": shared,
            "seconds": round(time.perf_counter() - start, 3), "entered_at": entered_at,
            "finished_at": time.time()}


def task_name(code_id: str, shape: int | str) -> str:
    """As `CompileTask.name`: the dashboard's task table reads as progress."""
    return f"compile[{code_id}/{shape}]"


def _fingerprint_mismatch(ctx: TaskContext) -> str:
    """Why this node must not compile (or tune) for the plan, or "" if its fingerprint matches."""
    own = fingerprint_hash(_local_fingerprint(ctx.device_type))
    if own == ctx.fingerprint_id:
        return ""
    where = _where()
    return (f"node {where['node_id'][:8]} ({where['host']}) has environment fingerprint {own}, but "
            f"the plan was made for {ctx.fingerprint_id}: compile nodes must match the fingerprint "
            "node (same torch, Triton and GPU model); restrict placement with resources=")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _gpu_ids() -> tuple[str, ...]:
    return tuple(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


@functools.cache
def _process_gpu_ids() -> tuple[str, ...]:
    """The GPUs of this worker's first task. CUDA binds to them when that task initializes it,
    and a reused worker keeps them even when Ray assigns a later task other GPUs (measured with
    fake GPUs: one worker ran tasks assigned GPU 0 and GPU 1). Rows report both."""
    return _gpu_ids()


def _where() -> dict[str, Any]:
    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "gpu_ids": list(_gpu_ids()),
            "process_gpu_ids": list(_process_gpu_ids())}


def compile_piece(piece: CanonicalPiece, ctx: TaskContext, key: str, code_id: str,
                  shape: int | str) -> dict[str, Any]:
    """Compile one (piece, shape), publish it, report to the stats actor; returns its row.

    The row counts the GEMM selections the compile benchmarked ("gemm_benchmarked") and the GEMM
    autotune choices that failed to precompile ("autotune_failed"; their tracebacks not logged).
    Raises CompileTaskError (after reporting) when every compile attempt failed.
    """
    entered_at = time.time()
    name = task_name(code_id, shape)
    task_id = ray.get_runtime_context().get_task_id()
    shared = _before_cuda(ctx.gpu_sharing)
    mismatch = _fingerprint_mismatch(ctx)  # seconds in a fresh worker
    stats = get_stats_actor()
    _, recorded = ray.get(stats.start.remote(ctx.run_id, task_id))  # max_compile_time from here
    if recorded is not None:  # an earlier attempt finished and reported, then its worker died
        if recorded["status"] == "failed":
            raise CompileTaskError(recorded)
        return recorded
    row: dict[str, Any] = {"name": name, "key": key, "shape": str(shape), "code_id": code_id,
                           **_where(), "gpu_sharing": shared["gpu_sharing"],
                           "mps_pipe": shared.get("mps_pipe", ""),
                           "seconds": 0.0, "bytes": 0, "sha256": "", "error": "",
                           "entered_at": entered_at, "started_at": time.time()}
    counter, monitor = CompilationCounter(), PerformanceMonitor()
    start = time.perf_counter()
    if mismatch:
        row.update(status="failed", error=mismatch)
    elif ctx.store.contains(key):  # published since the driver checked (another warm run)
        row["status"] = "cached"
    else:
        if ctx.config.backend == "inductor":
            benchmarked = inductor_metrics.gemm_benchmarks()
        with (inductor_metrics.phase_times() as phases, heap.collections() as collected,
              cpu_time.measure() as cpu, inductor_metrics.autotune_failures() as autotune):
            row.update(_compile_with_retries(piece, ctx, key, shape, name, counter, monitor))
        row["phases"] = phases
        row.update(autotune)  # autotune_failed, autotune_error: choices skipped, not tracebacks
        row.update(cpu)  # cpu_s, child_cpu_s (the process's), run_s, runq_s (this thread's)
        row["gc_s"], row["gc_collections"] = collected["seconds"], collected["collections"]
        if ctx.config.backend == "inductor":
            row["gemm_benchmarked"] = inductor_metrics.gemm_benchmarks() - benchmarked
    row["wall_s"] = round(time.perf_counter() - start, 4)
    row["finished_at"] = time.time()
    row["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    metrics.record_task(row["status"], row["seconds"], row["bytes"] if row.get("published") else 0)
    row = ray.get(stats.finish.remote(ctx.run_id, task_id, row, counter.to_dict(), monitor.to_dict()))
    ctx.faults.after_report(name, task_id)
    if row["status"] == "failed":
        raise CompileTaskError(row)
    return row


def _compile_with_retries(piece: CanonicalPiece, ctx: TaskContext, key: str, shape: int | str,
                          name: str, counter: CompilationCounter,
                          monitor: PerformanceMonitor) -> dict[str, Any]:
    if ctx.config.backend == "inductor":
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        inductor.set_compile_threads(int(cpus))
        inductor.quiet_autotune_logs()
    manager = CompilerManager(ctx.config, make_compiler(ctx.config), ctx.store, ctx.device_type,
                              ctx.fingerprint_id, counter, monitor)
    errors = []
    for _ in range(ctx.compile_retries + 1):
        try:
            ctx.faults.before_compile(name)
            saved_before = counter.num_artifacts_saved
            _, meta = manager.compile(key, piece, shape, publish=True, name=name)
        except Exception as exc:  # recorded in the row and retried; never swallowed silently
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        # The stored object is what loaders get (ours, or a racing run's): checksum that.
        payload = ctx.store.fetch(key).payload
        return {"status": "compiled", "seconds": float(meta["compile_seconds"]),
                "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                "published": counter.num_artifacts_saved > saved_before,
                "compile_attempts": len(errors) + 1, "torch": meta["torch"],
                "tune_s": float(meta.get("tune_seconds", 0.0)),
                **{k: meta[k] for k in ("check_kernel_compiles", "check_autotunes",
                                        "bundle_cut_undone", "bundle_groups",
                                        "bundle_groups_kept") if k in meta},
                "publish_s": round(monitor.stats("publish")["total"], 4),
                "error": "; ".join(errors)}
    return {"status": "failed", "compile_attempts": len(errors), "error": errors[-1]}


# Ray makes GPU tasks single-use by default (max_calls=1, ray-project/ray#29624: frees GPU memory
# held by frameworks). Compiles want the opposite: torch import and Triton start-up once per worker.
# Measured: with max_calls=0, 8 fake-GPU tasks ran in 4 worker processes (one per concurrent slot),
# and a second batch reused the same pids; without it every task started a new process.
compile_remote = ray.remote(max_calls=0)(compile_piece)
start_worker_remote = ray.remote(max_calls=0)(start_worker)
