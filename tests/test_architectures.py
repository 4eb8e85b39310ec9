"""Each architecture against transformers: a tiny random checkpoint saved by transformers
(safetensors), built by our registry from its config.json and loaded from its files, gives the
same logits (fp32). TP=2 ranks over gloo with sharded weights give the TP=1 logits. The public
config.json of big models plan on meta with their true parameter counts.

Pure unit tier: CPU, eager, no Ray, no compile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_compile_ray.errors import ConfigError, UnknownModelError, UnsupportedModelError
from vllm_compile_ray.models import build, get_config, load_weights, supported

DATA = Path(__file__).parent / "data" / "configs"
T = 11  # tokens; > the sliding windows below
_COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 101,
           "max_position_embeddings": 64, "tie_word_embeddings": False}
TINY: dict[str, dict] = {
    "LlamaForCausalLM": {**_COMMON, "attention_bias": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "MistralForCausalLM": {**_COMMON, "sliding_window": 4},
    "Qwen2ForCausalLM": {**_COMMON, "use_sliding_window": True, "sliding_window": 4,
                         "max_window_layers": 1, "tie_word_embeddings": True},
    "Qwen3ForCausalLM": {**_COMMON, "head_dim": 32},
    "MixtralForCausalLM": {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2},
    "Qwen3MoeForCausalLM": {**_COMMON, "head_dim": 16, "num_experts": 4,
                            "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                            "norm_topk_prob": False, "decoder_sparse_step": 2},
    "Gemma2ForCausalLM": {**_COMMON, "head_dim": 16, "query_pre_attn_scalar": 24,
                          "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                          "sliding_window": 4, "tie_word_embeddings": True},
}


def _save_hf(arch: str, path: Path, seed: int = 0) -> torch.nn.Module:
    """A transformers model of `arch` with every parameter random (biases and norms too),
    saved to `path` as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                  "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe",
                  "Gemma2ForCausalLM": "gemma2"}[arch]
    cfg = AutoConfig.for_model(model_type, **TINY[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                             dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(path)
    return model


def _ids(vocab: int = 101) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(1)), \
        torch.arange(T)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """arch -> (checkpoint dir, transformers' logits [T, V] for `_ids()`)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    ids, _ = _ids()
    for arch in TINY:
        hf = _save_hf(arch, root / arch)
        with torch.no_grad():
            out[arch] = root / arch, hf(ids[None]).logits[0]
    return out


def test_every_architecture_is_covered() -> None:
    assert sorted(TINY) == supported()


@pytest.mark.parametrize("arch", sorted(TINY))
def test_logits_match_transformers(arch: str, checkpoints) -> None:
    path, ref = checkpoints[arch]
    assert json.loads((path / "config.json").read_text())["architectures"] == [arch]
    model = build(path / "config.json", weights=path)
    assert type(model).__name__ == arch and model.config.torch_dtype == "float32"
    ids, pos = _ids()
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos))
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_state_dict_of_transformers_model_loads(checkpoints) -> None:
    """transformers 5 state dicts hold fused experts and Mixtral's `mlp` (not block_sparse_moe)."""
    from transformers import AutoModelForCausalLM

    path, ref = checkpoints["MixtralForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert any(k.endswith("experts.gate_up_proj") for k in hf.state_dict())
    model = build(path, weights=hf.state_dict())
    ids, pos = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(model(ids, pos)), ref, atol=1e-4,
                                   rtol=1e-4)


def test_load_errors(checkpoints, tmp_path) -> None:
    path, _ = checkpoints["LlamaForCausalLM"]
    from safetensors.torch import load_file

    sd = load_file(path / "model.safetensors")
    model = build(path, num_layers=1)  # a slice of the checkpoint's layers loads
    load_weights(model, sd)
    with pytest.raises(ConfigError, match="lacks.*o_proj"):
        load_weights(model, {k: v for k, v in sd.items() if "o_proj.weight" not in k})
    with pytest.raises(ConfigError, match="no parameter for: model.extra"):
        load_weights(model, {**sd, "model.extra.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="shape"):
        load_weights(model, {**sd, "model.norm.weight": torch.zeros(3)})
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_weights(model, tmp_path)


def test_sharded_checkpoint_with_index(checkpoints, tmp_path) -> None:
    """A checkpoint split over files with model.safetensors.index.json, as big models ship."""
    from safetensors.torch import load_file, save_file

    path, ref = checkpoints["MixtralForCausalLM"]
    sd = load_file(path / "model.safetensors")
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: sd[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    model = build(tmp_path, weights=tmp_path)
    ids, pos = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(model(ids, pos)), ref, atol=1e-4,
                                   rtol=1e-4)


# ---------------------------------------------------------------- tensor parallel over gloo

TP_ARCHS = ("Qwen2ForCausalLM", "Qwen3MoeForCausalLM")  # a dense (bias, tied) and a MoE


def _tp_worker(rank: int, world: int, store: str, paths: dict[str, str], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ids, pos = _ids()
        for arch, path in paths.items():
            model = build(path, tp_size=world, rank=rank, weights=path)
            with torch.no_grad():
                torch.save(model.compute_logits(model(ids, pos)),
                           os.path.join(out_dir, f"{arch}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp2_gloo_matches_tp1(checkpoints, tmp_path) -> None:
    paths = {a: str(checkpoints[a][0]) for a in TP_ARCHS}
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "store"), paths, str(tmp_path)), nprocs=2)
    ids, pos = _ids()
    for arch, path in paths.items():
        model = build(path, weights=path)
        with torch.no_grad():
            ref = model.compute_logits(model(ids, pos))
        for r in range(2):
            torch.testing.assert_close(torch.load(tmp_path / f"{arch}.{r}.pt"), ref, atol=1e-5,
                                       rtol=1e-4, msg=f"{arch} rank {r}")


# ---------------------------------------------------------------- public configs, on meta

# transformers' own meta builds of the same config.json count these (../shared/NOTES.md).
PUBLIC = {"llama-3-70b": ("LlamaForCausalLM", 70.55e9),
          "qwen2.5-72b": ("Qwen2ForCausalLM", 72.71e9),
          "mixtral-8x7b": ("MixtralForCausalLM", 46.70e9),
          "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", 30.53e9)}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_config_plans_on_meta_with_true_size(name: str) -> None:
    arch, params = PUBLIC[name]
    model = build(DATA / f"{name}.json", device="meta")
    assert type(model).__name__ == arch
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - params) / params < 0.005, total
    # at TP=8 each rank holds about an eighth (norms, router and kv heads replicate)
    rank = sum(p.numel() for p in build(DATA / f"{name}.json", 8, 7, device="meta").parameters())
    assert total / 8 <= rank < total / 8 * 1.05


def test_public_moe_configs_are_moe() -> None:
    mixtral = get_config(DATA / "mixtral-8x7b.json")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob,
            mixtral.expert_intermediate_size, mixtral.sliding_window) == (8, 2, True, 14336, 0)
    qwen = get_config(DATA / "qwen3-30b-a3b.json")
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.norm_topk_prob,
            qwen.expert_intermediate_size, qwen.qk_norm) == (128, 8, True, 768, True)
    assert all(qwen.is_moe_layer(i) for i in range(qwen.num_hidden_layers))
    assert get_config(DATA / "qwen2.5-72b.json").sliding_window == 0  # use_sliding_window false


