"""`CompilerInterface` and its adaptors: compile a canonical piece to (callable, artifact bytes)."""

from __future__ import annotations

import json
import logging
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..config import CompilationConfig
from ..errors import ConfigError
from ..keys import digest
from ..planning.canonical import InputSpec
from ..torch_private import bundle_prune, inductor
from .passes import PostGradPassManager

Guard = tuple[int, "int | None"]
logger = logging.getLogger(__name__)


@dataclass
class CompileResult:
    fn: Callable
    artifact: bytes
    guard: Guard  # (lo, hi): the runtime sizes the callable is valid for; hi None means unbounded
    info: dict = field(default_factory=dict)  # JSON-able facts for the artifact's metadata


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


# An Inductor artifact with autotune results: MAGIC | u64 standalone length | standalone bytes |
# Mega-Cache bytes. Without results the artifact is the standalone bytes alone.
_TUNED_MAGIC = b"VCRT1\n"
_U64 = struct.Struct(">Q")


def pack_tuned(standalone: bytes, tuning: bytes) -> bytes:
    if not tuning:
        return standalone
    return _TUNED_MAGIC + _U64.pack(len(standalone)) + standalone + tuning


def unpack_tuned(payload: bytes) -> tuple[memoryview, memoryview]:
    """(standalone bytes, autotune Mega-Cache bytes or empty), as views of `payload`: an
    artifact is tens of MB (llama-3-8b's 33: 494 MB), which slicing would copy at every load."""
    view = memoryview(payload)
    if not payload.startswith(_TUNED_MAGIC):
        return view, view[:0]
    head = len(_TUNED_MAGIC) + _U64.size
    if len(payload) < head:
        raise ValueError("tuned Inductor artifact is truncated before its length field")
    (n,) = _U64.unpack_from(payload, len(_TUNED_MAGIC))
    if head + n > len(payload):
        raise ValueError(f"tuned Inductor artifact is truncated: standalone part of {n} bytes, "
                         f"{len(payload) - head} present")
    return view[head:head + n], view[head + n:]


