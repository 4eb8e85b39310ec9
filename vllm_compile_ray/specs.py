"""`InputSpec`: what a piece takes, one entry per input (shared by canonical pieces and keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


@dataclass(frozen=True)
class InputSpec:
    """One piece input: a tensor (shape/stride entries are ints or canonical symbols "s0"), or a
    SymInt (expr names a canonical symbol), or a plain int (value)."""

    kind: str  # "tensor" | "symint" | "int"
    shape: tuple[int | str, ...] = ()
    stride: tuple[int | str, ...] = ()
    dtype: str = ""
    device_type: str = ""
    expr: str = ""
    value: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "stride": list(self.stride),
                "dtype": self.dtype, "device_type": self.device_type, "expr": self.expr,
                "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(data["kind"], tuple(data["shape"]), tuple(data["stride"]), data["dtype"],
                   data["device_type"], data["expr"], data["value"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
