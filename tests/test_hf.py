"""Models users bring: transformers models from tiny configs through vcr attention, plan,
compile (eager adaptor; real Inductor in test_hf_inductor.py), calling conventions, intake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vllm_compile_ray as vcr
from vllm_compile_ray.errors import ConfigError, UnsupportedModelError
from vllm_compile_ray.planning import hf
from vllm_compile_ray.runtime.api import plan_model

import hf_models

pytest.importorskip("transformers")

EAGER = dict(backend="eager")
WINDOWED = ("mistral", "gemma2", "gpt_oss")
FINGERPRINT = {"device_type": "cpu", "note": "test"}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(hf_models.ARCHS))
def test_vcr_attention_matches_transformers_eager_attention(arch: str) -> None:
    ids = hf_models.tokens(12)
    want = logits(hf_models.build(arch, attn="eager"), ids)
    model = hf.prepare(hf_models.build(arch))
    assert model.config._attn_implementation == "vcr"
    assert (logits(model, ids) - want).abs().max().item() <= 1e-5
    if arch in WINDOWED:  # the window takes effect: without it the output differs
        unwindowed = logits(hf_models.build(arch, attn="eager", sliding_window=64), ids)
        assert (unwindowed - want).abs().max().item() > 1e-3


def test_values_with_their_own_head_dim_mla(tmp_path: Path) -> None:
    """DeepSeek's MLA: value heads of 8 dims, query/key heads of 16 (DeepSeek-V3: 128 vs 192).
    The op's output takes the values' head dim; compiled logits equal transformers' eager."""
    ids = hf_models.tokens(9)
    mla = dict(v_head_dim=8, num_key_value_heads=4)  # MLA: a key head per query head
    want = logits(hf_models.build("deepseek_v3", attn="eager", **mla), ids)
    model = hf_models.build("deepseek_v3", **mla)
    config = vcr.CompilationConfig(compile_sizes=[9], **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, config)
    assert (compiled(input_ids=ids).logits - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", sorted(hf_models.ARCHS))
def test_transformers_model_splits_shares_layers_and_matches(arch: str, tmp_path: Path) -> None:
    reference = hf_models.build(arch)  # transformers' default attention (sdpa)
    model = hf_models.build(arch)
    config = vcr.CompilationConfig(compile_sizes=[4], **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, config)
    for n in (4, 12, 7):  # the static size, then the dynamic artifact: one trace
        ids = hf_models.tokens(n, seed=n)
        assert (compiled(input_ids=ids).logits - logits(reference, ids)).abs().max() <= 1e-5
    plan = compiled.plan
    unique = len({p.code_id for p in plan.pieces})
    assert len(plan.pieces) == 5 and unique == 3  # 4 layers: first, 3 identical middles, last
    assert compiled.counter.num_graphs_seen == 1
    assert compiled.counter.num_backend_compilations == unique * 2


# Not the MoE models: transformers' experts code takes another branch on CPU than on other
# devices (histc over float on CPU only), so a CPU target plans on CPU (a CUDA target on meta):
# `test_a_cpu_warm_plans_the_experts_code_its_ranks_run`.
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_keys_do_not_depend_on_the_trace_device(arch: str) -> None:
    config = vcr.CompilationConfig(compile_sizes=[4], **EAGER)
    on_meta = plan_model(hf_models.build(arch, device="meta"), config, device_type="cpu",
                         fingerprint=FINGERPRINT)
    on_cpu = plan_model(hf_models.build(arch), config, device_type="cpu",
                        fingerprint=FINGERPRINT)
    assert on_meta.keys == on_cpu.keys


def test_one_sequence_past_a_learned_position_table_is_a_clear_error() -> None:
    """A transformers model is called as one sequence [1, n]: n past GPT-2's learned position
    table (256 rows) is refused naming it; a rotary model (llama, 256 positions) takes it."""
    config = vcr.CompilationConfig(compile_sizes=[4, 512], **EAGER)
    with pytest.raises(ConfigError, match=r"compile size 512 is longer than GPT2LMHeadModel's "
                       r"256 positions .*`transformer\.wpe` has 256 rows.*Allowed: compile "
                       r"sizes up to 256"):
        plan_model(hf_models.build("gpt2", device="meta"), config, device_type="cpu",
                   fingerprint=FINGERPRINT)
    plan = plan_model(hf_models.build("llama", device="meta"), config, device_type="cpu",
                      fingerprint=FINGERPRINT)
    assert 512 in plan.shapes


def test_padding_masks_and_bidirectional_attention_are_refused() -> None:
    model = hf.prepare(hf_models.build("llama"))
    ids = hf_models.tokens(6)
    with pytest.raises(UnsupportedModelError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    compiled = vcr.compile(model, vcr.CompilationConfig(**EAGER, disable_compile_cache=True))
    with pytest.raises(UnsupportedModelError, match="attention_mask"):
        compiled(input_ids=ids, attention_mask=torch.ones_like(ids))

    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=64)).eval()
    hf.prepare(bert)
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        bert(input_ids=ids % 64)
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                             d_kv=16, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        hf.prepare(t5)


