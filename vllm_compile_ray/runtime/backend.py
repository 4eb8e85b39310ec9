"""`VcrBackend`: the torch.compile backend (vLLM's `VllmBackend` role).

It receives the dynamo graph, plans it (split, canonicalize, key), resolves every (piece, shape)
through the `CompilerManager` under the miss policy, and returns the split graph with each
compiled submodule replaced by a `PieceRunner`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch.fx as fx

from ..config import CompilationConfig
from ..cache import manifest
from ..errors import CacheMissError, VcrError
from ..keys import KeyContext
from ..models.presets import PRESETS
from ..planning.intake import is_entry_point
from ..planning.plan import Plan, PlannedPiece, later_graph_shapes, plan_graph
from .manager import CompilerManager, LoadedPiece
from .piece_runner import PieceRunner

logger = logging.getLogger(__name__)


def warm_command(config: CompilationConfig, model_name: str = "<model>") -> str:
    """How to fill the cache for this model. `vcr warm --model` takes a preset, a config.json (or
    its directory) or an entry point; any other name ("<model>", a module's class name) is an
    nn.Module passed in, which `vcr warm` can only reach through an entry point or a config.json."""
    sizes = ",".join(str(s) for s in config.compile_sizes)
    cache = config.cache.cache_dir or "<cache-url>"
    if _names_a_model(model_name):
        return f"vcr warm --model {model_name} --sizes {sizes} --cache {cache}"
    return (f"vcr warm --model package.module:function --sizes {sizes} --cache {cache}\n"
            f"  where the entry point returns this same model ({model_name} is not a name "
            "`vcr warm` can build), or --model /path/to/config.json for a supported "
            "architecture; in Python: vcr.warm(model, config, model_name=NAME), then load with "
            "model_name=NAME")


def _names_a_model(name: str) -> bool:
    """A preset, a config.json or checkpoint directory path, or an entry point."""
    return (name in PRESETS or is_entry_point(name) or name.endswith(".json")
            or os.sep in name or os.path.exists(name))


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
        self.call_size: int | None = None  # tokens of the call dynamo traces (`CompiledModel`)

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        counter, monitor = self.manager.counter, self.manager.monitor
        counter.num_graphs_seen += 1
        shapes = later_graph_shapes(self.config, self.call_size) if self.plans else None
        with monitor.timed("plan"):
            plan = plan_graph(gm, self.config, self.key_context, self.device_type, shapes)
        self.plans.append(plan)
        counter.num_piecewise_graphs_seen += len(plan.items)
        counter.num_piecewise_capturable_graphs_seen += len(plan.pieces)
        self.resolve(plan)
        return plan.split_gm

    def resolve(self, plan: Plan) -> None:
        """Load or compile every (piece, shape) under the miss policy; install the runners."""
        present = self.manager.prefetch(plan.keys)
        if not present and plan.keys and self.config.on_miss != "error":
            why = self._other_environments()
            if why:  # minutes of compiles ahead: say why the warm's artifacts do not serve
                logger.warning("none of %s's %d artifacts is in the cache for this environment; "
                               "on_miss=%r compiles them here.%s", self.model_name,
                               len(plan.keys), self.config.on_miss, why)
        loaded = self._load_all(plan, present) if self.config.on_miss == "error" else {}
        for planned in plan.pieces:
            entries = {shape: loaded[key] if key in loaded else self._entry(planned, shape, key)
                       for shape, key in planned.keys.items()}
            static = {s: e for s, e in entries.items() if s != "dynamic" and e is not None}
            runner = PieceRunner(planned.submod_name, planned.piece, static, entries.get("dynamic"),
                                 self.config.fallback, self.manager.counter,
                                 lambda size, p=planned: self._compile_on_demand(p, size))
            plan.split_gm.__dict__[planned.submod_name] = runner
            self.runners[f"{len(self.plans) - 1}:{planned.submod_name}"] = runner

    def _load_all(self, plan: Plan, present: set[str]) -> dict[str, LoadedPiece]:
        """on_miss="error": load every task, else raise CacheMissError naming each missing key and
        each rejected one with its reason. Nothing is compiled."""
        tasks, loaded, missing, rejected = plan.tasks(), {}, [], []
        for t in tasks:
            piece = self.manager.load(t.key, t.piece, t.shape) if t.key in present else None
            if piece is not None:
                loaded[t.key] = piece
            elif t.key in self.manager.rejected:  # refused at prefetch (corrupt) or at load
                rejected.append(t)
            else:
                missing.append(t)
        if not (missing or rejected):
            return loaded
        self.manager.counter.num_cache_misses += len(missing) + len(rejected)
        why = {t.key: self.manager.rejected[t.key] for t in rejected}
        cache = self.config.cache.cache_dir or "the local cache"
        head = f"{len(missing) + len(rejected)} of {len(tasks)} compiled pieces are " + (
            f"missing from {cache}" if not rejected else f"missing from or rejected in {cache}")
        lines = [f"  {t.key}  {t.name}  missing" for t in missing]
        lines += [f"  {t.key}  {t.name}  rejected: {why[t.key]}" for t in rejected]
        hint = f"Fill the cache with: {warm_command(self.config, self.model_name)}"
        if len(missing) == len(tasks):
            hint += self._other_environments()
        if rejected:
            hint += ("\nA corrupt or foreign artifact is replaced by a run with on_miss="
                     "'compile_and_publish'; one that 'could not load' points at this process "
                     "(memory, compiler) and stays in the store.")
        raise CacheMissError(f"{head} (on_miss='error'):\n" + "\n".join(lines) + "\n" + hint,
                             [t.key for t in missing], why)

    def _other_environments(self) -> str:
        """When nothing of the model is here: the environments the cache holds it for, and what
        differs from this one ("" when it holds none, or the index cannot be read)."""
        if self.manager.store is None:
            return ""
        try:
            others = manifest.other_environments(self.manager.store, self.model_name,
                                                 self.key_context.fingerprint_id)
        except VcrError as exc:  # the miss error stands without this detail
            logger.debug("manifest index unreadable while explaining a miss: %s", exc)
            return ""
        if not others:
            return ""
        entry, there = others[0]
        differs = manifest.environment_difference(self.key_context.fingerprint, there)
        return (f"\nThe cache holds {self.model_name} warmed in {len(others)} other "
                f"environment(s); artifacts load only in the environment they were compiled for. "
                f"The latest (fingerprint {entry['fingerprint_id']}) differs from this process "
                f"in: " + "; ".join(differs) + ". Warm in this environment, or start the rank in "
                "the warm's (same torch, Triton, GPU and Inductor settings).")

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
