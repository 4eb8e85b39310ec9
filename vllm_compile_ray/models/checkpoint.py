"""Real weights: a Hugging Face checkpoint (safetensors files or a state dict) into one rank.

Checkpoint names are transformers' on-disk names; the model merges some of them (vLLM's
`stacked_params_mapping`): q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj, and each
expert's gate/up/down (`experts.{e}.gate_proj` or Mixtral's w1/w3/w2) -> the 3-D
`experts.gate_up_proj` / `experts.down_proj`, which transformers 5 state dicts already hold
fused. Each tensor is sliced for the rank by `layers.load_param`; from safetensors a rank reads
only its rows. Every parameter must be covered and every checkpoint tensor used: a mismatch is
an error naming the tensors, never a half-loaded model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from vllm_compile_ray.errors import ConfigError
from vllm_compile_ray.models.init import init_buffers
from vllm_compile_ray.models.layers import load_param
from vllm_compile_ray.models.moe import FusedExperts

WeightsSource = str | os.PathLike | Mapping[str, Any] | Iterable[tuple[str, Any]]

_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
_STACKED = [  # (regex on a checkpoint name, merged name, part index)
    (re.compile(r"\.q_proj\.(weight|bias)$"), r".qkv_proj.\1", 0),
    (re.compile(r"\.k_proj\.(weight|bias)$"), r".qkv_proj.\1", 1),
    (re.compile(r"\.v_proj\.(weight|bias)$"), r".qkv_proj.\1", 2),
    (re.compile(r"\.gate_proj\.weight$"), ".gate_up_proj.weight", 0),
    (re.compile(r"\.up_proj\.weight$"), ".gate_up_proj.weight", 1),
]


def safetensors_files(path: str | os.PathLike) -> list[str]:
    """The .safetensors files of a checkpoint: a directory (model.safetensors.index.json, or
    its *.safetensors files) or one file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ConfigError(f"weights {path!r}: expected a .safetensors file or a directory")
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"weights {path!r}: no such file or directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise ConfigError(f"weights {path!r}: the index names missing files {absent[:3]}")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ConfigError(f"weights {path!r}: no model.safetensors(.index.json) there (only "
                          "safetensors checkpoints are read)")
    return files


def _iter_source(source: WeightsSource, stack: ExitStack) -> Iterator[tuple[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        from safetensors import safe_open

        for file in safetensors_files(source):
            f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            for name in f.keys():
                yield name, f.get_slice(name)  # lazy: load_param reads this rank's rows
    elif isinstance(source, Mapping):
        yield from source.items()
    else:
        yield from source


def _target(model: nn.Module, name: str) -> tuple[str, tuple[int, ...] | None] | None:
    """Checkpoint name -> (our parameter name, (part,) or (expert, part) or None for whole)."""
    for pattern, repl in getattr(model, "checkpoint_renames", ()):
        name = re.sub(pattern, repl, name)
    m = _EXPERT.match(name)
    if m:
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        names = getattr(model, "expert_names", ("gate_proj", "up_proj", "down_proj"))
        if proj not in names:
            return None
        i = names.index(proj)
        return (f"{prefix}.down_proj", (expert, 0)) if i == 2 else \
            (f"{prefix}.gate_up_proj", (expert, i))
    for pattern, repl, part in _STACKED:
        if pattern.search(name):
            return pattern.sub(repl, name), (part,)
    return name, None


@torch.no_grad()
def load_weights(model: nn.Module, source: WeightsSource) -> set[str]:
    """Load this rank's slices of a checkpoint into `model` (built on a real device); returns the
    checkpoint names used. Layers past the model's (built with fewer `num_layers`) are skipped.
    Raises ConfigError on an unknown, missing or misshapen tensor."""
    params = dict(model.named_parameters())
    cfg = getattr(model, "config", None)
    tied = getattr(cfg, "tie_word_embeddings", False)
    num_layers = getattr(cfg, "num_hidden_layers", None)
    loaded: dict[str, set[Any]] = {n: set() for n in params}
    used, unknown = set(), []
    with ExitStack() as stack:
        for ckpt_name, src in _iter_source(source, stack):
            if _SKIP.search(ckpt_name) or (tied and ckpt_name == "lm_head.weight"):
                continue
            layer = _LAYER.search(ckpt_name)
            if layer and num_layers is not None and int(layer.group(1)) >= num_layers:
                continue  # a model built with num_layers < the checkpoint's
            target = _target(model, ckpt_name)
            if target is None or target[0] not in params:
                unknown.append(ckpt_name)
                continue
            pname, shard = target
            mod_name, _, attr = pname.rpartition(".")
            mod = model.get_submodule(mod_name)
            layout = getattr(mod, "layouts", {}).get(attr)
            param = params[pname]
            if shard is not None and len(shard) == 2:  # one expert's matrix
                expert, part = shard
                dim, parts = layout
                load_param(param[expert], src, (dim - 1, parts), part if len(parts) > 1 else None,
                           ckpt_name)
            else:
                load_param(param, src, layout, shard[0] if shard else None, ckpt_name)
            loaded[pname].add(shard if shard is not None else "all")
            used.add(ckpt_name)
    if unknown:
        raise ConfigError(f"checkpoint tensors this {type(model).__name__} has no parameter for: "
                          f"{_few(unknown)}")
    missing = [n for n, keys in loaded.items() if not _complete(model, n, keys)]
    if missing:
        raise ConfigError(f"checkpoint lacks (parts of) parameters: {_few(missing)}")
    init_buffers(model)
    return used


def _complete(model: nn.Module, pname: str, keys: set[Any]) -> bool:
    if "all" in keys:
        return True
    if not keys:
        return False
    mod_name, _, attr = pname.rpartition(".")
    mod = model.get_submodule(mod_name)
    _, parts = mod.layouts[attr]
    if isinstance(mod, FusedExperts):
        experts = getattr(mod, attr).shape[0]
        return keys >= {(e, i) for e in range(experts) for i in range(len(parts))}
    return keys >= {(i,) for i in range(len(parts))}


def _few(names: list[str]) -> str:
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more