def test_a_model_whose_code_fixes_the_token_count_is_a_clear_error(tmp_path: Path) -> None:
    """transformers' Jamba scans over the tokens on CPU: dynamo cannot keep the token count
    dynamic, and vcr says so instead of dynamo's ConstraintViolationError traceback."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("jamba", **hf_models._COMMON, num_experts=4,
                                  attn_layer_period=2, attn_layer_offset=1,
                                  expert_layer_period=2, expert_layer_offset=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    config = vcr.CompilationConfig(compile_sizes=[1, 2], **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    with pytest.raises(UnsupportedModelError, match=r"the model's code fixes the token count "
                       r"while dynamo traces it \(L\['kwargs'\]\['input_ids'\]\.size\(\)\[1\]"):
        plan_model(model, config, device_type="cpu", fingerprint=FINGERPRINT)


def test_alibi_position_biases_are_refused() -> None:
    """Falcon with alibi=True adds its position biases to the mask, which vcr attention does not
    build: a clear refusal (it was dynamo's "Observed exception" on `causal_mask.dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("falcon", **hf_models._COMMON, alibi=True,
                                  new_decoder_architecture=False)
    with pytest.raises(UnsupportedModelError, match=r"FalconForCausalLM uses ALiBi position "
                       r"biases \(alibi=True\).*cannot apply them"):
        hf.prepare(AutoModelForCausalLM.from_config(config))


def test_a_layer_that_keeps_its_window_only_in_the_mask_gets_the_configs() -> None:
    """transformers' PhiMoE and Qwen2-MoE window their layers in the mask and pass no window to
    the attention function: vcr attention, which builds no mask, takes the config's (PhiMoE with
    a window of 4 differed from transformers by 0.46 at 12 tokens before)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = hf_models.tokens(12)
    want = logits(hf_models.build("gemma2", attn="eager"), ids)
    model = hf.prepare(hf_models.build("gemma2"))
    assert model.config.layer_types[0] == "sliding_attention"
    model.model.layers[0].self_attn.sliding_window = None  # the window only in the mask
    assert (logits(model, ids) - want).abs().max() <= 1e-5

    def phimoe(window: int | None):
        config = AutoConfig.for_model("phimoe", **hf_models._COMMON, num_local_experts=4,
                                      sliding_window=window)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    want = logits(phimoe(4), ids)
    assert (logits(phimoe(None), ids) - want).abs().max() > 1e-3  # the window matters here
    assert (logits(hf.prepare(phimoe(4)), ids) - want).abs().max() <= 1e-5


class SdpaBlock(torch.nn.Module):
    """Attention through F.scaled_dot_product_attention, a KV-cache-like static argument."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        x = table[input_ids]  # [T, 16] from a [64, 16] table that is not per token
        q, k, v = self.proj(x).unsqueeze(0).chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]
        x = torch.relu(self.out(x))
        q, k, v = self.proj(x).unsqueeze(0).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True)[0])


