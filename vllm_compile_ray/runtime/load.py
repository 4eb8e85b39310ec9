"""`load`: a tensor-parallel rank's startup: a runnable compiled model from the shared cache.

    compiled = vllm_compile_ray.load(model, cfg, rank=rank, world_size=tp)
    print(compiled.report.table())

The model is traced, split and keyed exactly as `compile()` and the warm job do (keys carry no
rank and no device index: the shards of a TP group have equal shapes, so every rank computes the
same keys and one artifact serves them all). All artifacts come in one batched, concurrent fetch,
verified and staged node-locally once per node (`staging.SharedStaging`), then load; misses follow
`config.on_miss`. With warmup=True each compiled shape runs once before `load` returns.

CUDA: keys and artifacts carry no device index either. An artifact compiled on one GPU runs on a
model on any other: the loader rewrites the index Inductor's generated code names (see
retarget.py), so a rank may keep every GPU visible and put its model on cuda:i.
Launchers that give each rank one visible GPU can build its environment with `rank_device_env`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import keys as keys_mod
from ..cache.staging import SharedStaging
from ..cache.store import ArtifactStore
from ..compiling.counters import CompilationCounter
from ..compiling.monitor import PerformanceMonitor
from ..compiling.passes import PostGradPassManager
from ..config import CompilationConfig
from ..errors import ConfigError, VcrError
from ..planning.hf import maybe_prepare
from ..planning.inputs import ExampleInputs, as_call, example_call
from ..torch_private import inductor_metrics, triton_key
from ..torch_private.dynamo import backend_failure_cause
from . import aot
from .api import CompiledModel, compile as compile_model, model_device, open_store, trace_size
from .backend import VcrBackend
from .gc_pause import gc_paused

try:
    from ..cache import manifest as manifest_mod
except ImportError:  # the warm job's manifest is an optimization for loading, never required
    manifest_mod = None

logger = logging.getLogger(__name__)

# The stats actor of the warm driver (stats.py): named, namespaced, aggregates startup reports.
STATS_ACTOR = "vcr_stats"
STATS_NAMESPACE = "vllm_compile_ray"


@dataclass
class StartupReport:
    """One rank's startup: where the time went and what the cache did. Seconds, bytes, counts."""

    rank: int = 0
    world_size: int = 1
    model: str = "<model>"
    device: str = "cpu"
    on_miss: str = ""
    setup_s: float = 0.0  # compiler, environment fingerprint, store access check
    trace_s: float = 0.0  # dynamo capture of the whole model (or its restore: `aot`)
    dynamo: str = ""  # "restored", "traced+published", "traced" or "off: <why>" (`aot.start`)
    key_s: float = 0.0  # split, canonicalize and key every piece
    lookup_s: float = 0.0  # which keys the cache holds: the warm job's manifest read (overlapped)
    fetch_s: float = 0.0  # the batched fetch: staged reads and downloads, verified
    load_s: float = 0.0  # artifact bytes -> callables
    compile_s: float = 0.0  # local compiles on misses ("compile", "compile_and_publish")
    first_call_s: float = 0.0  # each warmed shape's first run
    total_s: float = 0.0
    pieces: int = 0  # compiled pieces in the split graphs
    tasks: int = 0  # unique (piece, shape) keys
    graphs: int = 1  # split graphs: more when a warm-up size was outside the first's guards
    later: str = ""  # how those came: "restored", "traced+published", ... (`aot.later`)
    hits: int = 0  # artifacts loaded from the cache
    misses: int = 0
    compiles: int = 0
    eager_fallbacks: int = 0  # piece calls that ran eagerly during startup
    # Kernels compiled (Triton compiles missing Triton's cache, C++ builds) and kernels autotuned
    # in this process during startup: 0 when every artifact was complete
    # (`inductor_metrics.kernel_work`)
    kernel_compiles: int = 0
    autotunes: int = 0
    rejected: int = 0  # artifacts found but refused (corrupt, foreign fingerprint)
    downloaded: int = 0  # artifacts this rank downloaded
    staged: int = 0  # artifacts already staged on this node (by another rank or an earlier start)
    bytes_loaded: int = 0
    bytes_downloaded: int = 0
    manifest_keys: int = 0  # keys the warm job's manifest listed for this config (prefetched)
    prefetched_unused: int = 0  # of those, keys the plan did not need (config or env differs)
    warm_sizes: tuple[int, ...] = ()
    keys_id: str = ""  # digest of the sorted keys: equal on every rank of a TP group

    @property
    def key_ms_per_piece(self) -> float:
        return 1e3 * self.key_s / max(1, self.pieces)

    @property
    def lookup_ms_per_key(self) -> float:
        """Finding which keys the cache holds: the manifest read when the warm job left one,
        else the whole fetch (the batched fetch is the lookup then)."""
        return 1e3 * (self.lookup_s if self.manifest_keys else self.fetch_s) / max(1, self.tasks)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["warm_sizes"] = list(self.warm_sizes)
        out["key_ms_per_piece"] = self.key_ms_per_piece
        out["lookup_ms_per_key"] = self.lookup_ms_per_key
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StartupReport:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["warm_sizes"] = tuple(kw.get("warm_sizes", ()))
        return cls(**kw)

    def table(self) -> str:
        return format_reports([self])