class InductorStandaloneAdaptor(CompilerInterface):
    """Compiles with Inductor's `standalone_compile` (`torch_private.inductor`); artifacts are
    its binary format.

    On CUDA (with `config.ship_autotune`) each fresh artifact runs once on zero inputs so Triton's
    runtime autotuning happens in the compile task, and its results travel inside the artifact:
    a loader's first call then runs the tuned kernels instead of benchmarking every config. The
    task then loads what it publishes in a fresh cache and runs it once, counting the kernel
    compiles and autotunes that first call needed (`inductor.check_complete`; 0 when complete).
    The artifact's Triton bundle is cut to its launched kernels' binaries
    (`torch_private.bundle_prune`) when that check finds the cut complete; otherwise, and where
    nothing checks it, the bundle ships whole.
    """

    name = "inductor_standalone"

    def __init__(self, config: CompilationConfig, pass_manager: PostGradPassManager | None = None):
        self.ship_autotune = config.ship_autotune
        # The dynamic artifact serves sizes outside compile_sizes; tune it at the largest listed.
        self.dynamic_tune_size = max(config.compile_sizes, default=8)
        # standalone_compile hands `options` to compile_fx as keyword arguments; Inductor config
        # values (max_autotune, ...) travel inside its `config_patches`.
        patches: dict[str, Any] = dict(config.inductor_compile_config)
        patches.update(patches.pop("config_patches", None) or {})
        if (self.ship_autotune and patches.get("coordinate_descent_tuning")
                and not inductor.COORDINATE_DESCENT_SHIPS):
            raise ConfigError(
                f"coordinate_descent_tuning on torch {torch.__version__} makes artifacts every "
                "rank re-tunes and re-compiles at its first call (torch < 2.12 drops configs "
                "found by coordinate descent when it loads an artifact): leave it off (the CLI's "
                "--max-autotune does on this torch), or set ship_autotune=False to accept "
                "tuning at first call")
        self.pass_manager = pass_manager
        if pass_manager:
            patches["post_grad_custom_post_pass"] = pass_manager
        self.options: dict[str, Any] = {"config_patches": patches} if patches else {}

    def compute_hash(self, config: CompilationConfig) -> str:
        return digest({"compiler": self.name, "options": config.inductor_compile_config,
                       "passes": self.pass_manager.uuid() if self.pass_manager else None})

    def compile(self, graph, input_specs, shape, device) -> CompileResult:
        inputs = None
        if shape == "dynamic":
            fn, data, guard = inductor.compile_dynamic(graph, input_specs, device, self.options)
        else:
            inputs = inductor.example_tensors(input_specs, int(shape), device)
            fn, data = inductor.compile_static(graph, inputs, self.options)
            guard = (int(shape), int(shape))
        result = CompileResult(fn, data, guard)
        if not (self.ship_autotune and device.split(":")[0] == "cuda"):
            return result  # nothing checks it in a fresh cache: its Triton bundle ships whole
        start = time.perf_counter()
        try:
            if inputs is None:  # dynamic: tune at the largest listed size inside its guard
                size = max(guard[0], self.dynamic_tune_size)
                size = size if guard[1] is None else min(size, guard[1])
                inputs = inductor.example_tensors(input_specs, size, device)
            tuning, kernels = inductor.tune_once(data, inputs)
        except Exception as exc:  # the artifact is good without them: loaders tune instead
            logger.warning("runtime autotuning of a %s artifact failed, shipping it "
                           "untuned: %s: %s", shape, type(exc).__name__, exc)
            result.info["tune_error"] = f"{type(exc).__name__}: {exc}"[:500]
            return result
        result.info.update(tuned_kernels=kernels,
                           tune_seconds=round(time.perf_counter() - start, 4))
        result.artifact, checked = self._cut_and_check(data, tuning, inputs, shape)
        result.info.update(checked)
        return result

    def _cut_and_check(self, whole: bytes, tuning: bytes, inputs: Sequence[Any],
                       shape: int | str) -> tuple[bytes, dict[str, Any]]:
        """What to publish: the artifact with its Triton bundle cut to the launched kernels
        (`bundle_prune`) when the check in a fresh cache finds the cut complete, else whole;
        and the check's counts."""
        cut, counts = bundle_prune.prune(whole)
        checked = self._check(cut, tuning, inputs, shape)
        if cut is whole or not (checked.get("check_kernel_compiles") or "check_error" in checked):
            return pack_tuned(cut, tuning), {**counts, **checked}
        logger.warning("the cut Triton bundle of a %s artifact did not check complete (%s); "
                       "shipping the whole bundle", shape,
                       checked.get("check_error") or
                       f"{checked['check_kernel_compiles']} kernel compiles at first call")
        return (pack_tuned(whole, tuning),
                {**self._check(whole, tuning, inputs, shape), "bundle_cut_undone": 1})

    @staticmethod
    def _check(data: bytes, tuning: bytes, inputs: Sequence[Any], shape: int | str
               ) -> dict[str, Any]:
        """First-call kernel work of the artifact as a rank on a new node loads it."""
        start = time.perf_counter()
        try:
            found: dict[str, Any] = inductor.check_complete(data, tuning, inputs)
        except Exception as exc:  # noted with the artifact; a loader meets the same
            logger.warning("checking a %s artifact in a fresh cache failed: %s: %s", shape,
                           type(exc).__name__, exc)
            return {"check_error": f"{type(exc).__name__}: {exc}"[:500]}
        found["check_seconds"] = round(time.perf_counter() - start, 4)
        return found

    def load(self, artifact, graph, shape, device) -> Callable:
        """Load for `device`; on CUDA the artifact runs on that GPU whichever index it was
        compiled on (no index: the current device)."""
        standalone, tuning = unpack_tuned(artifact)
        return inductor.load_artifact(standalone, tuning, cuda_index(device))


def cuda_index(device: str) -> int | None:
    """The CUDA device index `device` names ("cuda": the current one; None off CUDA)."""
    import torch

    parsed = torch.device(device)
    if parsed.type != "cuda":
        return None
    return parsed.index if parsed.index is not None else torch.cuda.current_device()


def make_compiler(config: CompilationConfig, pass_manager: PostGradPassManager | None = None
                  ) -> CompilerInterface:
    if config.backend == "inductor":
        return InductorStandaloneAdaptor(config, pass_manager)
    return EagerAdaptor()
