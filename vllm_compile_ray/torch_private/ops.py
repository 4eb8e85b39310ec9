"""torch ops as graph targets: their names, overloads and where a custom op is defined."""

from __future__ import annotations

from typing import Any

import torch

# `F.linear` as dynamo records it (an ATen binding with no public name).
LINEAR = torch._C._nn.linear


def is_op(target: Any) -> bool:
    """An op overload (`torch.ops.aten.add.Tensor`) or packet (`torch.ops.aten.add`)."""
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def op_name(target: Any) -> str | None:
    """"ns::op" of an op overload or packet target; None for anything else."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def qualname_and_overload(target: Any) -> tuple[str, str | None]:
    """("ns::op", overload name) of an op overload; (its "ns::op", None) of a packet."""
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket._qualified_op_name, target._overloadname
    return target._qualified_op_name, None


def defining_module(qualname: str) -> str | None:
    """The module that defines custom op `qualname` with `torch.library.custom_op` (importing it
    registers the op); None for other ops."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(qualname)
    return getattr(getattr(opdef, "_init_fn", None), "__module__", None)
