"""The quantization schemes vcr builds checkpoints of, as `hf_quant.spec` reads them from a
config.json's `quantization_config` (`hf_quant`, `hf_compressed` build them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fp8Block:
    """FP8 weights with one scale per [block_n, block_k] block, activations per token and block
    of columns (DeepSeek-V3/R1, Qwen3 -FP8; compressed-tensors' block strategy)."""

    block_n: int
    block_k: int
    skip: tuple[str, ...]  # modules_to_not_convert (compressed-tensors: its `ignore`)
    scale_name: str = "weight_scale_inv"  # compressed-tensors: "weight_scale"


@dataclass(frozen=True)
class Mxfp4:
    """gpt-oss: its experts in MXFP4."""


@dataclass(frozen=True)
class Fp8Scaled:
    """FP8 weights per output channel or per tensor (compressed-tensors, FBGEMM)."""

    weights: str  # "channel" | "tensor"
    activations: str  # "token" (dynamic) | "tensor" (static input_scale) | "none"
    ub: bool  # FBGEMM: the per-token scale capped by `input_scale_ub`
    ignore: tuple[str, ...]


@dataclass(frozen=True)
class Int4:
    """Integer weight-only AWQ / GPTQ checkpoints (`models.int4` has the layouts)."""

    layout: str  # "awq" | "gptq"
    bits: int
    group: int  # -1: one group over all input features
    zero_offset: int  # the original GPTQ format stores zero points minus one
    skip: tuple[str, ...]  # modules_to_not_convert
