"""FP8 checkpoints of compressed-tensors ("float-quantized": the "-FP8", "-FP8-dynamic" and
"-FP8-block" Llama, Qwen, Mistral and Gemma checkpoints of llm-compressor; its "pack-quantized"
w4a16 / w8a16 integer checkpoints are `hf_int4`'s) and FBGEMM FP8
(`quant_method: "fbgemm_fp8"`, Meta's Llama 3.1 405B FP8), as they serve.

    vcr plan --model RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic --tp 2 --sizes 1,8

Supported: one config group targeting `Linear` layers with 8-bit float weights per output channel
or per tensor (`Fp8ScaledLinear`: `weight`, `weight_scale` [N, 1] or [1]) and activations per
token (dynamic), per tensor (a calibrated `input_scale`) or not quantized; or weights in blocks
with activations per group of the block's columns (`hf_quant.Fp8BlockLinear`, its scales named
`weight_scale`). Fused experts of a per-channel, per-token checkpoint ("-FP8-dynamic" MoE) hold
each expert's float8 weights and channel scales (`vcr::fp8_scaled_experts`). The `ignore` list
(names or `re:` patterns) keeps modules unquantized, as do the output head and MoE routers.
Anything else (integer or 4-bit float schemes, KV-cache quantization, several config groups,
other fused experts) is refused, naming the field.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import fp8
from . import hf, hf_shards
from .quant_schemes import Fp8Block, Fp8Scaled, Int4

EXPERTS_IMPLEMENTATION = "vcr_fp8_scaled"
SUPPORTED = ('compressed-tensors "float-quantized" (one config group on Linear layers: 8-bit '
             'float weights per channel, tensor or block; activations per token, tensor, '
             'group or none), compressed-tensors "pack-quantized" (symmetric 4- or 8-bit '
             'integer weights per group or channel, activations unquantized: w4a16) and '
             'quant_method "fbgemm_fp8"')


def spec(qc: dict[str, Any]) -> Fp8Scaled | Fp8Block | Int4:
    """The scheme of a compressed-tensors or FBGEMM `quantization_config` (`Fp8Block` for
    compressed-tensors' block strategy, `Int4` for its packed integer weights)."""
    if qc.get("quant_method") == "fbgemm_fp8":
        return Fp8Scaled("channel", "token", True, tuple(qc.get("modules_to_not_convert") or ()))
    fields = {"format": qc.get("format"), "kv_cache_scheme": qc.get("kv_cache_scheme")}
    groups = qc.get("config_groups") or {}
    _need(fields["format"] in ("float-quantized", "pack-quantized"), "format", fields["format"])
    _need(not fields["kv_cache_scheme"], "kv_cache_scheme", fields["kv_cache_scheme"])
    _need(len(groups) == 1, "config_groups", f"{len(groups)} groups")
    group = next(iter(groups.values()))
    _need(group.get("targets") == ["Linear"], "targets", group.get("targets"))
    _need(not group.get("output_activations"), "output_activations",
          group.get("output_activations"))
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    ignore = tuple(qc.get("ignore") or ())
    if fields["format"] == "pack-quantized":
        return _packed(weights, acts, ignore)
    _need(weights.get("type") == "float" and weights.get("num_bits") == 8, "weights",
          f"{weights.get('num_bits')}-bit {weights.get('type')}")
    strategy = weights.get("strategy")
    if acts is not None:
        _need(acts.get("type") == "float" and acts.get("num_bits") == 8, "input_activations",
              f"{acts.get('num_bits')}-bit {acts.get('type')}")
    if strategy == "block":
        bn, bk = weights.get("block_structure") or (0, 0)
        _need(acts is not None and acts.get("strategy") == "group" and
              acts.get("group_size") == bk and acts.get("dynamic"), "input_activations",
              f"{acts} with weights in blocks {[bn, bk]}")
        return Fp8Block(bn, bk, ignore, scale_name="weight_scale")
    _need(strategy in ("channel", "tensor"), "weights strategy", strategy)
    act = "none" if acts is None else acts.get("strategy")
    _need(act in ("none", "token", "tensor") and
          (act != "token" or acts.get("dynamic")) and (act != "tensor" or not acts.get("dynamic")),
          "input_activations", acts)
    return Fp8Scaled(strategy, act, False, ignore)


def _packed(weights: dict[str, Any], acts: Any, ignore: tuple[str, ...]) -> Int4:
    """compressed-tensors' packed integer weights (`models.int4`'s "ct" layout)."""
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    _need(weights.get("type") == "int" and bits in (4, 8) and weights.get("symmetric", True),
          "weights", f"{bits}-bit {weights.get('type')} symmetric={weights.get('symmetric')}")
    _need(strategy in ("group", "channel"), "weights strategy", strategy)
    _need(not weights.get("actorder"), "weights actorder", weights.get("actorder"))
    _need(acts is None, "input_activations", acts)
    group = weights.get("group_size") if strategy == "group" else -1
    return Int4("ct", bits, group, 1 << (bits - 1), ignore)


def _need(ok: bool, field: str, value: Any) -> None:
    if not ok:
        raise UnsupportedModelError(f"quantization_config {field}={value!r} is not supported "
                                    f"(supported: {SUPPORTED})")


def ignored(name: str, patterns: set[str] | tuple[str, ...]) -> bool:
    """A module a quantization config keeps unquantized: an entry names it or a module above it
    (transformers' rule), or matches it as `re:<regex>` (compressed-tensors')."""
    dotted = f".{name}."
    return any(re.match(p[3:], name) if p.startswith("re:") else f".{p}." in dotted
               for p in patterns)


class Fp8ScaledLinear(nn.Linear):
    """A linear layer with a float8 weight and per-channel or per-tensor scales."""

    def __init__(self, linear: nn.Linear, scheme: Fp8Scaled):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        channel = scheme.weights == "channel"
        amax = w.abs().amax(dim=1, keepdim=True) if channel else w.abs().amax().reshape(1)
        scale = amax.clamp(min=1e-12) / fp8.FP8_MAX  # [N, 1] or [1]
        self.weight = nn.Parameter((w / scale.reshape(-1, 1)).clamp(-fp8.FP8_MAX, fp8.FP8_MAX)
                                   .to(fp8.FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        # calibrated per-tensor activation scale; FBGEMM's cap on the per-token one
        self.input_scale = self._scalar(0.05, w.device) if scheme.activations == "tensor" else None
        self.input_scale_ub = self._scalar(1200.0, w.device) if scheme.ub else None
        self.quantized_input = scheme.activations != "none"
        self.bias = linear.bias

    @staticmethod
    def _scalar(value: float, device: torch.device) -> nn.Parameter:
        return nn.Parameter(torch.full((1,), value, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized_input:  # FP8 weights, activations as they are
            y = x @ (self.weight.to(x.dtype) * self.weight_scale.to(x.dtype).reshape(-1, 1)).T
        else:
            y = fp8.fp8_scaled_linear(x, self.weight, self.weight_scale, self.input_scale,
                                      self.input_scale_ub)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float().reshape(-1, 1)

    def slice_scales(self, dim: int, step: tuple) -> None:
        """A rank's output channels keep their scales; a per-tensor scale stays whole."""
        if dim == 0 and self.weight_scale.shape[0] > 1:
            with torch.no_grad():
                kept = hf_shards.cut(self.weight_scale.detach(), [step]).clone()
            self.weight_scale = hf_shards.keep(self.weight_scale, kept, step)


def quantize(model: nn.Module, scheme: Fp8Scaled, routers: set[str]) -> nn.Module:
    """`model`'s linear layers (not the head, a router or what the config ignores) made
    `Fp8ScaledLinear`s, in place."""
    head = model.get_output_embeddings()
    experts = hf.fused_experts(model)
    for name, module in experts:
        _quantize_experts(name, module, scheme)
    if experts:
        hf.use_experts(model, EXPERTS_IMPLEMENTATION, experts_forward)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head and name not in routers and \
                not ignored(name, scheme.ignore):
            model.set_submodule(name, Fp8ScaledLinear(module, scheme))
    acts = {"token": "per-token", "tensor": "static", "none": "unquantized"}[scheme.activations]
    model.vcr_quant = f"FP8 per-{scheme.weights} weights, {acts} activations"
    return model


def _quantize_experts(name: str, module: nn.Module, scheme: Fp8Scaled) -> None:
    """Fused experts with float8 weights and per-channel scales (`{proj}_weight_scale`
    [E, N, 1]): the "-FP8-dynamic" MoE checkpoints."""
    layout = {"has_gate": True, "is_concatenated": True, "is_transposed": False,
              "has_bias": False, "has_post_expert_norm": False}
    odd = [f"{k}={getattr(module, k)}" for k, v in layout.items() if getattr(module, k, v) != v]
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    if odd or act not in fp8.ACTIVATIONS or (scheme.weights, scheme.activations, scheme.ub) != \
            ("channel", "token", False):
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}): fused experts of a compressed-tensors FP8 "
            f"checkpoint are served with per-channel weights and per-token activations, "
            f"gate|up-concatenated and untransposed, activation in {sorted(fp8.ACTIVATIONS)}; "
            f"this one has {', '.join(odd) or (scheme.weights, scheme.activations, act)}")
    for attr in ("gate_up_proj", "down_proj"):
        w = getattr(module, attr).detach()
        setattr(module, attr, nn.Parameter(torch.zeros(w.shape, dtype=fp8.FP8, device=w.device),
                                           requires_grad=False))
        module.register_parameter(f"{attr}_weight_scale", nn.Parameter(
            torch.zeros(*w.shape[:-1], 1, device=w.device), requires_grad=False))
    module.vcr_fp8_scaled = act


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface entry for per-channel FP8 experts."""
    return fp8.fp8_scaled_experts(hidden_states, top_k_index, top_k_weights.to(torch.float32),
                                  module.gate_up_proj, module.gate_up_proj_weight_scale,
                                  module.down_proj, module.down_proj_weight_scale,
                                  module.vcr_fp8_scaled)
