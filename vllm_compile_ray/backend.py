"""`VcrBackend`: the torch.compile backend (vLLM's `VllmBackend` role).

It receives the dynamo graph, plans it (split, canonicalize, key), resolves every (piece, shape)
through the `CompilerManager` under the miss policy, and returns the split graph with each
compiled submodule replaced by a `PieceRunner`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.fx as fx

from .config import CompilationConfig
from .errors import CacheMissError
from .keys import KeyContext
from .manager import CompilerManager, LoadedPiece
from .plan import Plan, PlannedPiece, plan_graph
from .runtime import PieceRunner

logger = logging.getLogger(__name__)


def warm_command(config: CompilationConfig, model_name: str = "<model>") -> str:
    sizes = ",".join(str(s) for s in config.compile_sizes)
    cache = config.cache_dir or "<cache-url>"
    return f"vcr warm --model {model_name} --sizes {sizes} --cache {cache}"


class VcrBackend:
    def __init__(self, config: CompilationConfig, manager: CompilerManager, key_context: KeyContext,
                 device_type: str, model_name: str = "<model>"):
        self.config = config
        self.manager = manager
        self.key_context = key_context
        self.device_type = device_type
        self.model_name = model_name
        self.plans: list[Plan] = []
        self.runners: dict[str, PieceRunner] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        counter, monitor = self.manager.counter, self.manager.monitor
        counter.num_graphs_seen += 1
        with monitor.timed("plan"):
            plan = plan_graph(gm, self.config, self.key_context, self.device_type)
        self.plans.append(plan)
        counter.num_piecewise_graphs_seen += len(plan.items)
        counter.num_piecewise_capturable_graphs_seen += len(plan.pieces)
        self.resolve(plan)
        return plan.split_gm

    def resolve(self, plan: Plan) -> None:
        """Load or compile every (piece, shape) under the miss policy; install the runners."""
        on_miss = self.config.on_miss
        present = self.manager.prefetch(plan.keys)
        if on_miss == "error":
            missing = [t for t in plan.tasks() if t.key not in present]
            if missing:
                listing = "\n".join(f"  {t.key}  {t.name}" for t in missing)
                raise CacheMissError(
                    f"{len(missing)} of {len(plan.tasks())} compiled pieces are missing from "
                    f"{self.config.cache_dir or 'the local cache'} (on_miss='error'):\n{listing}\n"
                    f"Fill the cache with: {warm_command(self.config, self.model_name)}",
                    [t.key for t in missing])
        for planned in plan.pieces:
            entries = {shape: self._entry(planned, shape, key) for shape, key in planned.keys.items()}
            static = {s: e for s, e in entries.items() if s != "dynamic" and e is not None}
            runner = PieceRunner(planned.submod_name, planned.piece, static, entries.get("dynamic"),
                                 self.config.fallback, self.manager.counter,
                                 lambda size, p=planned: self._compile_on_demand(p, size))
            plan.split_gm.__dict__[planned.submod_name] = runner
            self.runners[f"{len(self.plans) - 1}:{planned.submod_name}"] = runner

    def _entry(self, planned: PlannedPiece, shape: int | str, key: str) -> LoadedPiece | None:
        loaded = self.manager.load(key, planned.piece, shape)
        if loaded is not None:
            return loaded
        self.manager.counter.num_cache_misses += 1
        on_miss = self.config.on_miss
        if on_miss == "eager":
            return None
        name = f"compile[{planned.code_id}/{shape}]"
        loaded, _ = self.manager.compile(key, planned.piece, shape,
                                         publish=on_miss == "compile_and_publish", name=name)
        return loaded

    def _compile_on_demand(self, planned: PlannedPiece, size: int) -> LoadedPiece:
        key = self.key_context.key(planned.piece.code, planned.piece.input_specs, size)
        return self._entry(planned, size, key) or self.manager.compile(
            key, planned.piece, size, publish=False)[0]
