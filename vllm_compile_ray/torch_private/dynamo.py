"""dynamo for capture: marking dims dynamic, the settings a capture runs under, its errors.

`torch._dynamo` is imported at first use (not with this module), as the package did before.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch


def global_state() -> tuple:
    """The global state dynamo's GLOBAL_STATE guard checks, less the CPU thread count (a Ray
    worker, a rank launched with OMP_NUM_THREADS and a plain process differ in it, and a traced
    graph does not depend on it) and grad mode (traced functions run under no_grad): autocast,
    torch function, deterministic algorithms, CUDA matmul precision, default dtype."""
    matmul = torch.backends.cuda.matmul
    return (tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                  for d in ("cpu", "cuda")), torch.is_autocast_cache_enabled(),
            torch._C._is_torch_function_enabled(), torch._C._is_torch_function_all_disabled(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), matmul.allow_tf32,
            matmul.allow_fp16_reduced_precision_reduction,
            matmul.allow_bf16_reduced_precision_reduction, torch.get_default_dtype())


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Trace `dim` of `tensor` as a symbol (dynamo records it on the tensor)."""
    torch._dynamo.mark_dynamic(tensor, dim)


def marked_dims(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(argument position, dim) of every dim `mark_dynamic` marked, kwargs after args by name."""
    values = (*args, *(kwargs[k] for k in sorted(kwargs)))
    return [(i, d) for i, v in enumerate(values) if isinstance(v, torch.Tensor)
            for d in sorted(getattr(v, "_dynamo_dynamic_indices", ()))]


def unmark(values: Sequence[Any]) -> None:
    """Drop every mark dynamo left on the tensors among `values` (a marked tensor fails a
    traced function's guards on torch >= 2.13)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            for name in [n for n in vars(value) if n.startswith(("_dynamo_", "_has_dynamo_"))]:
                delattr(value, name)


@contextlib.contextmanager
def capture_settings() -> Iterator[None]:
    """Size-oblivious tracing of num_tokens (see `planning.inputs.mark_dynamic`), so size 1
    reuses the graph instead of dynamo specializing it, as vLLM does. Each compile gets its own
    backend, so dynamo sees a recompile per `compile()`/`capture()` of one model class; the
    recompile limit is lifted so it never silently falls back to eager."""
    from torch.fx.experimental import _config as shape_config

    with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20), \
            shape_config.patch(backed_size_oblivious=True):
        yield


def shapes_only(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """`gm` run for its outputs' shapes alone: under a fake mode, its outputs handed back as
    uninitialized tensors (no compute, no memory touched). What a plan's calls run: a model of
    uninitialized CPU tensors (`intake.build_for_plan`) must not compute at every size."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import _pytree as pytree

    def run(*args: Any) -> Any:
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = gm(*args)
        return pytree.tree_map_only(torch.Tensor, lambda t: torch.empty_strided(
            t.shape, t.stride(), dtype=t.dtype, device=t.device), out)

    return run


def is_unsupported(exc: BaseException) -> bool:
    """dynamo could not trace the code (`Unsupported`; an exception our traced code raised
    comes as one too)."""
    return isinstance(exc, torch._dynamo.exc.Unsupported)


def model_code_error(exc: BaseException) -> str:
    """When `exc` is the model's own code failing under dynamo's fake tensors (an ordinary
    error: a config field it reads is None, shapes that do not fit), that error and where in
    the model's code, on one line; else ""."""
    fake_call = isinstance(exc, torch._dynamo.exc.Unsupported) and \
        "when making fake tensor call" in str(exc).split("\n", 1)[0]
    if not (fake_call or isinstance(exc, torch._dynamo.exc.TorchRuntimeError)):
        return ""
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    frames = re.findall(r'File "([^"]+)", line (\d+)', str(exc))
    at = f" (at {frames[-1][0].rsplit('/', 1)[-1]}:{frames[-1][1]})" if frames else ""
    text = str(root).split("\n\n")[0] if root is not exc else str(exc).splitlines()[0]
    return f"{type(root).__name__}: {' '.join(text.split())[:300]}{at}"


def specialized(exc: BaseException) -> str:
    """What the model's code fixed, when `exc` (or what it wraps) says dynamo could not keep a
    dim marked dynamic dynamic (`ConstraintViolationError`: the code branches or loops on that
    size); else ""."""
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    link: BaseException | None = exc
    for _ in range(8):
        if link is None:
            return ""
        if isinstance(link, ConstraintViolationError):
            found = re.search(r"Constraints violated \((.*?)\)!", str(link))
            return found.group(1) if found else "a dim marked dynamic"
        link = link.__cause__ or link.__context__
    return ""


def backend_failure_cause(exc: BaseException) -> BaseException | None:
    """What the backend raised, when `exc` is dynamo's wrapper of it (`BackendCompilerFailed`);
    else None."""
    if isinstance(exc, torch._dynamo.exc.BackendCompilerFailed):
        return getattr(exc, "inner_exception", None)
    return None
