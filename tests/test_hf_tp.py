"""transformers' models at tp_size > 1 (`planning/hf_tp.py`): real ranks over gloo against the
whole model, the user's warm and two ranks loading what it published, and the refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vllm_compile_ray as vcr
from vllm_compile_ray.errors import UnsupportedModelError
from vllm_compile_ray.planning import hf, hf_tp, intake

import hf_models

pytest.importorskip("transformers")

# Together they use every style vcr applies: olmo2 colwise_gather_output and rowwise_split_input
# (q/k norms over all heads), gpt_neox embedding_rowwise, qwen2_moe colwise/rowwise around
# replicated experts and a sharded shared expert, Llama 4 its experts' bare parameters (packed
# gate/up halves) with their output all-reduced. transformers' plans leave fused experts whole
# (Qwen2-MoE, DeepSeek-V3, gpt-oss): vcr splits every expert's intermediate dim.
ARCHS = {"olmo2": ("olmo2", "Olmo2ForCausalLM", {}),
         "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", {"vocab_size": 127}),  # rows split 64+63
         "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", {}),
         "llama4_text": ("llama4_text", "Llama4ForCausalLM", {}),
         "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM", {}),  # MLA: mla_kv_a_proj
         "gpt_oss": ("gpt_oss", "GptOssForCausalLM", {})}  # experts: interleaved, transposed, biased


def _checkpoints(root: Path) -> dict[str, str]:
    hf_models.MORE.setdefault("olmo2", ("olmo2", {}))
    hf_models.MORE.setdefault("gpt_neox", ("gpt_neox", {}))
    hf_models.MORE.setdefault("qwen2_moe", ("qwen2_moe", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64}))
    hf_models.MORE.setdefault("llama4_text", ("llama4_text", {"num_local_experts": 4,
                                                              "head_dim": 16}))
    return {name: hf_models.save_config(name, root / name, arch, **over)
            for name, (_, arch, over) in ARCHS.items()}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _shard_rank(rank: int, world: int, ckpts: dict[str, str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    try:
        got = {}
        for name, ckpt in ckpts.items():
            model = intake.build(ckpt, tp_size=world, rank=rank, device="cpu").module
            hf.prepare(model)
            got[name] = (_logits(model, hf_models.tokens(7)),
                         {n: tuple(p.shape) for n, p in model.named_parameters()})
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_sharded_by_transformers_plan_compute_the_whole_model(tmp_path: Path) -> None:
    """Two real ranks, each its shard (every style vcr applies), all-reducing and gathering
    over gloo, give the whole model's logits; their parameters are shards, not copies."""
    ckpts = _checkpoints(tmp_path)
    mp.spawn(_shard_rank, args=(2, ckpts, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, ckpt in ckpts.items():
        whole = intake.build(ckpt, device="cpu").module
        hf.prepare(whole)
        reference = _logits(whole, hf_models.tokens(7))
        shapes = {n: tuple(p.shape) for n, p in whole.named_parameters()}
        for r in range(2):
            got, sharded = ranks[r][name]
            torch.testing.assert_close(got, reference, atol=2e-6, rtol=1e-5)
            halved = [n for n in sharded if sharded[n] != shapes.get(n)]
            assert halved, name
        assert ranks[0][name][1] == ranks[1][name][1]  # equal shapes on every rank: one key
        if not whole.config.get_text_config().tie_word_embeddings:  # vocab rows, gathered
            vocab = shapes["lm_head.weight"][0]  # 127 does not split: whole
            kept = vocab // 2 if vocab % 2 == 0 else vocab
            assert ranks[0][name][1]["lm_head.weight"][0] == kept, name
            embed = next(n for n in shapes if n.endswith(("embed_tokens.weight", "embed_in.weight")))
            assert ranks[0][name][1][embed][0] == -(-shapes[embed][0] // 2), name  # vocab rows
        experts = [n for n in shapes if n.endswith("experts.down_proj")]
        assert all(ranks[0][name][1][n] != shapes[n] for n in experts), name


def test_plans_and_heads_vcr_cannot_split_are_refused(tmp_path: Path) -> None:
    sequence = hf_models.config("gemma3_text")
    sequence.base_model_tp_plan = {**sequence.base_model_tp_plan,
                                   "layers.*.input_layernorm": "sequence_parallel"}
    with pytest.raises(UnsupportedModelError, match=r"\['sequence_parallel'\] \(layers\.\*\.input_"
                                                    r"layernorm: sequence_parallel\); vcr applies"):
        hf_tp.check(sequence, 2)
    gemma3 = hf_models.save_config("gemma3_text", tmp_path / "g3", "Gemma3ForCausalLM")
    with pytest.raises(UnsupportedModelError,
                       match=r"num_attention_heads=4 is not divisible by tp_size=3"):
        intake.build(gemma3, tp_size=3, rank=0)
    gemma = hf_models.config("gemma3_text")
    gemma.base_model_tp_plan = {}
    with pytest.raises(UnsupportedModelError, match="no tensor-parallel plan"):
        hf_tp.check(gemma, 2)


def _load_rank(rank: int, world: int, ckpt: str, cfg_json: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/pg-load", rank=rank,
                            world_size=world)
    try:
        model = intake.build(ckpt, tp_size=world, rank=rank, device="cpu").module
        compiled = vcr.load(model, vcr.CompilationConfig.from_json(cfg_json), rank=rank,
                            world_size=world, model_name=ckpt)
        torch.save({"report": compiled.report.to_dict(),
                    "logits": _logits(compiled, hf_models.tokens(6))},
                   os.path.join(out, f"load{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_warm_at_tp2_then_two_ranks_restore_and_compile_nothing(ray_local, tmp_path,
                                                                capsys) -> None:
    """The user's path for a checkpoint vcr has no model of: `warm(ckpt, tp_size=2)`, then each
    rank of a real TP group restores the traced model, loads every piece (one key set for
    both) and computes the whole model's logits."""
    from test_warm import SLOT, eager, warm

    ckpt = _checkpoints(tmp_path)["olmo2"]
    config = eager(str(tmp_path / "cache")).replace(compile_sizes=(1, 6))
    lines: list[str] = []
    summary = warm(ckpt, config, tp_size=2, progress=lines.append, **SLOT)
    assert summary.ok and summary.compiled == 9
    assert "traced model for the ranks: published" in lines
    mp.spawn(_load_rank, args=(2, ckpt, config.replace(on_miss="error").to_json(),
                               str(tmp_path)), nprocs=2)
    reports = [torch.load(tmp_path / f"load{r}.pt") for r in range(2)]
    whole = intake.build(ckpt, device="cpu").module
    hf.prepare(whole)
    reference = _logits(whole, hf_models.tokens(6))
    for got in reports:
        report = got["report"]
        assert report["dynamo"] == "restored", report
        assert (report["compiles"], report["misses"], report["hits"]) == (0, 0, 9)
        torch.testing.assert_close(got["logits"], reference, atol=2e-6, rtol=1e-5)
    assert reports[0]["report"]["keys_id"] == reports[1]["report"]["keys_id"]
    # `vcr load --tp 2 --rank 0` is such a rank too (a group of no peers): it restores as well.
    from vllm_compile_ray.cli import commands

    code = commands.main(["load", "--model", ckpt, "--tp", "2", "--rank", "0", "--device", "cpu",
                          "--backend", "eager", "--sizes", "1,6", "--cache",
                          str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0 and "on_miss='error', dynamo restored)" in out, out


def _kv_rank(rank: int, world: int, ckpt: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/pg-kv", rank=rank,
                            world_size=world)
    try:
        model = intake.build(ckpt, tp_size=world, rank=rank, device="cpu").module
        hf.prepare(model)
        k = model.model.layers[0].self_attn.k_proj.weight
        torch.save((_logits(model, hf_models.tokens(7)), k), os.path.join(out, f"kv{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fewer_kv_heads_than_ranks_each_rank_keeps_one_whole_head(tmp_path: Path) -> None:
    """2 KV heads at tp 4 (Qwen3-Next, GLM-4, StarCoder2 at tp 8): ranks 0-1 keep KV head 0,
    ranks 2-3 head 1, each its own query heads; the logits are the whole model's."""
    ckpt = hf_models.save_config("gemma3_text", tmp_path / "g3", "Gemma3ForCausalLM")
    mp.spawn(_kv_rank, args=(4, ckpt, str(tmp_path)), nprocs=4)
    whole = intake.build(ckpt, device="cpu").module
    hf.prepare(whole)
    reference = _logits(whole, hf_models.tokens(7))
    k = whole.model.layers[0].self_attn.k_proj.weight  # [2 heads x 16, 64]
    for r in range(4):
        got, k_rank = torch.load(tmp_path / f"kv{r}.pt")
        torch.testing.assert_close(got, reference, atol=2e-6, rtol=1e-5)
        assert torch.equal(k_rank, k[16 * (r // 2):16 * (r // 2 + 1)])
