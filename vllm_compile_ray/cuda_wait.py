"""How a compile worker's thread waits for its GPU: "spin" (CUDA's default here) or "block".

CUDA's default schedule (CU_CTX_SCHED_AUTO) spins a waiting thread on its core whenever the
process has fewer CUDA contexts than the machine has cores, which is always the case for a compile
worker. A warm run puts 8-9 compiles on each GPU; each GEMM and epilogue-fusion benchmark of
max-autotune ends in a synchronize, and while the GPU runs the other compiles' kernels the waiting
thread burns a core that the other compiles' lowering and code generation need. "block" sets
CU_CTX_SCHED_BLOCKING_SYNC on the process's primary contexts through the driver API before CUDA
starts in the process: a waiting thread sleeps until the GPU signals. Benchmarks time kernels
with CUDA events on the GPU, so what they measure does not change.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from .errors import ConfigError, VcrError

MODES = ("spin", "block")
DRIVER = "libcuda.so.1"
CU_CTX_SCHED_BLOCKING_SYNC = 0x04


def check(mode: str, device_type: str) -> str:
    """mode, or ConfigError naming the allowed values."""
    if mode not in MODES:
        raise ConfigError(f"cuda_wait={mode!r} is invalid: allowed {', '.join(map(repr, MODES))}")
    if mode == "block" and device_type != "cuda":
        raise ConfigError(f"cuda_wait='block' sets how CUDA waits and needs device 'cuda'; "
                          f"got {device_type!r} (use 'spin', the default, there)")
    return mode


def _call(lib: ctypes.CDLL, name: str, *args: Any) -> None:
    code = getattr(lib, name)(*args)
    if code:
        text = ctypes.c_char_p()
        lib.cuGetErrorName(code, ctypes.byref(text))
        what = text.value.decode() if text.value else "unknown error"
        raise VcrError(f"cuda_wait='block': {name} returned {code} ({what})")


@functools.cache
def use(mode: str, library: str = DRIVER) -> dict[str, Any]:
    """Set how this process's CUDA waits, once per process and before CUDA starts in it (the
    primary contexts' flags apply when they are created). Returns {"cuda_wait": mode,
    "devices": how many primary contexts were set}. library: the CUDA driver to call."""
    check(mode, "cuda")
    if mode == "spin":
        return {"cuda_wait": mode, "devices": 0}
    import torch

    if torch.cuda.is_initialized():
        raise VcrError("cuda_wait='block' must be set before CUDA starts in the process; "
                       "it already runs here")
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        raise VcrError(f"cuda_wait='block' needs the CUDA driver ({library}): {exc}") from exc
    _call(lib, "cuInit", ctypes.c_uint(0))
    count = ctypes.c_int()
    _call(lib, "cuDeviceGetCount", ctypes.byref(count))
    for ordinal in range(count.value):  # the devices CUDA_VISIBLE_DEVICES leaves this process
        device = ctypes.c_int()
        _call(lib, "cuDeviceGet", ctypes.byref(device), ctypes.c_int(ordinal))
        _call(lib, "cuDevicePrimaryCtxSetFlags", device, ctypes.c_uint(CU_CTX_SCHED_BLOCKING_SYNC))
    return {"cuda_wait": mode, "devices": count.value}
