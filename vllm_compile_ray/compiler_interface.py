"""`CompilerInterface` and its adaptors: compile a canonical piece to (callable, artifact bytes)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from . import inductor
from .canonical import InputSpec
from .config import CompilationConfig
from .keys import digest
from .passes import PostGradPassManager

Guard = tuple[int, "int | None"]


@dataclass
class CompileResult:
    fn: Callable
    artifact: bytes
    guard: Guard  # (lo, hi): the runtime sizes the callable is valid for; hi None means unbounded


class CompilerInterface(ABC):
    """Compiles a canonical piece for one runtime shape ("dynamic" or an int) and loads artifacts.

    Callables take the piece's inputs positionally and return a sequence of outputs.
    """

    name: str

    def compute_hash(self, config: CompilationConfig) -> str:
        """What of this compiler, beyond the config and environment, changes its output."""
        return digest({"compiler": self.name})

    @abstractmethod
    def compile(self, graph: fx.GraphModule, input_specs: Sequence[InputSpec], shape: int | str,
                device: str) -> CompileResult: ...

    @abstractmethod
    def load(self, artifact: bytes, graph: fx.GraphModule, shape: int | str, device: str) -> Callable: ...


class EagerAdaptor(CompilerInterface):
    """Runs the piece's fx graph as is. Its artifact is a small marker, so cache logic (publish,
    hits, counters, Ray fan-out) can be exercised without paying for Inductor."""

    name = "eager"

    def compile(self, graph, input_specs, shape, device) -> CompileResult:
        marker = json.dumps({"compiler": self.name, "shape": shape}).encode()
        return CompileResult(graph, marker, (1, None))

    def load(self, artifact, graph, shape, device) -> Callable:
        data = json.loads(artifact.decode())
        if data.get("compiler") != self.name:
            raise ValueError(f"artifact was made by {data.get('compiler')!r}, not {self.name!r}")
        return graph


class InductorStandaloneAdaptor(CompilerInterface):
    """Compiles with `torch._inductor.standalone_compile`; artifacts are its binary format."""

    name = "inductor_standalone"

    def __init__(self, config: CompilationConfig, pass_manager: PostGradPassManager | None = None):
        # standalone_compile hands `options` to compile_fx as keyword arguments; Inductor config
        # values (max_autotune, ...) travel inside its `config_patches`.
        patches: dict[str, Any] = dict(config.inductor_compile_config)
        patches.update(patches.pop("config_patches", None) or {})
        self.pass_manager = pass_manager
        if pass_manager:
            patches["post_grad_custom_post_pass"] = pass_manager
        self.options: dict[str, Any] = {"config_patches": patches} if patches else {}

    def compute_hash(self, config: CompilationConfig) -> str:
        return digest({"compiler": self.name, "options": config.inductor_compile_config,
                       "passes": self.pass_manager.uuid() if self.pass_manager else None})

    def compile(self, graph, input_specs, shape, device) -> CompileResult:
        if shape == "dynamic":
            fn, data, guard = inductor.compile_dynamic(graph, input_specs, device, self.options)
            return CompileResult(fn, data, guard)
        fn, data = inductor.compile_static(graph, input_specs, int(shape), device, self.options)
        return CompileResult(fn, data, (int(shape), int(shape)))

    def load(self, artifact, graph, shape, device) -> Callable:
        return inductor.load_artifact(artifact)


def make_compiler(config: CompilationConfig, pass_manager: PostGradPassManager | None = None
                  ) -> CompilerInterface:
    if config.backend == "inductor":
        return InductorStandaloneAdaptor(config, pass_manager)
    return EagerAdaptor()
