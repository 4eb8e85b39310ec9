"""vllm_compile_ray: plan, warm and pull vLLM-style piecewise torch.compile artifacts through a
shared object-store cache, with Ray fanning compiles out across GPU nodes."""

from . import models
from .api import CompiledModel, compile, open_store, plan_model
from .backend import VcrBackend
from .canonical import CanonicalPiece, InputSpec
from .compiler_interface import (CompileResult, CompilerInterface, EagerAdaptor,
                                 InductorStandaloneAdaptor)
from .config import CompilationConfig
from .counters import CompilationCounter
from .errors import (ArtifactCorruptError, ArtifactNotFoundError, CacheMissError, CompileError,
                     ConfigError, StoreError, StorePermissionError, StoreUnavailableError,
                     UnknownModelError, VcrError)
from .load import StartupReport, load
from .manager import CompilerManager
from .monitor import PerformanceMonitor
from .passes import InductorPass, PostGradPassManager
from .plan import CompileTask, Plan
from .splitting import SplitItem, split_graph
from .store import ArtifactStore
from .warm import warm
from .warm_summary import WarmSummary

__all__ = [
    "ArtifactCorruptError", "ArtifactNotFoundError", "ArtifactStore", "CacheMissError",
    "CanonicalPiece", "CompilationConfig", "CompilationCounter", "CompileError", "CompileResult",
    "CompileTask", "CompiledModel", "CompilerInterface", "CompilerManager", "ConfigError",
    "EagerAdaptor", "InductorPass", "InductorStandaloneAdaptor", "InputSpec", "PerformanceMonitor",
    "Plan", "PostGradPassManager", "SplitItem", "StartupReport", "StoreError", "StorePermissionError",
    "StoreUnavailableError", "UnknownModelError", "VcrBackend", "VcrError", "WarmSummary", "compile",
    "load", "models", "open_store", "plan_model", "split_graph", "warm",
]
