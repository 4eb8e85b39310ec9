"""Deterministic weights from a seed, for models without a checkpoint (tests, benchmarks).

Each parallel weight is generated FULL (float32, its own seeded generator keyed by its name, on
the parameter's GPU when it has one: on CPU an 8B model takes over a minute) and sliced for the
model's rank with the same `load_param` a checkpoint goes through, so ranks 0..tp-1 together
equal the tp=1 model (on one device type). A full tensor exists for one parameter at a time: fine for
small models; for a big preset with tp_size > 1 the largest (the embedding, 4 GB float32 for
Llama-3-70B) bounds peak memory.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from vllm_compile_ray.models.layers import (RMSNorm, RotaryEmbedding, VocabParallelEmbedding,
                                            full_shape, load_param)

INIT_STD = 0.02


def param_seed(seed: int, name: str) -> int:
    """Seed of one full parameter: depends on the name only, never on tp_size or rank."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter deterministically (norms with their identity), and the buffers."""
    for mod_name, mod in model.named_modules():  # a tied lm_head is yielded once
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0 - mod.offset)
            continue
        layouts = getattr(mod, "layouts", {})
        for pname, param in mod.named_parameters(recurse=False):
            layout = layouts.get(pname)
            device = param.device if param.device.type == "cuda" else torch.device("cpu")
            g = torch.Generator(device).manual_seed(param_seed(seed, f"{mod_name}.{pname}"))
            full = torch.empty(full_shape(param, layout), device=device)
            full.normal_(0.0, INIT_STD, generator=g)
            load_param(param, full, layout)
    init_buffers(model)


@torch.no_grad()
def init_buffers(model: nn.Module) -> None:
    """The non-persistent buffers (rope cache, vocab shard range) after `to_empty`."""
    for mod in model.modules():
        if isinstance(mod, RotaryEmbedding):
            mod.cos_sin_cache.copy_(mod.compute_cache())
        elif isinstance(mod, VocabParallelEmbedding):
            mod.shard_range.copy_(mod.range_tensor())