_COLUMNS = (("rank", "{:d}"), ("setup_s", "{:.3f}"), ("trace_s", "{:.3f}"), ("key_s", "{:.3f}"),
            ("fetch_s", "{:.3f}"), ("load_s", "{:.3f}"), ("compile_s", "{:.3f}"),
            ("first_call_s", "{:.3f}"), ("total_s", "{:.3f}"), ("tasks", "{:d}"), ("hits", "{:d}"),
            ("misses", "{:d}"), ("compiles", "{:d}"), ("eager_fallbacks", "{:d}"),
            ("kernel_compiles", "{:d}"), ("autotunes", "{:d}"), ("downloaded", "{:d}"),
            ("staged", "{:d}"), ("bytes_loaded", "{:d}"))


def format_reports(reports: Sequence[StartupReport]) -> str:
    """A plain-text table, one row per rank (what `vcr load` prints)."""
    header = [name.removesuffix("_s") + ("(s)" if name.endswith("_s") else "")
              for name, _ in _COLUMNS]
    rows = [[fmt.format(getattr(r, name)) for name, fmt in _COLUMNS]
            for r in sorted(reports, key=lambda r: r.rank)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([_title(reports), line(header), *(line(r) for r in rows)])


def _title(reports: Sequence[StartupReport]) -> str:
    if not reports:
        return "startup"
    first = reports[0]
    more = (f", {first.graphs - 1} more graph(s) {first.later or 'traced'} for warm-up sizes "
            "outside its guards" if first.graphs > 1 else "")
    return (f"startup of {first.model} on {first.device} (on_miss={first.on_miss!r}, dynamo "
            f"{first.dynamo or 'traced'}{more})")


def push_report(report: StartupReport, timeout_s: float = 10.0) -> bool:
    """Send the report to the stats actor if Ray is up and the actor exists; True if sent.

    Ray is not imported here: if this process never imported it, Ray is not running in it.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        actor = ray.get_actor(STATS_ACTOR, namespace=STATS_NAMESPACE)
    except ValueError:  # no such actor: no warm driver aggregating in this cluster
        return False
    try:
        ray.get(actor.add_startup_report.remote(report.to_dict()), timeout=timeout_s)
    except (AttributeError, ray.exceptions.RayError) as exc:
        # Telemetry must not fail a rank's startup; the report stays on the CompiledModel.
        logger.warning("could not send the startup report to %s: %s: %s", STATS_ACTOR,
                       type(exc).__name__, exc)
        return False
    return True


def rank_device_env(local_rank: int, visible: str | None = None) -> dict[str, str]:
    """Environment for a rank process that sees only its own GPU (as cuda:0).

    visible: the parent's CUDA_VISIBLE_DEVICES (None: all GPUs, numbered 0..n-1). For launchers;
    Ray GPU workers already get this from Ray.
    """
    devices = [d for d in (visible or "").split(",") if d.strip()] if visible else None
    if devices is not None and not 0 <= local_rank < len(devices):
        raise ConfigError(f"local_rank={local_rank} is out of range for CUDA_VISIBLE_DEVICES="
                          f"{visible!r}")
    return {"CUDA_VISIBLE_DEVICES": devices[local_rank].strip() if devices else str(local_rank)}


def check_device(device: torch.device) -> None:
    if device.type == "meta":
        raise ConfigError("load() needs a model with weights, not one on the meta device")


def check_rank(model: torch.nn.Module, rank: int, world_size: int) -> None:
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"load({name}={value!r}): must be a non-negative int")
    if not rank < world_size:
        raise ConfigError(f"load(rank={rank}) must be < world_size={world_size}")
    for attr, expected in (("tp_size", world_size), ("rank", rank)):
        actual = getattr(model, attr, expected)
        if isinstance(actual, int) and actual != expected:
            raise ConfigError(f"model.{attr}={actual} but load() was given "
                              f"{'world_size' if attr == 'tp_size' else 'rank'}={expected}")
    dist = torch.distributed
    if world_size > 1 and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() != world_size:
        raise ConfigError(f"load(world_size={world_size}) but the default process group has "
                          f"world size {dist.get_world_size()}")


class _StartupBackend(VcrBackend):
    """`VcrBackend` that notes when dynamo hands it the graph and when resolve is done, so the
    report can split the first call into trace / key / fetch / load / run."""

    def __init__(self, base: VcrBackend):
        super().__init__(base.config, base.manager, base.key_context, base.device_type,
                         base.model_name)
        self.entered: float | None = None
        self.resolved: float | None = None

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        first = self.entered is None  # a later graph's (a warm-up size) is the warm-up's time
        entered = time.perf_counter()
        try:
            return super().__call__(gm, example_inputs)
        finally:
            if first:
                self.entered, self.resolved = entered, time.perf_counter()


@gc_paused()
def load(model: torch.nn.Module, config: CompilationConfig | None = None, *, rank: int = 0,
         world_size: int = 1, warmup: bool = True, store: ArtifactStore | None = None,
         report: bool = True, model_name: str = "<model>",
         make_inputs: Callable[[int], Sequence[Any]] | None = None,
         example_inputs: ExampleInputs | None = None,
         counter: CompilationCounter | None = None, monitor: PerformanceMonitor | None = None,
         pass_manager: PostGradPassManager | None = None) -> CompiledModel:
    """Pull every compiled piece of `model` from the cache at `config.cache` and return it
    ready to serve; `compiled.report` is this rank's `StartupReport`.

    The model is traced by calling it once at the smallest compile size; with warmup=True every
    other compiled shape (each static size, one size the dynamic artifact covers) runs once too.
    example_inputs(n, device) makes the call for n tokens (positional args, keyword args or both;
    default `inputs.default_example_inputs`: input_ids and positions, or input_ids [1, n] for a
    transformers model); make_inputs(n), positional args only, is the older form. Under a live
    process group every rank must call `load` with the same config: the warm-up calls run the
    model's collectives. report=True also sends the report to the
    stats actor when Ray runs in this process. Raises CacheMissError (on_miss="error") listing
    the missing keys and the warm command, before any piece runs.
    """
    start = time.perf_counter()
    config = config or CompilationConfig()
    check_rank(model, rank, world_size)
    device = torch.device(model_device(model))
    check_device(device)
    triton_key.start(device.type)
    counter = counter if counter is not None else CompilationCounter()
    monitor = monitor if monitor is not None else PerformanceMonitor()
    before, samples_before = counter.clone(), {k: len(v) for k, v in monitor.samples.items()}
    staging = SharedStaging(store if store is not None else open_store(config), counter,
                            wait_timeout_s=4 * config.cache.store_timeout_s)
    base = compile_model(model, config, store=staging, counter=counter, monitor=monitor,
                         pass_manager=pass_manager, model_name=model_name)
    backend = _StartupBackend(base.backend)
    compiled = CompiledModel(model, backend)
    model = maybe_prepare(model)
    if make_inputs is not None:
        inputs = lambda n: as_call(make_inputs(n))  # noqa: E731
    else:
        inputs = lambda n: example_call(model, example_inputs, n, device)  # noqa: E731
    manifest_rows, lookup_s = _prefetch_listed(staging, backend, config, model_name, world_size)
    setup_done = time.perf_counter()
    with inductor_metrics.kernel_work() as kernels:
        dynamo, warm_sizes, first_call_s = _first_calls(compiled, backend, staging, inputs,
                                                        trace_size(config), warmup)

    startup = _startup_report(
        compiled, backend, staging, monitor, samples_before, counter.diff(before), kernels,
        rank=rank, world_size=world_size, model=model_name, device=str(device),
        on_miss=config.on_miss, setup_s=setup_done - start, dynamo=dynamo,
        later=", ".join(sorted(set(compiled.later_how.values()))),
        lookup_s=lookup_s[0], first_call_s=first_call_s, manifest_keys=len(manifest_rows),
        warm_sizes=tuple(warm_sizes), start=start, setup_done=setup_done)
    compiled.report = startup
    if report:
        push_report(startup)
    return compiled


def _startup_report(compiled: CompiledModel, backend: _StartupBackend, staging: SharedStaging,
                    monitor: PerformanceMonitor, samples_before: dict[str, int],
                    delta: dict[str, int], kernels: dict[str, int], *, start: float,
                    setup_done: float, **fields: Any) -> StartupReport:
    """The report of a startup that began at `start`: phase seconds from the monitor's samples
    since `samples_before`, counts from the counter's `delta`, `fields` as given."""
    def spent(name: str) -> float:
        return sum(monitor.samples.get(name, [])[samples_before.get(name, 0):])

    plans = compiled.backend.plans
    keys = sorted({key for plan in plans for key in plan.keys})
    return StartupReport(
        **fields, trace_s=backend.entered - setup_done,
        key_s=spent("plan"), fetch_s=spent("fetch"), load_s=spent("load"),
        compile_s=spent("compile"), total_s=time.perf_counter() - start,
        pieces=sum(len(plan.pieces) for plan in plans), tasks=len(keys), graphs=len(plans),
        hits=delta.get("num_cache_hits", 0), misses=delta.get("num_cache_misses", 0),
        compiles=delta.get("num_backend_compilations", 0),
        eager_fallbacks=delta.get("num_fallback_eager_calls", 0),
        kernel_compiles=kernels["kernel_compiles"], autotunes=kernels["autotunes"],
        rejected=delta.get("num_artifacts_rejected", 0), downloaded=staging.stats.downloaded,
        staged=staging.stats.staged, bytes_loaded=delta.get("bytes_loaded", 0),
        bytes_downloaded=staging.stats.bytes_downloaded,
        prefetched_unused=staging.unused_prefetched(), keys_id=keys_mod.digest(keys))


def _prefetch_listed(staging: SharedStaging, backend: VcrBackend, config: CompilationConfig,
                     model_name: str, world_size: int) -> tuple[list[str], list[float]]:
    """Start fetching the keys the warm job's manifest lists for this config, in the background:
    the manifest names them before tracing does. Returns the list (filled by the prefetch) and
    [seconds the manifest read took]."""
    manifest_rows: list[str] = []
    lookup_s = [0.0]
    if manifest_mod is not None and model_name != "<model>" and not config.disable_compile_cache:
        def listed() -> list[str]:
            t = time.perf_counter()
            manifest_rows.extend(manifest_keys(staging.store, model_name,
                                               backend.key_context.fingerprint_id, config,
                                               world_size))
            lookup_s[0] = time.perf_counter() - t
            return manifest_rows

        staging.prefetch_in_background(listed)
    return manifest_rows, lookup_s


def _first_calls(compiled: CompiledModel, backend: _StartupBackend, staging: SharedStaging,
                 inputs: Callable[[int], tuple], traced_at: int, warmup: bool
                 ) -> tuple[str, list[int], float]:
    """Trace (or restore the traced model: `aot.start`) at `traced_at`, then, with warmup, run
    every other compiled shape once. Returns how dynamo went, the sizes run and the seconds the
    calls took after their pieces were resolved."""
    try:
        args, kwargs = inputs(traced_at)
        dynamo = aot.start(compiled, staging.store, args, kwargs)
        compiled(*args, **kwargs)
    except Exception as exc:
        inner = backend_failure_cause(exc)
        if isinstance(inner, VcrError):  # CacheMissError, CompileError, ...
            raise inner from None
        raise
    first_done = time.perf_counter()
    if backend.entered is None or backend.resolved is None:
        raise RuntimeError("dynamo did not call the backend: the model was already compiled "
                           "by this torch.compile cache; load() needs a fresh trace")
    warm_sizes = [traced_at]
    first_call_s = first_done - backend.resolved
    if warmup:
        for size in warmup_sizes(compiled.backend.config, backend, traced_at):
            t = time.perf_counter()
            args, kwargs = inputs(size)
            compiled(*args, **kwargs)
            first_call_s += time.perf_counter() - t
            warm_sizes.append(size)
    return dynamo, warm_sizes, first_call_s


def manifest_keys(store: ArtifactStore, model_name: str, fingerprint_id: str,
                  config: CompilationConfig, world_size: int) -> list[str]:
    """Keys of the manifest rows for this TP size and the config's shapes (none: no manifest)."""
    table = manifest_mod.read_manifest(store, model_name, fingerprint_id)
    shapes = {str(s) for s in config.shapes}
    return [row["key"] for row in table.select(["key", "tp_size", "shape"]).to_pylist()
            if row["tp_size"] == world_size and row["shape"] in shapes]


def warmup_sizes(config: CompilationConfig, backend: VcrBackend, done: int) -> list[int]:
    """Sizes to run once after the trace call: the other static sizes, then one size inside
    the dynamic artifact's guard range that no static artifact takes."""
    sizes = [s for s in config.compile_sizes if s != done]
    guards = [r.dynamic.guard for r in backend.runners.values() if r.dynamic is not None]
    if config.compile_dynamic and guards:
        lo = max(lo for lo, _ in guards)
        hi = min((hi for _, hi in guards if hi is not None), default=None)
        covered = lambda n: n >= lo and (hi is None or n <= hi)  # noqa: E731
        if done in config.compile_sizes or not covered(done):  # else the trace call ran it
            size = max(lo, 1)
            while size in config.compile_sizes:
                size += 1
            if covered(size):
                sizes.append(size)
    return sizes
