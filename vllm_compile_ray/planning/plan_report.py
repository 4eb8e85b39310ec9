"""`vcr plan` for people: what the model is, how big each rank is, what the plan compiles, and
the command that fills the cache. Pure text from a built (meta) model and its Plan."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from torch import nn

from .. import models
from .plan import Plan


_QUANT_AUX = {"weight_scale", "weight_scale_inv", "input_scale", "input_scale_ub", "qzeros",
              "scales", "g_idx", "weight_shape"}


def count_params(module: nn.Module) -> int:
    """Parameters of `module` (a tied lm_head counted once); a meta model costs nothing. A
    quantized checkpoint's count is its values': packed words hold 32 / bits (MXFP4 bytes two),
    scales and zero points are not counted."""
    seen: set[int] = set()
    total = 0
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is None or id(p) in seen or name in _QUANT_AUX or \
                    name.endswith(("_scales", "_scale_inv", "_weight_scale", "_qzeros", "_g_idx")):
                continue
            seen.add(id(p))
            bits = getattr(mod, "bits", None) or getattr(getattr(mod, "vcr_int4", [None])[0],
                                                         "bits", 32)
            per = 32 // bits if name in ("qweight", "weight_packed") or \
                name.endswith("_qweight") else 2 if name.endswith("_blocks") else 1
            total += p.numel() * per
    return total


def total_params(module: nn.Module) -> int | None:
    """The whole model's parameters: a vcr model's tp=1 build of its config on meta; the module
    itself when it is not sharded (a transformers model), what `hf_tp.shard` counted before
    sharding it; None when unknown."""
    if isinstance(getattr(module, "config", None), models.ModelConfig):
        if getattr(module, "tp_size", 1) == 1:
            return count_params(module)
        return count_params(models.build(module.config, device="meta"))
    if hasattr(module, "vcr_tp"):
        return module.vcr_tp[1]
    # transformers' models have tp_size None unless they were loaded tensor-parallel
    return count_params(module) if getattr(module, "tp_size", None) in (None, 1) else None


def warm_command(model: str, tp_size: int, shapes: Sequence[int | str], *, device: str = "cuda",
                 num_layers: int | None = None, cache: str | None = None) -> str:
    """The `vcr warm` line that compiles exactly this plan's tasks."""
    sizes = [s for s in shapes if s != "dynamic"]
    argv = ["vcr", "warm", "--model", model, "--tp", str(tp_size), "--device", device]
    if sizes:
        argv += ["--sizes", ",".join(str(s) for s in sizes)]
    if "dynamic" not in shapes:
        argv.append("--no-dynamic")
    if num_layers is not None:
        argv += ["--num-layers", str(num_layers)]
    argv += ["--cache", cache or "URL"]
    return " ".join(shlex.quote(a) for a in argv)


def plan_report(model: str, module: nn.Module, plan: Plan, *, tp_size: int, device: str = "cuda",
                num_layers: int | None = None, cache: str | None = None) -> str:
    """A few lines: architecture, parameters per rank and in total, layers, pieces, tasks and
    the warm command.

        Qwen3MoeForCausalLM (qwen3-30b-a3b.json), 48 layers, MoE 128 experts top-8
        parameters: 3.84B per rank x tp 8, 30.53B total (bfloat16: 7.7 GB per rank)
        plan: 49 pieces, 3 unique x 4 shapes (dynamic, 1, 8, 64) = 12 compile tasks
        fill the cache: vcr warm --model qwen3-30b-a3b.json --tp 8 ... --cache URL
    """
    cfg = getattr(module, "config", None)
    arch = getattr(cfg, "architecture", None) or type(module).__name__
    layers = getattr(cfg, "num_hidden_layers", None)
    head = f"{arch} ({model})" + (f", {layers} layers" if layers else "")
    if getattr(cfg, "num_experts", 0):
        head += f", MoE {cfg.num_experts} experts top-{cfg.num_experts_per_tok}"
    if getattr(cfg, "sliding_window", 0):
        head += f", sliding window {cfg.sliding_window}"
    if getattr(module, "vcr_quant", None):  # hf_quant: "FP8 blocks 128x128", "mxfp4 experts"
        head += f", {module.vcr_quant}"
    per_rank, total = count_params(module), total_params(module)
    by_dtype: dict[str, int] = {}
    for p in module.parameters():
        name = str(p.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + p.numel() * p.element_size()
    dtypes = " + ".join(sorted(by_dtype, key=by_dtype.__getitem__, reverse=True)) or "float32"
    params = f"parameters: {_billions(per_rank)} per rank x tp {tp_size}, " + (
        f"{_billions(total)} total" if total is not None else "total unknown")
    params += f" ({dtypes}: {sum(by_dtype.values()) / 1e9:.1f} GB per rank)"
    lines = [head, params, _plan_line(plan),
        "fill the cache: " + warm_command(model, tp_size, plan.shapes, device=device,
                                          num_layers=num_layers, cache=cache),
    ]
    return "\n".join(lines)


def _plan_line(plan: Plan) -> str:
    """Pieces x shapes = tasks; and what the graphs of sizes outside the first one's guards add."""
    first = plan.pieces[:plan.first_pieces]
    unique = len({p.code_id for p in first})
    first_tasks = len({k for p in first for k in p.keys.values()})
    shapes = ", ".join(str(s) for s in plan.shapes)
    line = (f"plan: {len(first)} pieces, {unique} unique x {len(plan.shapes)} shapes ({shapes}) "
            f"= {first_tasks} compile tasks")
    if plan.later_sizes:
        sizes = ", ".join(str(s) for s in plan.later_sizes)
        line += (f", + {len(plan.tasks()) - first_tasks} for the graph(s) dynamo traces at size "
                 f"{sizes} (outside the first graph's guards) = {len(plan.tasks())}")
    return line


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
