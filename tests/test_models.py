"""Model zoo: presets, shapes per TP rank, numerics, custom ops and what dynamo captures.

Pure unit tier: no Ray, no Inductor (dynamo runs with a capture backend).
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_compile_ray.errors import ConfigError, UnknownModelError, UnsupportedModelError
from vllm_compile_ray.models import ALL_REDUCE_OP, ATTENTION_OP, PRESETS, TPShapes, build, get_config
from vllm_compile_ray.models import ops

TINY = PRESETS["llama-tiny"]
QWEN2_TINY = {**TINY, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}  # qkv bias


def _ids(t: int, vocab: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (t,), generator=g), torch.arange(t)


def _capture(model, *inputs, dynamic_dim: bool = True) -> torch.fx.GraphModule:
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    if dynamic_dim:
        for x in inputs:
            torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(*inputs)
    assert len(graphs) == 1, "expected one graph, no graph breaks"
    return graphs[0]


def _count(gm: torch.fx.GraphModule, packet) -> int:
    # dynamo records the packet (prints `vcr.attention`); an aot graph would hold `.default`.
    return sum(n.op == "call_function" and n.target in (packet, packet.default)
               for n in gm.graph.nodes)


# ---------------------------------------------------------------- shapes on meta, per preset / tp


@pytest.mark.parametrize("tp_size", [1, 2, 8])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_on_meta(name: str, tp_size: int) -> None:
    cfg = get_config(name)
    if cfg.num_attention_heads % tp_size:  # llama-tiny (4 heads), qwen2.5-7b (28 heads) at tp 8
        with pytest.raises(ConfigError, match="num_attention_heads"):
            build(name, tp_size=tp_size, device="meta")
        return
    rank = tp_size - 1
    model = build(name, tp_size=tp_size, rank=rank, device="meta", num_layers=2)
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert not any(p.requires_grad for p in model.parameters())
    assert (model.tp_size, model.rank, model.config.num_hidden_layers) == (tp_size, rank, 2)
    assert len(model.model.layers) == 2
    d, hs = cfg.head_dim, cfg.hidden_size
    hq, hkv = cfg.num_attention_heads // tp_size, max(1, cfg.num_key_value_heads // tp_size)
    inter, vshard = cfg.intermediate_size // tp_size, math.ceil(cfg.vocab_size / tp_size)
    layer = model.model.layers[1]
    assert layer.self_attn.qkv_proj.weight.shape == ((hq + 2 * hkv) * d, hs)
    assert (layer.self_attn.qkv_proj.bias is not None) == cfg.attention_bias
    assert layer.self_attn.o_proj.weight.shape == (hs, hq * d)
    assert layer.mlp.gate_up_proj.weight.shape == (2 * inter, hs)
    assert layer.mlp.down_proj.weight.shape == (hs, inter)
    assert model.model.embed_tokens.weight.shape == (vshard, hs)
    assert model.lm_head.weight.shape == (vshard, hs)
    assert (model.lm_head is model.model.embed_tokens) == cfg.tie_word_embeddings
    assert model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape == (
        cfg.max_position_embeddings, d)
    dtype = torch.float32 if name == "llama-tiny" else torch.bfloat16
    assert model.model.norm.weight.dtype == dtype


def test_public_shape_numbers() -> None:
    tp = TPShapes.of(get_config("llama-3-8b"), 8, rank=5)
    assert (tp.num_heads, tp.num_kv_heads, tp.kv_head_start, tp.intermediate_size,
            tp.vocab_shard) == (4, 1, 5, 1792, 16032)
    qwen = get_config("qwen2.5-7b")
    assert (qwen.head_dim, qwen.attention_bias, qwen.model_type) == (128, True, "qwen2")
    tp = TPShapes.of(qwen, 4, rank=3)  # 4 kv heads over 4 ranks, 7 q heads each
    assert (tp.num_heads, tp.num_kv_heads, tp.kv_head_start) == (7, 1, 3)
    assert get_config("llama-3.2-1b").rope_scaling is not None


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_llama_3_70b_on_meta_is_cheap() -> None:
    rss0 = _rss_mb()
    model = build("llama-3-70b", device="meta")
    grown = _rss_mb() - rss0
    assert len(model.model.layers) == 80
    assert sum(p.numel() for p in model.parameters()) > 70e9  # 70.6e9 counted, none allocated
    assert grown < 200, f"meta build grew RSS by {grown:.0f} MB"


# ---------------------------------------------------------------- numerics on CPU


@pytest.mark.parametrize("t", [1, 7])
def test_tiny_forward_finite(t: int) -> None:
    model = build("llama-tiny")
    ids, pos = _ids(t)
    with torch.no_grad():
        h = model(ids, pos)
        logits = model.compute_logits(h)
    assert h.shape == (t, 64) and h.dtype == torch.float32
    assert logits.shape == (t, 512)
    assert torch.isfinite(h).all() and torch.isfinite(logits).all()


def test_weights_deterministic_from_seed() -> None:
    ids, pos = _ids(5)
    a, b, c = build("llama-tiny"), build("llama-tiny"), build("llama-tiny", seed=1)
    assert torch.equal(a(ids, pos), b(ids, pos))
    assert not torch.allclose(a(ids, pos), c(ids, pos))


def test_causal_prefix_consistency() -> None:
    """Causal attention on flat tokens: the first k outputs do not depend on later tokens."""
    model = build("llama-tiny", num_layers=2)
    ids, pos = _ids(7)
    full = model(ids, pos)
    torch.testing.assert_close(model(ids[:3], pos[:3]), full[:3])


def test_qwen_bias_and_tied_rope_scaled_variants_run() -> None:
    model = build(QWEN2_TINY)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    tied = {**TINY, "tie_word_embeddings": True, "head_dim": 32,
            "rope_scaling": dict(PRESETS["llama-3.2-1b"]["rope_scaling"],
                                 original_max_position_embeddings=64)}
    tied_model = build(tied)
    assert tied_model.lm_head is tied_model.model.embed_tokens
    cache = tied_model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
    ref = build({**TINY, "head_dim": 32}).model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert cache.shape == ref.shape == (256, 32) and not torch.allclose(cache, ref)
    ids, pos = _ids(4)
    for m in (model, tied_model):
        assert torch.isfinite(m.compute_logits(m(ids, pos))).all()


# ---------------------------------------------------------------- custom ops


def _naive_attention(q, k, v, hq, hkv, d, scale):
    t = q.shape[0]
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    out = torch.empty(t, hq, d)
    mask = torch.ones(t, t).tril().bool()
    for h in range(hq):
        kv = h // (hq // hkv)
        s = (q[:, h] @ k[:, kv].T) * scale
        out[:, h] = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, kv]
    return out.reshape(t, hq * d)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_attention_op_matches_naive(hq: int, hkv: int) -> None:
    g = torch.Generator().manual_seed(0)
    t, d, scale = 9, 8, 0.3
    q, k, v = (torch.randn(t, h * d, generator=g) for h in (hq, hkv, hkv))
    out = torch.ops.vcr.attention(q, k, v, hq, hkv, d, scale)
    torch.testing.assert_close(out, _naive_attention(q, k, v, hq, hkv, d, scale))
    meta = torch.ops.vcr.attention(q.to("meta"), k.to("meta"), v.to("meta"), hq, hkv, d, scale)
    assert meta.device.type == "meta" and meta.shape == (t, hq * d)


def test_attention_op_takes_heads_first_views() -> None:
    """transformers' layout, [B, H, T, D] views of a fused qkv projection as hf passes them."""
    g = torch.Generator().manual_seed(0)
    t, d, hq, hkv = 7, 8, 4, 2
    q, k, v = torch.randn(1, t, (hq + 2 * hkv) * d, generator=g).split(
        [hq * d, hkv * d, hkv * d], dim=-1)
    heads = lambda x, h: x.view(1, t, h, d).transpose(1, 2)  # noqa: E731
    args = (heads(q, hq), heads(k, hkv), heads(v, hkv), hq, hkv, d, 0.3)
    out = torch.ops.vcr.attention(*args, heads_first=True)
    torch.testing.assert_close(out, torch.ops.vcr.attention(q, k, v, hq, hkv, d, 0.3))
    torch.library.opcheck(torch.ops.vcr.attention.default, args, {"heads_first": True},
                          test_utils=("test_schema", "test_faketensor"))

