"""transformers' models at tp_size > 1: one rank's shard, by the model's own tensor-parallel plan.

    model = AutoModelForCausalLM.from_config(cfg)   # the whole model (meta, random or real)
    hf_tp.shard(model, tp_size=2, rank=1)           # in place: rank 1's slices, collectives

transformers ships a plan per architecture (`config.base_model_tp_plan`: module pattern ->
style, e.g. "layers.*.self_attn.q_proj": "colwise"). `shard` applies it as transformers' own
tensor parallelism does, with local tensors and vcr's collective ops (`vcr::all_reduce`,
`vcr::all_gather`) instead of DTensors, so dynamo traces each rank to the same graph and every
rank computes the same keys:

- colwise: weight and bias rows; the output stays this rank's slice (attention heads, MLP).
- rowwise: weight columns; the output is all-reduced, then the whole bias added.
- colwise_gather_output: colwise, the slices gathered to the whole output.
- rowwise_split_input: rowwise on a whole input: this rank takes its columns first.
- embedding_rowwise: the vocabulary's rows; ids elsewhere look up zeros, then all-reduce.
- on a bare parameter (Llama 4's experts): colwise splits its second-to-last dim, rowwise its
  last (a 1-D one stays whole), packed_* each half of it; moe_tp_experts all-reduces the
  experts' output, each rank having run its slice of every expert.
- fused experts the plan leaves whole (transformers shards them only by expert parallelism:
  Qwen2-MoE, DeepSeek, gpt-oss, ...): each rank keeps its slice of every expert's intermediate
  dim, as vLLM's tensor-parallel MoE does, and their output is all-reduced (`_shard_experts`).
- an untied lm_head as its class plans it (colwise_gather_output: vocab rows, logits gathered),
  and then its input embedding, if the plan leaves it whole, embedding_rowwise (as vLLM).
- replicate, replicated_with_grad_allreduce, mla_kv_a_proj (DeepSeek's MLA down-projection):
  whole on every rank (the last two differ from replicate only in training).

With fewer KV heads than ranks (2 at tp 8), each rank keeps the one whole KV head its query heads
read, as vLLM replicates them. Rank-dependent numbers live in buffers (the vocabulary range, the input columns), never in the
code, so the traced graph is the same on every rank. Any other style, a sharded dim that does
not divide, or attention heads that do not split evenly is refused naming it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import ops
from ..models.layers import vocab_shard_lookup
from . import hf_int4_experts, hf_quant, hf_shards, plan_report

logger = logging.getLogger(__name__)

LINEAR_STYLES = ("colwise", "rowwise", "colwise_gather_output", "rowwise_split_input")
# On a parameter (a module's bare weight: Llama 4's experts): the dim it splits, as transformers
# does; "packed" splits each of the two halves (gate, up) and keeps them side by side.
PARAM_STYLES = ("colwise", "rowwise", "packed_colwise", "packed_rowwise")
# Whole on every rank; the latter two differ from "replicate" only in training (gradients).
WHOLE_STYLES = ("replicate", "replicated_with_grad_allreduce", "mla_kv_a_proj")
STYLES = (*LINEAR_STYLES, "embedding_rowwise", "packed_colwise", "packed_rowwise",
          "moe_tp_experts", *WHOLE_STYLES)


def plan_of(model: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan over its decoder (`base_model_tp_plan`); {} without."""
    return dict(getattr(model.config.get_text_config(), "base_model_tp_plan", None) or {})


def check(config: Any, tp_size: int) -> None:
    """UnsupportedModelError when transformers' plan for `config` cannot shard it `tp_size`
    ways (no plan, a style vcr does not apply, heads that do not split)."""
    text = config.get_text_config()
    arch = type(config).__name__.removesuffix("Config")
    plan = dict(getattr(text, "base_model_tp_plan", None) or {})
    if not plan:
        raise UnsupportedModelError(f"transformers' {arch} has no tensor-parallel plan "
                                    f"(base_model_tp_plan); it serves only at tp_size=1")
    other = sorted({s for s in plan.values() if s not in STYLES})
    if other:
        names = [f"{k}: {s}" for k, s in plan.items() if s in other]
        raise UnsupportedModelError(
            f"transformers' {arch} tensor-parallel plan uses style(s) {other} ({', '.join(names)}); "
            f"vcr applies {', '.join(STYLES)}; serve it at tp_size=1")
    if any(s.startswith("colwise") for s in plan.values()):  # q/k/v (or fused qkv) by heads
        heads, kv = (getattr(text, f, None) for f in ("num_attention_heads", "num_key_value_heads"))
        if isinstance(heads, int) and heads % tp_size:
            raise UnsupportedModelError(
                f"num_attention_heads={heads} is not divisible by tp_size={tp_size}: transformers' "
                f"{arch} plan splits attention by heads; use a tp_size that divides it")
        if isinstance(kv, int) and kv % tp_size and tp_size % kv:
            raise UnsupportedModelError(
                f"num_key_value_heads={kv} and tp_size={tp_size} do not divide one another: "
                f"transformers' {arch} plan splits attention by heads")
        if isinstance(kv, int) and kv % tp_size and _fused_qkv(plan):
            raise UnsupportedModelError(
                f"num_key_value_heads={kv} is fewer than tp_size={tp_size} and transformers' "
                f"{arch} splits a fused q/k/v projection by columns, so a rank cannot keep one "
                "whole KV head; use a tp_size that num_key_value_heads divides by")


