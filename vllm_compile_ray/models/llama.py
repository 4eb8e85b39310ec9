"""The vLLM-shaped Llama decoder on flat tokens, tensor-parallel by shape; Mistral is the same
code with sliding windows, and the Qwen and Mixtral families reuse it (`qwen.py`, `mixtral.py`).

`forward(input_ids[T], positions[T]) -> hidden[T, H]`; the lm_head runs separately in
`compute_logits`, as in vLLM, so the compiled graph is the decoder only. Attention, the
tensor-parallel all-reduce and the MoE experts are custom ops (`ops.py`, `moe.py`): the splitter
cuts at attention, and the layers between share one compiled piece.

Each rank holds its shard of every parallel weight (`layers.Part`); weights come from a
checkpoint (`checkpoint.load_weights`) or from a seed (`init.init_weights`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_compile_ray.models import ops
from vllm_compile_ray.models.config import ArchInfo, ModelConfig, TPShapes
from vllm_compile_ray.models.layers import (ACTIVATIONS, ColumnParallelLinear, Part, RMSNorm,
                                            RotaryEmbedding, RowParallelLinear,
                                            VocabParallelEmbedding, input_norm)
from vllm_compile_ray.models.moe import SparseMoeBlock


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPShapes, tp_size: int, rank: int, layer: int,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = tp.num_heads, tp.num_kv_heads, d
        self.q_size, self.kv_size = tp.num_heads * d, tp.num_kv_heads * d
        self.scale = (cfg.query_pre_attn_scalar or d) ** -0.5
        self.sliding_window, self.softcap = cfg.window(layer), float(cfg.attn_logit_softcapping)
        q = Part(cfg.num_attention_heads * d, rank * self.q_size, self.q_size)
        kv = Part(cfg.num_key_value_heads * d, tp.kv_head_start * d, self.kv_size)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [q, kv, kv], cfg.attention_bias,
                                             dtype)
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, cfg.o_proj_bias, tp_size, dtype)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's D before rope
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary_emb

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        qkv = self.qkv_proj(x)  # [T, (hq + 2 hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        q, k = self.rotary_emb(positions, q, k)
        args = (q, k, v, self.num_heads, self.num_kv_heads, self.head_dim, self.scale)
        if self.sliding_window or self.softcap:
            args += (self.sliding_window, self.softcap)
        return self.o_proj(ops.attention(*args))  # [T, H]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPShapes, tp_size: int, rank: int,
                 dtype: torch.dtype):
        super().__init__()
        part = Part(cfg.intermediate_size, rank * tp.intermediate_size, tp.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [part, part], False, dtype)
        self.down_proj = RowParallelLinear(part, cfg.hidden_size, False, tp_size, dtype)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I/tp] each
        return self.down_proj(self.act(gate) * up)


def make_mlp(cfg: ModelConfig, tp: TPShapes, tp_size: int, rank: int, layer: int,
             dtype: torch.dtype) -> nn.Module:
    """The dense MLP, or the sparse MoE block on a MoE layer."""
    if not cfg.is_moe_layer(layer):
        return LlamaMLP(cfg, tp, tp_size, rank, dtype)
    inter = tp.expert_intermediate_size
    part = Part(cfg.expert_intermediate_size, rank * inter, inter)
    return SparseMoeBlock(cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                          cfg.hidden_size, part, tp_size, dtype)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPShapes, tp_size: int, rank: int, layer: int,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, tp, tp_size, rank, layer, rotary_emb, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = make_mlp(cfg, tp, tp_size, rank, layer, dtype)

    def forward(self, positions: Tensor, x: Tensor, residual: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        x, residual = input_norm(self.input_layernorm, x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    layer_class: type[nn.Module] = LlamaDecoderLayer
    norm_offset = 0.0

    def __init__(self, cfg: ModelConfig, tp_size: int, rank: int, dtype: torch.dtype):
        super().__init__()
        tp = TPShapes.of(cfg, tp_size, rank)
        self.vocab_part = Part(cfg.vocab_size, rank * tp.vocab_shard, tp.vocab_shard)
        self.embed_tokens = VocabParallelEmbedding(self.vocab_part, cfg.hidden_size, tp_size,
                                                   dtype)
        # One rope cache shared by all layers (vLLM's get_rope caches it the same way).
        rotary_emb = RotaryEmbedding(cfg, dtype)
        self.layers = nn.ModuleList(
            self.layer_class(cfg, tp, tp_size, rank, i, rotary_emb, dtype)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, self.norm_offset)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)  # [T, H]

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed(input_ids)  # [T, H]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """The decoder plus a vocab-parallel lm_head used only by `compute_logits`.

    Checkpoint names are transformers' (`checkpoint.py` maps q/k/v, gate/up and experts onto the
    merged parameters); `checkpoint_renames` are a family's extra (regex, replacement) pairs."""

    model_class: type[nn.Module] = LlamaModel
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: ModelConfig, tp_size: int = 1, rank: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or config.dtype
        self.config, self.tp_size, self.rank = config, tp_size, rank
        self.model = self.model_class(config, tp_size, rank, dtype)
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = VocabParallelEmbedding(self.model.vocab_part, config.hidden_size,
                                                  tp_size, dtype)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """input_ids, positions: [T] int64 -> hidden_states [T, H]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        """[T, H] -> [T, vocab]. With tp_size > 1, gathers the rank shards over the default
        process group, which must then be initialized with world size tp_size."""
        logits = F.linear(hidden_states, self.lm_head.weight)  # [T, vocab_shard]
        if self.tp_size > 1:
            if not (dist.is_initialized() and dist.get_world_size() == self.tp_size):
                raise RuntimeError(f"compute_logits with tp_size={self.tp_size} needs an "
                                   f"initialized process group of world size {self.tp_size}")
            shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(shards, logits.contiguous())
            logits = torch.cat(shards, dim=-1)
        logits = logits[:, : self.config.vocab_size]
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window on every layer (config `sliding_window`)."""


_LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}

ARCHITECTURES: dict[str, tuple[ArchInfo, type[LlamaForCausalLM]]] = {
    "LlamaForCausalLM": (ArchInfo("LlamaForCausalLM", ("llama",),
                                  frozenset({"attention_bias"}), _LLAMA_DEFAULTS),
                         LlamaForCausalLM),
    "MistralForCausalLM": (ArchInfo("MistralForCausalLM", ("mistral",),
                                    frozenset({"sliding_window"}),
                                    {"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                                     "sliding_window": 4096,
                                     "max_position_embeddings": 4096 * 32}),
                           MistralForCausalLM),
}
