"""A rank's part of a transformers model, materialized without the whole model in memory.

`hf_config` builds the model with its parameters on meta (`params_on_meta`: buffers such as
rotary frequencies stay real), quantizes it (`hf_quant`) and shards it (`hf_tp`). Each slice
those take of a parameter is recorded on the new parameter (`keep`: its recipe), so that
`materialize` can then give every parameter its storage on the rank's device, one parameter at
a time:
- from a checkpoint (safetensors): the stored tensor (a fused experts parameter assembled from
  each expert's gate/up/down, as transformers merges them), cut by the recipe;
- without weights: deterministic values, each element a hash of the seed, the parameter's name
  and its index in the whole parameter (std 0.02; ones for norms, zeros for biases, random codes
  for quantized tensors), so a rank computes only its slice and every rank's slices are cut
  from one and the same model.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.checkpoint import safetensors_files
from .hf_names import Names

# A checkpoint stores each expert's projections apart; the fused experts hold them stacked, gate
# and up concatenated (transformers' MergeModulelist + Concatenate for these models).
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)"
                    r"(_scale_inv|_weight_scale|_qweight|_qzeros|_scales|_g_idx)?$")
# A fused parameter's suffix -> (each expert's tensor, the dim gate and up are concatenated on:
# their output features; None: one tensor both share, AWQ / GPTQ's groups of the same input)
_PARTS = {None: ("weight", 0), "_scale_inv": ("weight_scale_inv", 0),
          "_weight_scale": ("weight_scale", 0), "_qweight": ("qweight", 1),
          "_qzeros": ("qzeros", 1), "_scales": ("scales", 1), "_g_idx": ("g_idx", None)}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_UNUSED = re.compile(r"rotary_emb\.inv_freq$")


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Parameters registered inside go to the meta device at once (an `empty` tensor's pages are
    never touched); buffers stay where they are made."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def keep(old: torch.Tensor, new: torch.Tensor, step: tuple | None = None, *,
         source: str | None = None) -> nn.Parameter:
    """`new` (a slice of parameter `old`, by `step`) as a parameter whose recipe is `old`'s and
    `step`; `source`: the attribute the checkpoint names it by, when it moves to another."""
    p = nn.Parameter(new, requires_grad=False)
    p.vcr_recipe = [*getattr(old, "vcr_recipe", ()), *((step,) if step else ())]
    source = source or getattr(old, "vcr_source", None)
    if source:
        p.vcr_source = source
    return p


def divide(p: torch.Tensor, k: int) -> None:
    """`p` divided by `k` in place, and in its recipe."""
    with torch.no_grad():
        p.div_(k)
    p.vcr_recipe = [*getattr(p, "vcr_recipe", ()), ("div", k)]


def buffer(module: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> None:
    """A non-persistent buffer made from `value` (CPU) on `device`; on meta its value is kept for
    `materialize`."""
    module.register_buffer(name, value.to(device), persistent=False)
    if device.type == "meta":
        module.__dict__.setdefault("vcr_buffers", {})[name] = value


def cut(t: torch.Tensor, recipe: list[tuple]) -> torch.Tensor:
    """The recipe's slices of the whole tensor `t`."""
    for step in recipe:  # ("slice", dim, starts, length, size before), ("pad", dim, size,
        if step[0] == "slice":  # size before), ("div", k)
            _, dim, starts, length, _ = step
            t = torch.cat([t.narrow(dim, s, length) for s in starts], dim)
        elif step[0] == "pad":
            _, dim, size, _ = step
            shape = list(t.shape)
            shape[dim] = size - t.shape[dim]
            t = torch.cat([t, t.new_zeros(shape)], dim)
        else:  # ("div", k)
            t = t / step[1]
    return t


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int,
                weights: str | None = None) -> nn.Module:
    """Every meta parameter of `model` on `device`: its slice of the checkpoint at `weights`, or
    of the seeded values. ConfigError naming the tensors when one is unknown, misshapen or
    missing: never a half-loaded model."""
    with ExitStack() as stack:
        reader = _Checkpoint(weights, model, stack) if weights else None
        made: dict[int, nn.Parameter] = {}  # tied parameters stay one
        for module, attr, p, source in _meta_params(model):
            if id(p) not in made:
                t = reader.read(source, p) if reader else _values(source, module, p, seed, device)
                made[id(p)] = nn.Parameter(t.to(device), requires_grad=False)
            module._parameters[attr] = made[id(p)]
        for module in model.modules():
            for name, value in module.__dict__.pop("vcr_buffers", {}).items():
                module._buffers[name] = value.to(device)
        if reader:
            reader.read_buffers(model)
            reader.check_all_used()
    return model