_FUSED_QKV = re.compile(r"(?:^|\.)(?:qkv_proj|query_key_value|qkv|Wqkv|c_attn|W_pack)\Z")


def _fused_qkv(plan: dict[str, str]) -> bool:
    """The plan splits a softmax attention's fused q/k/v projection by columns (and keeps the
    slices: colwise_gather_output gathers them whole)."""
    return any(s == "colwise" and _FUSED_QKV.search(k) for k, s in plan.items())


def _kv_rows(name: str, module: nn.Module, style: str, text: Any, tp_size: int,
             rank: int) -> tuple[int, int] | None:
    """Rows of a k/v projection when the model has fewer KV heads than ranks: each rank keeps
    one whole KV head, the one its query heads read (vLLM replicates KV heads the same way):
    head rank // (tp_size // num_key_value_heads). None: split as planned."""
    kv = getattr(text, "num_key_value_heads", None)
    if style != "colwise" or not name.endswith(("k_proj", "v_proj")) or \
            not isinstance(kv, int) or kv >= tp_size:
        return None
    head_dim = module.out_features // kv
    return rank // (tp_size // kv) * head_dim, head_dim


def shard(model: nn.Module, tp_size: int, rank: int) -> nn.Module:
    """`model` (whole) made rank `rank`'s shard of `tp_size`, in place; returns it."""
    check(model.config, tp_size)
    whole = plan_report.count_params(model)
    plan = {re.compile(re.escape(k).replace(r"\*", r"\d+") + r"\Z"): s
            for k, s in plan_of(model).items()}
    decoder = _decoder(model, plan)
    text = model.config.get_text_config()
    head = _untied_head(model)  # before the embedding is sharded (a new tensor: ties break)
    modules = dict(decoder.named_modules())
    params = [n for n, _ in decoder.named_parameters()]
    planned: set[str] = set()  # modules the plan names (or owns parameters of)
    for rx, style in plan.items():
        for name in [n for n in modules if rx.match(n)]:
            planned.add(name)
            if style not in WHOLE_STYLES:
                rows = _kv_rows(name, modules[name], style, text, tp_size, rank)
                _apply(modules[name], name, style, tp_size, rank, rows)
        for name in [n for n in params if rx.match(n)]:
            owner, _, attr = name.rpartition(".")
            planned.add(owner)
            if style not in WHOLE_STYLES:
                _apply_param(modules[owner], name, attr, style, tp_size, rank)
    for name, module in modules.items():
        if name not in planned and _fused_experts(module):
            _shard_experts(module, name, tp_size, rank)
    if head is not None and head.out_features % tp_size == 0:  # vocab rows, logits gathered
        _apply(head, "lm_head", "colwise_gather_output", tp_size, rank)
    embed = model.get_input_embeddings()
    if head is not None and isinstance(embed, nn.Embedding) and \
            not any(m is embed for n, m in modules.items() if n in planned):
        _vocab_rows(embed, tp_size, rank)  # untied and unplanned: vocab-parallel, as vLLM
    model.vcr_tp = (tp_size, whole)  # (size, the whole model's parameters): for `vcr plan`
    local = plan_report.count_params(model)
    if local > 0.75 * whole:  # gpt-oss, Qwen3-VL: transformers' plan shards the embedding only
        logger.warning("transformers' tensor-parallel plan for %s shards little: each of the "
                       "%d ranks holds %.0f%% of the model's parameters (%s)",
                       type(model).__name__, tp_size, 100 * local / whole,
                       ", ".join(sorted(set(plan.values()))))
    return model


def _untied_head(model: nn.Module) -> nn.Linear | None:
    """The output projection when transformers' plan splits it (`_tp_plan`: "lm_head":
    "colwise_gather_output") and it shares no weight with the input embedding; else None."""
    head = model.get_output_embeddings()
    style = (getattr(type(model), "_tp_plan", None) or {}).get("lm_head")
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return head if isinstance(head, nn.Linear) and style == "colwise_gather_output" and \
        not tied else None