def test_attention_op_opcheck() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(5, 32, generator=g), torch.randn(5, 16, generator=g), torch.randn(
        5, 16, generator=g)
    torch.library.opcheck(torch.ops.vcr.attention.default, (q, k, v, 4, 2, 8, 0.35),
                          test_utils=("test_schema", "test_faketensor"))


def test_all_reduce_is_a_copy_without_process_group() -> None:
    assert not dist.is_initialized()
    x = torch.randn(3, 4)
    y = torch.ops.vcr.all_reduce(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def test_op_names_and_idempotent_registration() -> None:
    assert (ATTENTION_OP, ALL_REDUCE_OP) == ("vcr::attention", "vcr::all_reduce")
    importlib.reload(ops)  # must not try to register the ops again
    assert ops.attention is torch.ops.vcr.attention


# ---------------------------------------------------------------- dynamo capture


def test_dynamo_capture_tiny_cpu() -> None:
    model = build("llama-tiny")
    ids, pos = _ids(7)
    gm = _capture(model, ids, pos)
    assert _count(gm, torch.ops.vcr.attention) == 4
    assert _count(gm, torch.ops.vcr.all_reduce) == 0  # tp 1: no collectives
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in placeholders)
    # parameters are lifted as inputs; the rope cache shared by all layers is lifted once
    assert sum("rotary_emb_buffers_cos_sin_cache" in n.name for n in placeholders) == 1
    assert "device(" not in gm.code and "'cpu'" not in gm.code
    (out,) = gm(*[_real(model, n, ids, pos) for n in placeholders])  # dynamo returns a tuple
    torch.testing.assert_close(out, model(ids, pos))


