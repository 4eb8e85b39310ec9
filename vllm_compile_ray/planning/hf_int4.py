"""AWQ and GPTQ checkpoints (`quant_method: "awq"` / `"gptq"`: the "-AWQ", "-GPTQ-Int4" Llama,
Qwen and Mistral checkpoints), as they serve: each linear layer holds the stored packed integer
weights, zero points and scales (`Int4Linear`) and runs through `vcr::int4_linear`.

    vcr plan --model Qwen/Qwen2.5-72B-Instruct-AWQ --tp 4 --sizes 1,8

Supported: AWQ `version: "gemm"` 4-bit with zero points; GPTQ 4- or 8-bit, symmetric or not, in
activation order or not (`g_idx`), `checkpoint_format` "gptq" or "gptq_v2"; compressed-tensors'
"pack-quantized" symmetric integer weights (`hf_compressed.spec`: llm-compressor's w4a16). The output head, MoE
routers and `modules_to_not_convert` stay unquantized; fused experts hold every expert's packed
tensors (`hf_int4_experts`). At
tp_size > 1 a column-parallel layer keeps its output columns (whole packed words), a
row-parallel one its input rows with every group's scales and zero points.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import int4
from . import hf, hf_int4_experts, hf_shards
from .hf_compressed import ignored
from .quant_schemes import Int4

SUPPORTED = ('quant_method "awq" (version "gemm", 4 bits, zero points) and "gptq" (4 or 8 bits, '
             'checkpoint_format "gptq" or "gptq_v2")')


def spec(qc: dict[str, Any]) -> Int4:
    method, bits = qc.get("quant_method"), qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    skip = tuple(qc.get("modules_to_not_convert") or ())
    if method == "awq":
        _need(str(qc.get("version", "gemm")).lower() == "gemm", "version", qc.get("version"))
        _need(bits == 4, "bits", bits)
        _need(qc.get("zero_point", True), "zero_point", qc.get("zero_point"))
        return Int4("awq", 4, group, 0, skip)
    fmt = qc.get("checkpoint_format", "gptq")
    _need(bits in (4, 8), "bits", bits)
    _need(fmt in ("gptq", "gptq_v2"), "checkpoint_format", fmt)
    return Int4("gptq", bits, group, 1 if fmt == "gptq" else 0, skip)


def _need(ok: bool, field: str, value: Any) -> None:
    if not ok:
        raise UnsupportedModelError(f"quantization_config {field}={value!r} is not supported "
                                    f"(supported: {SUPPORTED})")


class Int4Linear(nn.Linear):
    """A linear layer of an AWQ or GPTQ checkpoint, its parameters as the checkpoint names
    them (`models.int4` describes them)."""

    def __init__(self, name: str, linear: nn.Linear, scheme: Int4):
        nn.Module.__init__(self)
        k, n = self.in_features, self.out_features = linear.in_features, linear.out_features
        per, group = 32 // scheme.bits, scheme.group if scheme.group > 0 else k
        if k % group or n % per or (scheme.layout == "gptq" and k % per):
            raise UnsupportedModelError(f"{name}: {k} inputs x {n} outputs do not hold whole "
                                        f"groups of {group} and words of {per} values")
        self.layout, self.bits, self.group = scheme.layout, scheme.bits, group
        self.zero_offset, self.whole_in = scheme.zero_offset, k
        device = linear.weight.device
        if scheme.layout == "ct":  # compressed-tensors' names; no zero points (symmetric)
            self.weight_packed = self._param((n, k // per), torch.int32, device)
            self.weight_scale = self._param((n, k // group), linear.weight.dtype, device)
            self.weight_shape = self._param((2,), torch.int64, device)
        else:
            rows = (k, n // per) if scheme.layout == "awq" else (k // per, n)
            self.qweight = self._param(rows, torch.int32, device)
            self.qzeros = self._param((k // group, n // per), torch.int32, device)
            self.scales = self._param((k // group, n), torch.float16, device)
        if scheme.layout == "gptq":
            self.g_idx = self._param((k,), torch.int32, device)
        else:  # consecutive groups: a buffer, not in the checkpoint
            hf_shards.buffer(self, "g_idx", self.whole_values("g_idx"), device)
        self.bias = linear.bias

    @staticmethod
    def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)

    def whole_values(self, leaf: str) -> torch.Tensor | None:
        """A parameter's values without a checkpoint, where they must be valid: the groups."""
        if leaf == "g_idx":
            return (torch.arange(self.whole_in) // self.group).to(torch.int32)
        if leaf == "weight_shape":
            return torch.tensor([self.out_features, self.whole_in])
        return None

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        if self.layout == "ct":
            return (self.weight_packed, self.weight_packed[:0], self.weight_scale, self.g_idx)
        return self.qweight, self.qzeros, self.scales, self.g_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4.int4_linear(x, *self._tensors(), self.bits, self.layout, self.zero_offset)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight as an nn.Linear holds it, [out, in], float32."""
        return int4.dequantize(*self._tensors(), self.bits, self.layout, self.zero_offset).T

    def shard_weight(self, name: str, dim: int, start: int, length: int) -> None:
        """Keep output columns [start, start + length) (dim 0 of an nn.Linear weight) or input
        rows (dim 1): the packed words holding them, and for rows every group's scales and zero
        points (`g_idx` keeps the rows' global groups)."""
        per = 32 // self.bits
        if self.layout == "ct":  # [N, K] rows like the nn.Linear weight
            packed = [("weight_packed", 1)] if dim == 1 else []
            plain = [("weight_packed", 0), ("weight_scale", 0)] if dim == 0 else []
            if dim == 1:
                self._keep_buffer_rows(start, length)
        elif dim == 0:  # output columns
            packed = [("qzeros", 1)] + ([("qweight", 1)] if self.layout == "awq" else [])
            plain = [("scales", 1)] + ([("qweight", 1)] if self.layout == "gptq" else [])
        else:  # input rows
            packed = [("qweight", 0)] if self.layout == "gptq" else []
            plain = [("qweight", 0)] if self.layout == "awq" else []
            plain += [("g_idx", 0)] if self.layout == "gptq" else []
            self._keep_buffer_rows(start, length)
        if packed and (start % per or length % per):
            raise UnsupportedModelError(f"{name}: a tensor-parallel shard of {length} "
                                        f"{'columns' if dim == 0 else 'rows'} does not fall on "
                                        f"whole words of {per} packed values")
        for attr, d in packed:
            self._keep(attr, d, start // per, length // per)
        for attr, d in plain:
            self._keep(attr, d, start, length)

    def _keep(self, attr: str, dim: int, start: int, length: int) -> None:
        t = getattr(self, attr)
        step = ("slice", dim, [start], length, t.shape[dim])
        with torch.no_grad():
            setattr(self, attr, hf_shards.keep(t, hf_shards.cut(t.detach(), [step]).clone(),
                                               step))

    def _keep_buffer_rows(self, start: int, length: int) -> None:
        if self.layout != "gptq":
            value = self.whole_values("g_idx")[start:start + length]
            hf_shards.buffer(self, "g_idx", value, self.g_idx.device)


def quantize(model: nn.Module, scheme: Int4, routers: set[str]) -> nn.Module:
    """`model`'s linear layers (not the head, a router or `modules_to_not_convert`) made
    `Int4Linear`s, in place."""
    head = model.get_output_embeddings()
    experts = hf.fused_experts(model)
    for name, module in experts:
        hf_int4_experts.quantize(name, module, scheme)
    if experts:
        hf.use_experts(model, hf_int4_experts.IMPLEMENTATION, hf_int4_experts.forward)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head and name not in routers and \
                not ignored(name, scheme.skip):
            model.set_submodule(name, Int4Linear(name, module, scheme))
    kind = {"ct": "compressed-tensors int"}.get(scheme.layout, scheme.layout.upper())
    model.vcr_quant = f"{kind} {scheme.bits}-bit weights, groups of {scheme.group}"
    return model
