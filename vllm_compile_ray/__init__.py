"""vllm_compile_ray: plan, warm and pull vLLM-style piecewise torch.compile artifacts through a
shared object-store cache, with Ray fanning compiles out across GPU nodes."""

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
from .orchestration.options import ComputeOptions, RetryOptions
from .orchestration.warm import warm
from .orchestration.warm_summary import WarmSummary
from .planning.canonical import CanonicalPiece, InputSpec
from .planning.plan import CompileTask, Plan
from .planning.splitting import SplitItem, split_graph
from .runtime.api import CompiledModel, compile, open_store, plan_model
from .runtime.backend import VcrBackend
from .runtime.load import StartupReport, load
from .runtime.manager import CompilerManager

__all__ = [
    "ArtifactCorruptError", "ArtifactNotFoundError", "ArtifactStore", "CacheConfig", "CacheMissError",
    "CanonicalPiece", "CompilationConfig", "CompilationCounter", "CompileError", "CompileResult",
    "CompileTask", "CompiledModel", "ComputeOptions", "CompilerInterface", "CompilerManager", "ConfigError",
    "EagerAdaptor", "InductorPass", "InductorStandaloneAdaptor", "InputSpec", "PerformanceMonitor",
    "Plan", "PostGradPassManager", "RetryOptions", "SplitItem", "StartupReport", "StoreError", "StorePermissionError",
    "StoreUnavailableError", "UnknownModelError", "VcrBackend", "VcrError", "WarmSummary", "compile",
    "load", "models", "open_store", "plan_model", "split_graph", "warm",
]