def _fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts (`use_experts_implementation`: 3-D weights, layout flags)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "is_transposed") and \
        (isinstance(getattr(module, "down_proj", None), nn.Parameter) or
         hasattr(module, "vcr_mxfp4") or hasattr(module, "vcr_int4"))  # packed: no down_proj


def _shard_experts(module: nn.Module, name: str, tp_size: int, rank: int) -> None:
    """Experts the plan leaves whole (transformers shards them only by expert parallelism): each
    rank keeps its slice of every expert's intermediate dim, as vLLM's tensor-parallel MoE does,
    and the experts' output is all-reduced. A down-projection bias is split evenly so the sum
    adds it once. Left whole (with a warning) where that is not exact: a norm after each expert,
    or an intermediate dim the tp size does not divide."""
    if hasattr(module, "vcr_mxfp4") or hasattr(module, "vcr_int4"):  # packed experts
        shard = hf_quant.shard_mxfp4 if hasattr(module, "vcr_mxfp4") else \
            hf_int4_experts.shard
        shard(module, name, tp_size, rank)
        _apply(module, name, "moe_tp_experts", tp_size, rank)
        return
    up = "gate_up_proj" if module.has_gate else "up_proj"
    weight = getattr(module, up)
    inner = weight.shape[-1 if module.is_transposed else -2] // (2 if module.has_gate else 1)
    if module.has_post_expert_norm or inner % tp_size:
        logger.warning("%s: experts left whole on every rank (%s)", name,
                       "a norm follows each expert" if module.has_post_expert_norm else
                       f"intermediate size {inner} does not divide by tp_size={tp_size}")
        return
    packed = "packed_" if module.has_gate and module.is_concatenated else ""
    # Not transposed: [E, out, in] (colwise splits dim -2); transposed: [E, in, out].
    col, row = ("rowwise", "colwise") if module.is_transposed else ("colwise", "rowwise")
    _apply_param(module, f"{name}.{up}", up, packed + col, tp_size, rank)
    _apply_param(module, f"{name}.down_proj", "down_proj", row, tp_size, rank)
    if module.has_bias:  # [E, out]: split the output dim as its weight's
        bias = getattr(module, f"{up}_bias")
        setattr(module, f"{up}_bias", _split(bias, bias.dim() - 1, 2 if packed else 1, tp_size,
                                             rank))
        hf_shards.divide(module.down_proj_bias, tp_size)
    _apply(module, name, "moe_tp_experts", tp_size, rank)


def _decoder(model: nn.Module, plan: dict[re.Pattern, str]) -> nn.Module:
    """The text decoder the plan's names are relative to (a vision tower is not sharded)."""
    inner = getattr(model, "model", None)
    for candidate in (model.get_decoder(), inner, getattr(inner, "language_model", None),
                      getattr(model, "language_model", None)):
        if isinstance(candidate, nn.Module) and any(
                rx.match(n) for n, _ in candidate.named_modules() for rx in plan):
            return candidate
    raise UnsupportedModelError(f"transformers' {type(model).__name__}: its tensor-parallel plan "
                                "names no module of the model")


def _apply_param(owner: nn.Module, name: str, attr: str, style: str, tp_size: int,
                 rank: int) -> None:
    """A bare parameter's slice (`PARAM_STYLES`)."""
    if style not in PARAM_STYLES:
        raise UnsupportedModelError(f"{name} is a parameter planned {style}; on a parameter vcr "
                                    f"applies {', '.join(PARAM_STYLES)}")
    t = getattr(owner, attr)
    if t.dim() == 1 and style in ("rowwise", "packed_rowwise"):
        return  # a bias: added whole, after the all-reduce
    dim = t.dim() - (2 if style.endswith("colwise") and t.dim() > 1 else 1)
    halves = 2 if style.startswith("packed") else 1
    if t.shape[dim] % (tp_size * halves):
        raise UnsupportedModelError(f"{name} dim {dim} of size {t.shape[dim]} does not split "
                                    f"into {tp_size * halves} (planned {style}, tp_size={tp_size})")
    setattr(owner, attr, _split(t, dim, halves, tp_size, rank))
    part, half = t.shape[dim] // (tp_size * halves), t.shape[dim] // halves
    hf_quant.split_scale(owner, attr, name, dim, [h * half + rank * part for h in range(halves)],
                       part)