def readable(model: nn.Module, weights: str) -> bool:
    """Whether the checkpoint at `weights` holds every parameter of `model` (built on meta) by
    the names `materialize` reads, and nothing else: else transformers' loader, which converts
    other layouts, must load it."""
    with ExitStack() as stack:
        reader = _Checkpoint(weights, model, stack)
        needed: set[str] = set()
        seen: set[int] = set()  # a tied parameter is read once, by its first name
        for _, _, p, source in _meta_params(model):
            if id(p) in seen:
                continue
            seen.add(id(p))
            experts, _ = reader.sources(source, p)
            needed.update([source] if experts is None else [n for e in experts for n in e])
        stored = set(reader.files)
        return needed <= stored and stored - needed <= set(_buffers(model))


def _meta_params(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter, str]]:
    """(module, attribute, parameter, the name a checkpoint stores it by) of each meta
    parameter."""
    for mod_name, module in model.named_modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                source = getattr(p, "vcr_source", attr)
                yield module, attr, p, f"{mod_name}.{source}" if mod_name else source


def _buffers(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Persistent buffers by their checkpoint name: (module, attribute, value). A checkpoint may
    store them (DeepSeek-V3's and MiniMax-M2's router score correction) or not (the value built
    stays)."""
    return {f"{mod_name}.{attr}" if mod_name else attr: (module, attr, b)
            for mod_name, module in model.named_modules()
            for attr, b in module._buffers.items()
            if b is not None and attr not in module._non_persistent_buffers_set}


def _values(name: str, module: nn.Module, p: torch.Tensor, seed: int,
            device: torch.device) -> torch.Tensor:
    """Parameter `name`'s slice of deterministic values for the whole parameter: each element a
    hash of (seed, name, its index in the whole), so a rank computes only its slice and every
    rank's slices are cut from one model."""
    leaf = name.rsplit(".", 1)[-1]
    whole = module.whole_values(leaf) if hasattr(module, "whole_values") else None
    if whole is not None:  # values a layer needs valid (`hf_int4`'s groups)
        return cut(whole, getattr(p, "vcr_recipe", [])).to(p.dtype).to(device)
    constant = _constant(leaf, module, p.dtype)
    if constant is not None:
        return torch.full(p.shape, constant, dtype=p.dtype, device=device)
    coords, scale, whole = _coords(p)
    key = _key(seed, name)
    if p.dim() == 0:
        return _draw(torch.tensor(key), p.dtype, leaf).to(p.dtype).to(device)
    strides = torch.tensor(whole + [1]).flip(0).cumprod(0).flip(0)[1:].tolist()
    out = torch.empty(p.shape, dtype=p.dtype, device=device)
    rows = max(1, (1 << 24) // max(1, p[0].numel() if p.dim() else 1))
    for first in range(0, p.shape[0] if p.dim() else 1, rows):
        part = [c.to(device) for c in coords]
        if p.dim():
            part[0] = part[0][first:first + rows]
        index = torch.zeros((), dtype=torch.int64, device=device)
        valid = torch.ones((), dtype=torch.bool, device=device)
        for d, (c, stride) in enumerate(zip(part, strides)):
            shape = [1] * len(part)
            shape[d] = len(c)
            index = index + c.view(shape).clamp(min=0) * stride
            valid = valid & (c.view(shape) >= 0)
        values = torch.where(valid, _draw(index + key, p.dtype, leaf), 0)
        out[first:first + rows] = (values * scale if scale != 1 else values).to(p.dtype)
    return out


def _key(seed: int, name: str) -> int:
    """(seed, name) as an int64 offset of the element indices."""
    k = ((seed * 1_000_003 + zlib.crc32(name.encode())) * 0x9E3779B97F4A7C15) % (1 << 64)
    return k - (1 << 64) if k >= 1 << 63 else k


def _constant(leaf: str, module: nn.Module, dtype: torch.dtype) -> float | None:
    """The value of every element, for parameters a model needs constant (norm gains, biases,
    block scales), else None."""
    if leaf.endswith("_scales") and dtype == torch.uint8:
        return 120.0  # MXFP4 scale 2^-7: values up to 0.05
    if leaf == "input_scale_ub":
        return 1200.0  # FBGEMM's cap on a per-token activation scale
    if leaf == "input_scale":
        return 0.05  # a calibrated activation scale: |x| up to 22 in FP8
    if leaf.endswith(("_scale_inv", "_scale")):
        return 0.02  # with float8 values in [-1, 1): up to 0.02
    if leaf == "scales" and dtype.is_floating_point:
        return 0.002  # AWQ / GPTQ: 4-bit steps of 0.002
    if not dtype.is_floating_point and dtype not in (torch.uint8, torch.int32):
        return 0.0
    if "bias" in leaf:
        return 0.0
    if "Norm" in type(module).__name__ and leaf == "weight":
        return 1.0
    return None


def _draw(x: torch.Tensor, dtype: torch.dtype, leaf: str) -> torch.Tensor:
    """splitmix64 of int64 `x`: uniform values (std 0.02 for weights), float8 values in [-1, 1),
    or random MXFP4 codes."""
    x = (x ^ (x >> 30)) * -4658895280553007687
    x = (x ^ (x >> 27)) * -7723592293110705685
    x = x ^ (x >> 31)
    if dtype == torch.uint8:
        return x & 0xFF
    if dtype == torch.int32:  # packed integer words
        return x.to(torch.int32)
    u = (x & 0xFFFFFF).to(torch.float32) / float(1 << 24) - 0.5  # [-0.5, 0.5)
    return u * 2 if dtype == torch.float8_e4m3fn else u * 0.0693  # std 0.02


def _coords(p: torch.Tensor) -> tuple[list[torch.Tensor], float, list[int]]:
    """Per dim, the index in the whole parameter of each of `p`'s entries (-1: padding); the
    factor its recipe divides by; the whole parameter's shape."""
    recipe = getattr(p, "vcr_recipe", [])
    shape = list(p.shape)
    for step in reversed(recipe):
        if step[0] in ("slice", "pad"):
            shape[step[1]] = step[-1]  # the dim's size before the step
    coords = [torch.arange(n) for n in shape]
    scale = 1.0
    for step in recipe:
        if step[0] == "slice":
            _, dim, starts, length, _ = step
            coords[dim] = torch.cat([coords[dim][s:s + length] for s in starts])
        elif step[0] == "pad":
            _, dim, size, _ = step
            coords[dim] = torch.cat([coords[dim], torch.full((size - len(coords[dim]),), -1)])
        else:
            scale /= step[1]
    return coords, scale, shape


class _Checkpoint:
    """The safetensors files of a checkpoint, read one tensor at a time."""

    def __init__(self, path: str, model: nn.Module, stack: ExitStack):
        from safetensors import safe_open

        text = model.config.get_text_config()
        layers = text.num_hidden_layers
        tied = getattr(model.config, "tie_word_embeddings", False) or \
            getattr(text, "tie_word_embeddings", False)
        self.names = Names(model)
        self.files: dict[str, Any] = {}  # the model's name -> the file holding it
        self.stored: dict[str, str] = {}  # the model's name -> its name in the file
        for file in safetensors_files(path):
            f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            for stored in f.keys():
                name = self.names.model_name(stored)
                layer = _LAYER.search(name)  # a layer past --num-layers (not a vision one's)
                past = layer and int(layer.group(1)) >= layers and name not in self.names.state
                if not (_UNUSED.search(name) or (tied and name == "lm_head.weight") or past):
                    self.files[name], self.stored[name] = f, stored
        self.used: set[str] = set()
        self.model = type(model).__name__

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ConfigError(f"checkpoint lacks {name}, which {self.model} needs")
        self.used.add(name)
        return self.files[name].get_tensor(self.stored[name])

    def sources(self, name: str, p: torch.Tensor) -> tuple[list[list[str]] | None, int | None]:
        """The checkpoint names parameter `name` is read from: per expert, its gate and up (or
        down) for fused experts the checkpoint stores apart, and the dim gate and up join on;
        None for one tensor, `name`."""
        m = _FUSED.match(name)
        if name in self.files or m is None:
            return None, None
        prefix, proj = m.group(1), m.group(2)
        leaf, dim = _PARTS[m.group(3)]
        parts = self.names.expert_parts(proj)
        return [[f"{prefix}.{e}.{part}.{leaf}" for part in parts]
                for e in range(p.shape[0])], dim

    def read(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """Parameter `name`'s slice (`p`: its meta tensor with the recipe)."""
        recipe = getattr(p, "vcr_recipe", [])
        experts, dim = self.sources(name, p)
        if experts is None:
            t = cut(self._get(name), recipe)
        else:  # fused experts from each expert's tensors: cut per expert
            t = torch.stack([cut(self._joined(names, dim)[None], recipe)[0] for names in experts])
        if tuple(t.shape) != tuple(p.shape):
            raise ConfigError(f"checkpoint tensor(s) for {name} give shape {tuple(t.shape)} "
                              f"where {self.model} takes {tuple(p.shape)}")
        return t.to(p.dtype)

    def _joined(self, names: list[str], dim: int | None) -> torch.Tensor:
        tensors = [self._get(n) for n in names]
        if dim is not None:
            return torch.cat(tensors, dim)
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ConfigError(f"checkpoint tensors {', '.join(names)} differ; {self.model}'s "
                              "fused experts hold one of them")
        return tensors[0]

    def read_buffers(self, model: nn.Module) -> None:
        """The persistent buffers the checkpoint stores, as stored."""
        for name, (module, attr, b) in _buffers(model).items():
            if name in self.files:
                t = self._get(name)
                if tuple(t.shape) != tuple(b.shape):
                    raise ConfigError(f"checkpoint tensor {name} has shape {tuple(t.shape)} where "
                                      f"{self.model} takes {tuple(b.shape)}")
                module._buffers[attr] = t.to(device=b.device, dtype=b.dtype)

    def check_all_used(self) -> None:
        unused = sorted(set(self.files) - self.used)
        if unused:
            more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
            raise ConfigError(f"checkpoint tensors {self.model} has no parameter for: "
                              f"{', '.join(unused[:5])}{more}")