def test_split_at_an_aten_op_with_keyword_and_static_arguments(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, table = SdpaBlock().eval(), torch.randn(64, 16)
    config = vcr.CompilationConfig(splitting_ops=("aten::scaled_dot_product_attention",),
                                   compile_sizes=[8], **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, config)
    for n in (8, 5):
        ids = torch.randint(0, 64, (n,))
        with torch.no_grad():
            want = model(ids, table)
        assert torch.allclose(compiled(input_ids=ids, table=table), want, atol=1e-6)
    assert len(compiled.plan.items) == 5  # 3 pieces around 2 attention calls
    table_spec = compiled.plan.pieces[0].piece.input_specs
    assert any(s.kind == "tensor" and s.shape == (64, 16) for s in table_spec)  # left static


def test_a_splitting_op_the_graph_never_calls_is_an_error(tmp_path: Path) -> None:
    config = vcr.CompilationConfig(splitting_ops=("aten::scaled_dot_product_attention",), **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    model = vcr.models.build("llama-tiny", num_layers=2)
    with pytest.raises(ConfigError, match=r"match no op.*vcr::attention"):
        plan_model(model, config, device_type="cpu", fingerprint=FINGERPRINT)


def test_dynamic_dims_by_argument_name(tmp_path: Path) -> None:
    model = hf_models.build("qwen2")
    config = vcr.CompilationConfig(dynamic_dims={"input_ids": 1}, compile_sizes=[4], **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, config)
    for n in (4, 9):
        compiled(input_ids=hf_models.tokens(n))
    assert compiled.counter.num_graphs_seen == 1
    with pytest.raises(ConfigError, match="dynamic_dims"):
        vcr.CompilationConfig(dynamic_dims={"input_ids": "seq"})
    bad = vcr.compile(model, config.replace(dynamic_dims={"tokens": 0}))
    with pytest.raises(ConfigError, match=r"names \['tokens'\]"):
        bad(input_ids=hf_models.tokens(4))


def test_backend_eager_alone_is_a_valid_config() -> None:
    assert vcr.CompilationConfig(backend="eager").use_inductor is False
    with pytest.raises(ConfigError, match="contradicts"):
        vcr.CompilationConfig(backend="eager", use_inductor=True)


def test_a_cpu_warm_plans_the_experts_code_its_ranks_run(tmp_path: Path, monkeypatch) -> None:
    """The warm's plan of a transformers MoE model for a CPU target has the keys a CPU rank
    computes (on meta the experts trace another op, and every MoE piece would miss)."""
    from vllm_compile_ray.orchestration.warm_plan import draft_plan

    (tmp_path / "moe_models.py").write_text(
        "import hf_models\n\ndef build(device='meta'):\n"
        "    return hf_models.build('qwen3_moe', device=device)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = vcr.CompilationConfig(compile_sizes=[4], **EAGER)
    planned = draft_plan("moe_models:build", config, 1, None, "cpu", FINGERPRINT)
    rank = plan_model(hf_models.build("qwen3_moe"), config, device_type="cpu",
                      fingerprint=FINGERPRINT)
    assert planned.keys == rank.keys


def test_a_deepseek_rank_loads_only_pieces_the_warm_planned(tmp_path: Path, monkeypatch) -> None:
    """DeepSeek-V3 through transformers, sizes from 1: a rank traces at the size the warm plans
    at (at 1 token dynamo specialized its experts: `arange(2)` for `arange(2 * tokens)`), and
    its warm-up at 1 token, outside that graph's guards (`2 <= tokens`, from `copy_`), traces a
    second graph keyed for size 1 alone: the warm plans both, as the rank does. Its outputs
    match transformers' at every size."""
    from vllm_compile_ray.orchestration.warm_plan import draft_plan
    from vllm_compile_ray.runtime.load import load

    (tmp_path / "ds_models.py").write_text(
        "import hf_models\n\ndef build(device='meta'):\n"
        "    return hf_models.build('deepseek_v3', device=device)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = vcr.CompilationConfig(compile_sizes=[1, 2], **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path / "cache")))
    reference = hf_models.build("deepseek_v3")
    compiled = load(hf_models.build("deepseek_v3"), config, model_name="ds_models:build")
    planned = draft_plan("ds_models:build", config, 1, None, "cpu", None)
    assert planned.graphs == len(compiled.backend.plans) == 2
    rank_keys = {k for plan in compiled.backend.plans for k in plan.keys}
    assert set(planned.rekeyed(compiled.backend.key_context).keys) == rank_keys
    assert set(compiled.backend.plans[1].shapes) == {1}
    report = compiled.report
    assert (report.graphs, report.tasks) == (2, len(rank_keys)) and report.tasks == 14
    assert "1 more graph(s) traced+published for warm-up sizes outside its guards" in \
        report.table()
    for n in (1, 2, 5):
        ids = hf_models.tokens(n, seed=n)
        assert (compiled(input_ids=ids).logits - logits(reference, ids)).abs().max() <= 1e-5
    assert compiled.counter.num_graphs_seen == 2
    # The next rank restores both functions: the size-1 one too, no dynamo trace at its warm-up
    again = load(hf_models.build("deepseek_v3"), config, model_name="ds_models:build")
    assert "dynamo restored, 1 more graph(s) restored for warm-up" in again.report.table()
    assert again.report.keys_id == report.keys_id and set(again.later) == {1}
    for n in (1, 5):
        ids = hf_models.tokens(n, seed=n)
        assert (again(input_ids=ids).logits - logits(reference, ids)).abs().max() <= 1e-5
    assert again.counter.num_graphs_seen == 2


def test_chunked_attention_layers_attend_within_their_chunk(tmp_path: Path) -> None:
    """Llama 4's chunked layers attend within fixed chunks of positions: past the first chunk
    the outputs equal transformers' (computed as plain causal attention they differed by 0.45
    at 8 tokens, chunks of 4)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(chunk: int):
        config = AutoConfig.for_model("llama4_text", **hf_models._COMMON, num_local_experts=4,
                                      head_dim=16, attention_chunk_size=chunk)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    reference, model = build(4), build(4)
    assert "chunked_attention" in reference.config.layer_types
    compiled = vcr.compile(model, vcr.CompilationConfig(
        compile_sizes=[8], **EAGER, cache=vcr.CacheConfig(cache_dir=str(tmp_path))))
    for n in (8, 12, 3):
        ids = hf_models.tokens(n, seed=n)
        assert (compiled(input_ids=ids).logits - logits(reference, ids)).abs().max() <= 1e-5
    ids = hf_models.tokens(12)  # the chunks matter at 12 tokens: one chunk differs
    assert (logits(build(16), ids) - logits(reference, ids)).abs().max() > 1e-3


def test_a_config_json_transformers_code_refuses_is_a_clear_error(tmp_path) -> None:
    """A config.json that transformers' model code fails on (dots1 without n_shared_experts)
    or that its config class refuses: vcr's error names the architecture, transformers' error
    and where, not a traceback."""
    from vllm_compile_ray.planning import intake

    from transformers import AutoConfig

    d = AutoConfig.for_model("dots1", **hf_models._COMMON).to_dict()  # n_shared_experts: None
    (tmp_path / "dots1").mkdir()
    (tmp_path / "dots1" / "config.json").write_text(json.dumps(
        {**d, "architectures": ["Dots1ForCausalLM"]}, default=str))
    with pytest.raises(ConfigError, match=r"transformers \S+ could not build its Dots1 model "
                       r"from this config.json: TypeError: .*\(at modeling_dots1\.py:\d+\); a "
                       r"field that architecture needs is missing or invalid"):
        intake.build(str(tmp_path / "dots1"), device="cpu")
    ckpt = Path(hf_models.save_config("deepseek_v3", tmp_path / "ds", "DeepseekV3ForCausalLM"))
    d = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**d, "n_shared_experts": None}))
    with pytest.raises(ConfigError, match=r"transformers could not read this config.json as "
                       r"model_type='deepseek_v3': .*n_shared_experts"):
        intake.build(str(ckpt), device="cpu")


def test_num_layers_of_hybrid_models_follows_their_layer_types(tmp_path: Path) -> None:
    """--num-layers on hybrid configs whose layer types are derived, read-only properties
    (Jamba, Mamba) or a list (Qwen3-Next: attention every 4th layer): the model gets that many
    layers of the types the full model has there, and runs as transformers' model does."""
    from vllm_compile_ray.planning import intake

    hf_models.MORE.setdefault("jamba", ("jamba", {"num_experts": 2, "attn_layer_period": 2,
                                                  "attn_layer_offset": 1, "expert_layer_period": 2,
                                                  "mamba_d_state": 4, "mamba_dt_rank": 8}))
    hf_models.MORE.setdefault("mamba", ("mamba", {}))
    hf_models.MORE.setdefault("qwen3_next", ("qwen3_next", {"head_dim": 16, "num_experts": 2,
                                                            "num_experts_per_tok": 1}))
    for name, arch, n, kinds in (("jamba", "JambaForCausalLM", 3, None),
                                 ("mamba", "MambaForCausalLM", 2, None),
                                 ("qwen3_next", "Qwen3NextForCausalLM", 4,
                                  ["linear_attention"] * 3 + ["full_attention"])):
        ckpt = hf_models.save_config(name, tmp_path / name, arch)
        whole = intake.build(ckpt, device="meta").module.config
        model = intake.build(ckpt, device="cpu", num_layers=n).module
        assert model.config.num_hidden_layers == n, name
        assert list(model.config.layer_types) == list(whole.layer_types[:n]), name
        assert kinds is None or list(model.config.layer_types) == kinds
        compiled = vcr.compile(model, vcr.CompilationConfig(
            compile_sizes=[4], **EAGER, cache=vcr.CacheConfig(cache_dir=str(tmp_path / "c"))))
        ids = hf_models.tokens(5)
        torch.testing.assert_close(compiled(input_ids=ids).logits, logits(model, ids))
    assert len(compiled.plan.pieces) == 2  # Qwen3-Next: split at its one attention layer


def test_a_config_json_of_an_architecture_vcr_lacks_builds_transformers_model(tmp_path) -> None:
    """Gemma3 and Phi3 checkpoints (no vcr implementation) plan and run as transformers' model,
    with transformers' outputs, its weights, and a rank's slices of them at tp_size=2; where
    that cannot stand in, vcr's error says why."""
    from vllm_compile_ray.planning import intake

    for name, arch in (("gemma3_text", "Gemma3ForCausalLM"), ("phi3", "Phi3ForCausalLM")):
        ckpt = hf_models.save_config(name, tmp_path / name, arch)
        built = intake.build(ckpt, device="cpu", num_layers=3)
        assert type(built.module).__name__ == arch and built.module.config.num_hidden_layers == 3
        reference = intake.build(ckpt, device="cpu", num_layers=3).module  # same seed
        config = vcr.CompilationConfig(compile_sizes=[4], **EAGER,
                                       cache=vcr.CacheConfig(cache_dir=str(tmp_path / "c")))
        compiled = vcr.compile(built.module, config)
        for n in (4, 9):
            ids = hf_models.tokens(n, seed=n)
            assert (compiled(input_ids=ids).logits - logits(reference, ids)).abs().max() <= 1e-5
        assert len(compiled.plan.pieces) == 4  # split at its 3 attentions
    saved = hf_models.build("phi3", num_hidden_layers=2)  # a checkpoint with its weights,
    with torch.no_grad():  # not the ones a seed gives
        for p in saved.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    saved.save_pretrained(tmp_path / "phi3-ckpt")
    loaded = intake.build(str(tmp_path / "phi3-ckpt"), device="cpu",
                          weights=str(tmp_path / "phi3-ckpt")).module
    ids = hf_models.tokens(5)
    torch.testing.assert_close(logits(loaded, ids), logits(saved, ids), rtol=0, atol=0)
    unloaded = intake.build(str(tmp_path / "phi3-ckpt"), device="cpu").module
    assert (logits(unloaded, ids) - logits(saved, ids)).abs().max() > 1e-3
    rank1 = intake.build(str(tmp_path / "phi3-ckpt"), device="cpu", tp_size=2, rank=1,
                         weights=str(tmp_path / "phi3-ckpt")).module  # its slices of them
    whole, part = dict(saved.named_parameters()), dict(rank1.named_parameters())
    qkv, o = (f"model.layers.1.self_attn.{n}_proj.weight" for n in ("qkv", "o"))
    assert torch.equal(part[qkv], whole[qkv][64:]) and torch.equal(part[o], whole[o][:, 32:])
    # Read by name, a rank its slices (`hf_shards`), also where transformers renames (here a
    # checkpoint without the "model." prefix); one with a tensor the model lacks loads whole
    # through from_pretrained, as transformers loads it.
    from safetensors.torch import load_file, save_file

    from vllm_compile_ray.planning import hf_shards

    files = tmp_path / "phi3-ckpt" / "model.safetensors"
    skeleton = hf_models.build("phi3", device="meta", num_hidden_layers=2)
    assert hf_shards.readable(skeleton, str(tmp_path / "phi3-ckpt"))
    tensors = load_file(files)
    norm = "model.norm.weight"
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, files,
              metadata={"format": "pt"})
    assert hf_shards.readable(skeleton, str(tmp_path / "phi3-ckpt"))
    unprefixed = intake.build(str(tmp_path / "phi3-ckpt"), device="cpu", tp_size=2, rank=1,
                              weights=str(tmp_path / "phi3-ckpt")).module
    assert torch.equal(dict(unprefixed.named_parameters())[o], whole[o][:, 32:])
    save_file({**tensors, "model.extra_head.weight": torch.ones(2)}, files,
              metadata={"format": "pt"})
    assert not hf_shards.readable(skeleton, str(tmp_path / "phi3-ckpt"))
    converted = intake.build(str(tmp_path / "phi3-ckpt"), device="cpu", tp_size=2, rank=1,
                             weights=str(tmp_path / "phi3-ckpt")).module
    assert torch.equal(dict(converted.named_parameters())[norm], tensors[norm])
    assert torch.equal(dict(converted.named_parameters())[o], whole[o][:, 32:])
    quantized = hf_models.save_config("phi3", tmp_path / "q", "Phi3ForCausalLM",
                                      quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(UnsupportedModelError, match=r"quantization_config quant_method="
                                                    r"'bitsandbytes' is not supported \(supported: "
                                                    r"quant_method"):
        intake.build(quantized)


def test_an_image_text_to_text_checkpoint_serves_its_language_model(tmp_path: Path) -> None:
    """Mistral 3 and LLaVA config.jsons (no causal-LM auto class: transformers builds them as
    image-text-to-text) build, split at their language model's attention and give its logits
    on text; at tp_size=2 a rank keeps its shard of the language model only."""
    from vllm_compile_ray.planning import intake

    for model_type, arch in (("mistral3", "Mistral3ForConditionalGeneration"),
                             ("llava", "LlavaForConditionalGeneration")):
        ckpt = hf_models.save_vlm_config(model_type, tmp_path / model_type, arch)
        built = intake.build(ckpt, device="cpu").module
        assert type(built).__name__ == arch
        reference = intake.build(ckpt, device="cpu").module
        config = vcr.CompilationConfig(compile_sizes=[4], **EAGER,
                                       cache=vcr.CacheConfig(cache_dir=str(tmp_path / "c")))
        compiled = vcr.compile(built, config)
        ids = hf_models.tokens(6)
        torch.testing.assert_close(compiled(input_ids=ids).logits, logits(reference, ids))
        assert len(compiled.plan.pieces) == 5  # 4 layers of its language model
        rank = dict(intake.build(ckpt, device="meta", tp_size=2, rank=1).module.named_parameters())
        whole = dict(reference.named_parameters())
        vision = [n for n in whole if "vision" in n]
        assert vision and all(rank[n].shape == whole[n].shape for n in vision)
        q = "model.language_model.layers.0.self_attn.q_proj.weight"
        assert rank[q].shape[0] * 2 == whole[q].shape[0]


def _saved(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """`model` with values no seed gives, saved by transformers (in the checkpoint's names)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.rand_like(b))
    model.save_pretrained(directory)
    return model


def test_checkpoints_in_names_transformers_renames_are_read_by_slices(tmp_path: Path) -> None:
    """Checkpoints whose tensor names transformers renames at load: image-text-to-text ones
    (`language_model.model.`), MiniMax-M2's experts (`block_sparse_moe.experts.N.w1/w2/w3`),
    and routers' stored score corrections (a buffer): a rank reads its slices by transformers'
    own renames, equal to from_pretrained's model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from vllm_compile_ray.planning import hf_shards, intake

    hf_models.MORE.setdefault("minimax_m2", ("minimax_m2", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16}))
    dirs = {t: hf_models.save_vlm_config(t, tmp_path / t, arch) for t, arch in (
        ("gemma3", "Gemma3ForConditionalGeneration"),
        ("mistral3", "Mistral3ForConditionalGeneration"))}
    dirs |= {n: hf_models.save_config(n, tmp_path / n, arch) for n, arch in (
        ("minimax_m2", "MiniMaxM2ForCausalLM"), ("deepseek_v3", "DeepseekV3ForCausalLM"))}
    ids = hf_models.tokens(6)
    for name, d in dirs.items():
        saved = _saved(intake.build(d, device="cpu").module, Path(d))
        stored = set(safe_open(f"{d}/model.safetensors", "pt").keys())
        assert not stored <= {n for n, _ in saved.state_dict().items()}  # renamed at load
        assert hf_shards.readable(intake.build(d, device="meta").module, d), name
        loaded = intake.build(d, device="cpu", weights=d).module
        torch.testing.assert_close(logits(loaded, ids), logits(saved, ids), rtol=0, atol=0)
        whole = saved.state_dict()
        rank = intake.build(d, device="cpu", tp_size=2, rank=1, weights=d).module.state_dict()
        for n, t in rank.items():
            if t.shape == whole[n].shape:
                assert torch.equal(t, whole[n]), (name, n)
    # --num-layers drops the language model's later layers, not the vision tower's
    d = dirs["mistral3"]
    config = json.loads(Path(d, "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    Path(d, "config.json").write_text(json.dumps(config))
    saved = _saved(intake.build(d, device="cpu").module, Path(d))
    assert hf_shards.readable(intake.build(d, device="meta", num_layers=2).module, d)
    two = dict(intake.build(d, device="cpu", num_layers=2, weights=d).module.named_parameters())
    whole = dict(saved.named_parameters())
    assert any("vision_tower" in n and ".2." in n for n in two)
    assert all(torch.equal(t, whole[n]) for n, t in two.items())
    assert any("block_sparse_moe.experts.3.w3" in k
               for k in safe_open(f"{dirs['minimax_m2']}/model.safetensors", "pt").keys())
    gate_up = "model.layers.1.mlp.experts.gate_up_proj"  # [experts, gate + up rows, hidden]
    whole = dict(AutoModelForCausalLM.from_pretrained(dirs["minimax_m2"]).named_parameters())
    rank1 = dict(intake.build(dirs["minimax_m2"], device="cpu", tp_size=2, rank=1,
                              weights=dirs["minimax_m2"]).module.named_parameters())
    half = whole[gate_up].shape[1] // 4
    assert torch.equal(rank1[gate_up], torch.cat([whole[gate_up][:, half:2 * half],
                                                  whole[gate_up][:, 3 * half:]], 1))


def test_planning_on_cpu_keeps_tied_weights_tied() -> None:
    from vllm_compile_ray.planning import intake

    model = hf_models.build("gemma2", device="meta")  # ties lm_head to the embedding
    intake._empty_on(model, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(b.device.type == "cpu" for b in model.buffers())


ENTRY_POINT = textwrap.dedent('''
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(device="meta", num_layers=None):
        cfg = AutoConfig.for_model("mistral", hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=num_layers or 3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, sliding_window=4)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(cfg)

    def not_a_model():
        return 3
''')


def test_entry_point_intake_from_the_cli(tmp_path: Path) -> None:
    (tmp_path / "usermodels.py").write_text(ENTRY_POINT)

    def vcr_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vllm_compile_ray", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    done = vcr_cli("plan", "--model", "usermodels:build", "--num-layers", "4", "--device", "cpu",
                   "--sizes", "4", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["summary"]
    assert summary["pieces"] == 5 and summary["unique_pieces"] == 3
    assert summary["tasks"] == 6  # 3 unique pieces x (dynamic, 4)
    bad = vcr_cli("plan", "--model", "usermodels:not_a_model", "--device", "cpu")
    assert bad.returncode != 0 and "must return an nn.Module" in bad.stderr
    missing = vcr_cli("plan", "--model", "nosuchmodule:build", "--device", "cpu")
    assert missing.returncode != 0 and "cannot import module 'nosuchmodule'" in missing.stderr


def test_a_hugging_face_hub_id_is_a_model_spec(tmp_path: Path) -> None:
    """`--model org/name` (as `vllm serve` takes it): config.json from the Hub cache, weights
    (`--weights org/name`) from its safetensors; offline with nothing cached, a clear error.
    A real Hub cache layout, read by huggingface_hub in offline mode."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-phi3"
    saved = hf_models.build("phi3", num_hidden_layers=2)
    saved.config.architectures = ["Phi3ForCausalLM"]
    saved.save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    ids = hf_models.tokens(5)
    expected = logits(saved, ids)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = textwrap.dedent(f"""
        import torch
        from vllm_compile_ray.planning import intake
        model = intake.build("acme/tiny-phi3", device="cpu", weights="acme/tiny-phi3").module
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits, {str(tmp_path / "out.pt")!r})
    """)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)
    plan = subprocess.run([sys.executable, "-m", "vllm_compile_ray", "plan", "--model",
                           "acme/tiny-phi3", "--device", "cpu", "--sizes", "1"], env=env,
                          cwd=tmp_path, capture_output=True, text=True)
    assert plan.returncode == 0 and "Phi3ForCausalLM (acme/tiny-phi3), 2 layers" in plan.stdout
    missing = subprocess.run([sys.executable, "-m", "vllm_compile_ray", "plan", "--model",
                              "acme/absent", "--device", "cpu"], env=env, cwd=tmp_path,
                             capture_output=True, text=True)
    assert missing.returncode != 0
    assert ("'acme/absent' is no preset or local path, so it was taken as a Hugging Face Hub id"
            in missing.stderr and "HF_HUB_OFFLINE is set" in missing.stderr), missing.stderr


def test_model_code_failing_under_the_trace_is_one_clear_error() -> None:
    """DeepSeek-V3 with `num_experts_per_tok` unset (transformers' config accepts it, its code
    calls topk(k=None)): one ConfigError naming the error and the model's line, not dynamo's
    traceback."""
    model = hf_models.build("deepseek_v3", num_experts_per_tok=None)
    config = vcr.CompilationConfig(compile_sizes=[4], **EAGER)
    with pytest.raises(ConfigError, match=r"the model's code failed while dynamo traced it: "
                                          r"TypeError: topk\(\).*\(at modeling_deepseek_v3\.py:\d+\)"):
        plan_model(model, config, device_type="cpu", fingerprint=FINGERPRINT)