def _real(model, node, ids, pos):
    """The eager value for a captured placeholder (for running the graph directly)."""
    ev = node.meta["example_value"]
    if isinstance(ev, torch.SymInt):
        return ids.shape[0]
    if node.name == "l_input_ids_":
        return ids
    if node.name == "l_positions_":
        return pos
    named = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    key = node.name.removeprefix("l_self_").rstrip("_")
    for part in ("modules_", "parameters_", "buffers_"):
        key = key.replace(part, "")
    matches = [t for n, t in named.items() if n.replace(".", "_") == key]
    assert len(matches) == 1, node.name
    return matches[0]


def test_dynamo_capture_tp2_on_meta() -> None:
    model = build("llama-3-8b", tp_size=2, rank=1, device="meta", num_layers=3)
    ids, pos = torch.zeros(16, dtype=torch.long, device="meta"), torch.arange(16, device="meta")
    gm = _capture(model, ids, pos)
    assert _count(gm, torch.ops.vcr.attention) == 3
    assert _count(gm, torch.ops.vcr.all_reduce) == 1 + 2 * 3  # embedding, o_proj, down per layer


# ---------------------------------------------------------------- tensor parallel


def test_tp_rank_partials_sum_to_tp1() -> None:
    """Without a process group the all_reduce op is the identity, so each rank's row-parallel
    module returns its partial sum: the sum over ranks must equal the tp=1 module."""
    cfg = QWEN2_TINY  # q/k/v biases shard with their heads; o_proj has none
    full = build(cfg)
    ranks = [build(cfg, tp_size=2, rank=r) for r in range(2)]
    ids, pos = _ids(6)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    for attr, call in [
        ("embed", lambda m: m.model.embed_tokens(ids)),
        ("attn", lambda m: m.model.layers[2].self_attn(pos, x)),
        ("mlp", lambda m: m.model.layers[2].mlp(x)),
    ]:
        torch.testing.assert_close(sum(call(m) for m in ranks), call(full), msg=attr)
    lm = torch.cat([m.lm_head.weight for m in ranks])
    torch.testing.assert_close(lm, full.lm_head.weight)
    # kv heads replicate when tp > num_kv_heads: 4 ranks of 2 kv heads, ranks 0,1 share head 0
    qkv = [build(cfg, tp_size=4, rank=r, num_layers=1).model.layers[0].self_attn.qkv_proj
           for r in range(4)]
    k = [p.weight[16:32] for p in qkv]
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and not torch.equal(k[1], k[2])