# ---------------------------------------------------------------- intake and refusals


def _llama(**over) -> dict:
    return {**TINY["LlamaForCausalLM"], "architectures": ["LlamaForCausalLM"], **over}


@pytest.mark.parametrize("config,field", [
    (_llama(architectures=["FalconForCausalLM"]), "MixtralForCausalLM"),  # lists supported
    (_llama(num_local_experts=8, num_experts_per_tok=2), "num_local_experts"),
    (_llama(sliding_window=4096), "sliding_window"),
    (_llama(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (_llama(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (_llama(hidden_act="gelu"), "hidden_act"),
    (_llama(mlp_bias=True), "mlp_bias"),
    (_llama(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ({**TINY["MistralForCausalLM"], "architectures": ["MistralForCausalLM"],
      "attention_bias": True}, "attention_bias"),
    ({**TINY["Qwen3MoeForCausalLM"], "architectures": ["Qwen3MoeForCausalLM"],
      "use_sliding_window": True}, "sliding_window"),
])
def test_unsupported_config_is_refused(config: dict, field: str) -> None:
    with pytest.raises(UnsupportedModelError, match=field):
        build(config, device="meta")


def test_intake_by_path(checkpoints, tmp_path) -> None:
    path, _ = checkpoints["Qwen3ForCausalLM"]
    by_dir, by_file = get_config(path), get_config(str(path / "config.json"))
    assert by_dir == by_file and by_dir.architecture == "Qwen3ForCausalLM" and by_dir.qk_norm
    with pytest.raises(UnknownModelError, match="no such file or directory.*llama-tiny"):
        get_config(str(tmp_path / "nope" / "config.json"))
    with pytest.raises(UnknownModelError, match="without a config.json"):
        get_config(tmp_path)
    with pytest.raises(UnknownModelError, match="unknown model preset 'llama-9'"):
        get_config("llama-9")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        get_config(tmp_path / "bad.json")


# ---------------------------------------------------------------- the MoE op under dynamo


def test_moe_op_opcheck_and_one_graph() -> None:
    """vcr::moe has a schema and a fake impl, so a MoE model traces on meta into one graph with
    one opaque MoE node per sparse layer (the routing never reaches the graph)."""
    g = torch.Generator().manual_seed(0)
    x, logits = torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)
    gate_up, down = torch.randn(4, 12, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    torch.library.opcheck(torch.ops.vcr.moe.default, (x, logits, gate_up, down, 2, True),
                          test_utils=("test_schema", "test_faketensor"))
    cfg = {**TINY["Qwen3MoeForCausalLM"], "architectures": ["Qwen3MoeForCausalLM"],
           "num_hidden_layers": 4}  # decoder_sparse_step 2: layers 1 and 3 are MoE
    model = build(cfg, tp_size=2, rank=1, device="meta")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids, pos = torch.zeros(16, dtype=torch.long, device="meta"), torch.arange(16, device="meta")
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(pos, 0)
    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(ids, pos)
    [gm] = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vcr.moe) == 2
    assert targets.count(torch.ops.vcr.attention) == 4
