"""vllm_compile_ray: plan, warm and pull vLLM-style piecewise torch.compile artifacts through a
shared object-store cache, with Ray fanning compiles out across GPU nodes."""

from .runtime.gc_pause import gc_paused

# Importing torch, dynamo and Inductor makes ~350k objects that live as long as the process; the
# collector's full passes over them while importing (5, 0.34 s of a 4.3 s `vcr load` on the
# 2-core machine) find nothing to free.
with gc_paused():
    from . import models
    from .cache.store import ArtifactStore
    from .compiling.compiler_interface import (CompileResult, CompilerInterface, EagerAdaptor,
                                               InductorStandaloneAdaptor)
    from .compiling.counters import CompilationCounter
    from .compiling.monitor import PerformanceMonitor
    from .compiling.passes import InductorPass, PostGradPassManager
    from .config import CacheConfig, CompilationConfig
    from .errors import (ArtifactCorruptError, ArtifactNotFoundError, CacheMissError, CompileError,
                         ConfigError, StoreError, StorePermissionError, StoreUnavailableError,
                         UnknownModelError, VcrError)
    from .planning.canonical import CanonicalPiece, InputSpec
    from .planning.plan import CompileTask, Plan
    from .planning.splitting import SplitItem, split_graph
    from .runtime.api import CompiledModel, compile, open_store, plan_model
    from .runtime.backend import VcrBackend
    from .runtime.load import StartupReport, load
    from .runtime.manager import CompilerManager
del gc_paused

# The warm job's names come from the Ray orchestration, imported at first use: a rank that only
# loads (`vcr load`, `vllm_compile_ray.load`) never imports Ray (0.3-0.6 s at each start).
_ORCHESTRATION = {"ComputeOptions": "options", "RetryOptions": "options", "warm": "warm",
                  "WarmSummary": "warm_summary"}


def __getattr__(name: str):
    if name in _ORCHESTRATION:
        import importlib

        module = importlib.import_module(f".orchestration.{_ORCHESTRATION[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ArtifactCorruptError", "ArtifactNotFoundError", "ArtifactStore", "CacheConfig", "CacheMissError",
    "CanonicalPiece", "CompilationConfig", "CompilationCounter", "CompileError", "CompileResult",
    "CompileTask", "CompiledModel", "ComputeOptions", "CompilerInterface", "CompilerManager", "ConfigError",
    "EagerAdaptor", "InductorPass", "InductorStandaloneAdaptor", "InputSpec", "PerformanceMonitor",
    "Plan", "PostGradPassManager", "RetryOptions", "SplitItem", "StartupReport", "StoreError", "StorePermissionError",
    "StoreUnavailableError", "UnknownModelError", "VcrBackend", "VcrError", "WarmSummary", "compile",
    "load", "models", "open_store", "plan_model", "split_graph", "warm",
]