def _tp_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world)
    try:
        model = build({**TINY, "vocab_size": 509}, tp_size=world, rank=rank)  # ragged vocab
        ids, pos = _ids(5, vocab=509)
        with torch.no_grad():
            h = model(ids, pos)
            torch.save({"h": h, "logits": model.compute_logits(h)},
                       os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp2_gloo_matches_tp1(tmp_path) -> None:
    """Two real ranks all-reducing over gloo reproduce the tp=1 model."""
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ref = build({**TINY, "vocab_size": 509})
    ids, pos = _ids(5, vocab=509)
    with torch.no_grad():
        h = ref(ids, pos)
        logits = ref.compute_logits(h)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(got["h"], h, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=1e-4)


def test_compute_logits_tp_without_process_group_raises() -> None:
    model = build("llama-tiny", tp_size=2, rank=0, num_layers=1)
    with pytest.raises(RuntimeError, match="process group"):
        model.compute_logits(torch.zeros(1, 64))


# ---------------------------------------------------------------- errors and config parsing


def test_unknown_preset() -> None:
    with pytest.raises(UnknownModelError, match="llama-3-8b") as e:
        build("llama-9")
    assert isinstance(e.value, KeyError) and "llama-9" in str(e.value)


@pytest.mark.parametrize("kwargs,field", [
    ({"tp_size": 0}, "tp_size"),
    ({"tp_size": 3}, "num_attention_heads"),
    ({"tp_size": 2, "rank": 2}, "rank"),
    ({"rank": -1}, "rank"),
    ({"num_layers": 0}, "num_layers"),
])
def test_bad_build_arguments(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        build("llama-tiny", device="meta", **kwargs)


@pytest.mark.parametrize("override,field", [
    ({"hidden_size": -64}, "hidden_size"),
    ({"num_attention_heads": 3}, "hidden_size"),  # 64 not divisible by 3, no head_dim
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"intermediate_size": 128.0}, "intermediate_size"),
    ({"torch_dtype": "float8"}, "torch_dtype"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"head_dim": 15}, "head_dim"),
    ({"model_type": "qwen2"}, "model_type"),  # contradicts architectures
])
def test_bad_config_values(override, field) -> None:
    with pytest.raises(ConfigError, match=field):
        get_config({**TINY, **override})


@pytest.mark.parametrize("override,field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
])
def test_unsupported_config_values(override, field) -> None:
    with pytest.raises(UnsupportedModelError, match=field):
        get_config({**TINY, **override})


def test_config_from_real_style_dict() -> None:
    d = {**PRESETS["llama-3-8b"], "bos_token_id": 128000, "hidden_act": "silu",
         "mlp_bias": False, "transformers_version": "4.40.0"}
    d.pop("torch_dtype")
    d["dtype"] = "bfloat16"
    cfg = get_config(d)
    assert cfg.head_dim == 128 and cfg.dtype == torch.bfloat16 and not cfg.attention_bias
    assert get_config(cfg) is cfg
    assert get_config("llama-3.2-1b").rope_scaling.factor == 32.0
    with pytest.raises(ConfigError, match="vocab_size"):
        get_config({k: v for k, v in TINY.items() if k != "vocab_size"})
