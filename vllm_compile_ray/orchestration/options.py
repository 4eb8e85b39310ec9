"""How a warm run uses the cluster, grouped by concern as frozen, validated dataclasses: what
the compiles run on (`ComputeOptions`) and how failures are retried (`RetryOptions`). `warm`,
the pool (`pool_spec`) and the CLI build the same objects; what is compiled and where the cache
lives stay in `CompilationConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import DEFAULT_POOL_IDLE_TIMEOUT_S
from ..errors import ConfigError

DEVICE_TYPES = ("cuda", "cpu")


def _fail(cls: str, name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{cls}.{name}={value!r} is invalid: {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ComputeOptions:
    """What the compiles run on.

    device_type: the compile target ("cuda", or "cpu" for CPU compiles and fake-GPU tests).
    gpus_per_compile: GPU fraction per compile task (several compiles share a GPU). None: on cpu
    0; on cuda sized from the cluster and the plan (`sizing.size_compiles`), and max_in_flight
    (None) follows. cpus_per_compile also sets Inductor's compile threads in the task.
    resources: extra Ray resources per compile task, e.g. {"H200": 0.01} to pin a GPU type.
    address: a Ray cluster; None connects to RAY_ADDRESS or starts Ray in-process (and stops it).
    prestart: start the compile workers while the driver plans; None: with the inductor backend.
    pool: compile in the cluster's standing pool of compile workers (`pool`), which stay up
    for the next run until pool_idle_timeout_s without work or `vcr pool down`.
    gpu_sharing: "time-slice" (CUDA's default) or "mps" (`experimental.gpu_sharing`).
    """

    device_type: str = "cuda"
    gpus_per_compile: float | None = None
    cpus_per_compile: float = 1.0
    resources: Mapping[str, float] = field(default_factory=dict)
    max_in_flight: int | None = None
    address: str | None = None
    runtime_env: Mapping[str, Any] | None = None
    prestart: bool | None = None
    pool: bool = False
    pool_idle_timeout_s: float = DEFAULT_POOL_IDLE_TIMEOUT_S
    gpu_sharing: str = "time-slice"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.device_type not in DEVICE_TYPES:
            raise ConfigError(f"device_type={self.device_type!r} is invalid: allowed 'cuda', "
                              "'cpu'")
        for attr in ("gpus_per_compile", "cpus_per_compile"):
            value = getattr(self, attr)
            if value is None and attr == "gpus_per_compile":
                continue
            if not _number(value) or value < 0:
                raise _fail(name, attr, value, "must be a number >= 0")
            object.__setattr__(self, attr, float(value))
        if not isinstance(self.resources, Mapping) or not all(
                isinstance(k, str) and _number(v) and v >= 0 for k, v in self.resources.items()):
            raise _fail(name, "resources", self.resources,
                        "must map Ray resource names to amounts >= 0, e.g. {'H200': 0.01}")
        object.__setattr__(self, "resources", dict(self.resources))
        if self.max_in_flight is not None and (
                not isinstance(self.max_in_flight, int) or isinstance(self.max_in_flight, bool)
                or self.max_in_flight < 1):
            raise ConfigError(f"max_in_flight={self.max_in_flight!r} is invalid: must be >= 1")
        if self.address is not None and not isinstance(self.address, str):
            raise _fail(name, "address", self.address, "must be a Ray address string or None")
        if self.runtime_env is not None and not isinstance(self.runtime_env, Mapping):
            raise _fail(name, "runtime_env", self.runtime_env, "must be a dict or None")
        for attr in ("prestart", "pool"):
            value = getattr(self, attr)
            if not (isinstance(value, bool) or (value is None and attr == "prestart")):
                raise _fail(name, attr, value, "must be True or False")
        if not _number(self.pool_idle_timeout_s) or self.pool_idle_timeout_s <= 0:
            raise _fail(name, "pool_idle_timeout_s", self.pool_idle_timeout_s,
                        "must be a number of seconds > 0")
        from ..experimental import gpu_sharing  # imports Ray

        gpu_sharing.check(self.gpu_sharing, self.device_type)

    def replace(self, **changes: Any) -> ComputeOptions:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RetryOptions:
    """max_retries: Ray retries of a task whose worker died; compile_retries: retries of a compile
    that raised. A compile running past `CompilationConfig.max_compile_time` is cancelled."""

    max_retries: int = 3
    compile_retries: int = 1

    def __post_init__(self) -> None:
        for attr in ("max_retries", "compile_retries"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _fail(type(self).__name__, attr, value, "must be an int >= 0")


_COMPUTE_FIELDS = {f.name for f in dataclasses.fields(ComputeOptions)}
_RETRY_FIELDS = {f.name for f in dataclasses.fields(RetryOptions)}


def from_keywords(compute: ComputeOptions | None, retry: RetryOptions | None,
                  keywords: dict[str, Any], caller: str = "warm"
                  ) -> tuple[ComputeOptions, RetryOptions]:
    """The options of a call that still passes the old keyword arguments (one release: each warns
    with its new place, and overrides the same field of `compute` / `retry`); TypeError names an
    unknown one."""
    unknown = sorted(set(keywords) - _COMPUTE_FIELDS - _RETRY_FIELDS)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; options go in "
                        f"compute=ComputeOptions({', '.join(sorted(_COMPUTE_FIELDS))}) and "
                        f"retry=RetryOptions({', '.join(sorted(_RETRY_FIELDS))})")
    compute, retry = compute or ComputeOptions(), retry or RetryOptions()
    if keywords:
        moved = ", ".join(f"{k}= -> {'compute' if k in _COMPUTE_FIELDS else 'retry'}"
                          for k in sorted(keywords))
        warnings.warn(f"{caller}({', '.join(f'{k}=' for k in sorted(keywords))}) is deprecated "
                      f"and will be removed: pass compute=ComputeOptions(...) and "
                      f"retry=RetryOptions(...) ({moved})", DeprecationWarning, stacklevel=3)
        compute = dataclasses.replace(compute, **{k: v for k, v in keywords.items()
                                                   if k in _COMPUTE_FIELDS})
        retry = dataclasses.replace(retry, **{k: v for k, v in keywords.items()
                                               if k in _RETRY_FIELDS})
    return compute, retry