def _split(t: torch.Tensor, dim: int, halves: int, tp_size: int, rank: int) -> nn.Parameter:
    """Rank's part of dim `dim` of `t`; with halves=2, its part of each half, side by side."""
    part, half = t.shape[dim] // (tp_size * halves), t.shape[dim] // halves
    return _cut(t, dim, [h * half + rank * part for h in range(halves)], part)


def _apply(module: nn.Module, name: str, style: str, tp_size: int, rank: int,
           rows: tuple[int, int] | None = None) -> None:
    """Shard `module` as `style`; rows: (start, length) of a colwise split, instead of the
    rank's equal part (`_kv_rows`)."""
    if style == "moe_tp_experts":  # each rank ran its slice of every expert: sum them
        forward = module.forward
        module.forward = lambda *args, **kwargs: ops.all_reduce(forward(*args, **kwargs))
        return
    if style in PARAM_STYLES[2:]:
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) is planned {style}, "
                                    "which vcr applies to parameters only")
    if style == "embedding_rowwise":
        if not isinstance(module, nn.Embedding):
            raise UnsupportedModelError(f"{name} ({type(module).__name__}) is planned "
                                        "embedding_rowwise but is not an nn.Embedding")
        _vocab_rows(module, tp_size, rank)
        return
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) is planned {style} but is "
                                    "not an nn.Linear; vcr shards linear layers")
    cols = style.startswith("rowwise")
    full = module.in_features if cols else module.out_features
    if rows is None and full % tp_size:
        dim = "in_features" if cols else "out_features"
        raise UnsupportedModelError(f"{name}.{dim}={full} is not divisible by tp_size={tp_size} "
                                    f"(planned {style})")
    start, local = rows or (rank * (full // tp_size), full // tp_size)
    forward = module.forward  # the class's own (a subclass may scale or cast around F.linear)
    if hasattr(module, "shard_weight"):  # packed integer weights (`hf_int4`)
        module.shard_weight(name, 1 if cols else 0, start, local)
    else:
        module.weight = _cut(module.weight, 1 if cols else 0, [start], local)
        hf_quant.split_scale(module, "weight", name, 1 if cols else 0, [start], local)
    if cols:
        bias, module.bias = module.bias, None  # added once, after the all-reduce
        module.in_features = local
        if style == "rowwise_split_input":
            hf_shards.buffer(module, "tp_columns", torch.arange(start, start + local),
                             module.weight.device)
        module.forward = _rowwise(module, forward, bias)
    else:
        if module.bias is not None:
            module.bias = _cut(module.bias, 0, [start], local)
        module.out_features = local
        if style == "colwise_gather_output":
            module.forward = lambda x: ops.all_gather(forward(x), tp_size)


def _rowwise(module: nn.Linear, forward: Any, bias: torch.Tensor | None) -> Any:
    if bias is not None:
        module.register_parameter("tp_bias", hf_shards.keep(bias, bias.detach(), source="bias"))

    def rowwise(x: torch.Tensor) -> torch.Tensor:
        columns = module._buffers.get("tp_columns")
        y = ops.all_reduce(forward(x if columns is None else x.index_select(-1, columns)))
        return y if bias is None else y + module.tp_bias

    return rowwise


def _vocab_rows(module: nn.Embedding, tp_size: int, rank: int) -> None:
    """Rank's rows of the table: equal slices (the last padded with zero rows when the vocabulary
    does not divide), its [start, end) in a buffer; ids outside look up zeros, then all-reduce."""
    vocab = module.num_embeddings
    local = -(-vocab // tp_size)
    start = rank * local
    end = min(start + local, vocab)
    weight = module.weight
    rows = _cut(weight, 0, [start], max(end - start, 0))
    if rows.shape[0] < local:
        with torch.no_grad():
            padded = hf_shards.cut(rows.detach(), [("pad", 0, local, rows.shape[0])])
        rows = hf_shards.keep(rows, padded, ("pad", 0, local, rows.shape[0]))
    module.weight = rows
    if module.padding_idx is not None:  # only steers gradients; meaningless on a shard
        module.padding_idx = None
    module.num_embeddings = local
    hf_shards.buffer(module, "tp_range", torch.tensor([start, end]), weight.device)
    forward = module.forward

    module.forward = lambda input_ids: vocab_shard_lookup(input_ids, module.tp_range, forward)


def _cut(t: torch.Tensor, dim: int, starts: list[int], length: int) -> nn.Parameter:
    """A parameter of `length` entries of dim `dim` of `t` from each of `starts`, side by side
    (a copy), its recipe recorded (`hf_shards.keep`)."""
    step = ("slice", dim, starts, length, t.shape[dim])
    with torch.no_grad():
        return hf_shards.keep(t, hf_shards.cut(t.detach(), [step]).clone(), step)

