"""Gemma2: the Llama decoder with embeddings scaled by sqrt(H), (1 + w) RMSNorms, a norm after
attention and around the MLP ("sandwich"), gelu-tanh MLP, attention scale
query_pre_attn_scalar ** -0.5, attention and final logit softcapping, sliding windows on every
other layer, tied embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vllm_compile_ray.models.config import ArchInfo, ModelConfig, TPShapes
from vllm_compile_ray.models.layers import RMSNorm, RotaryEmbedding, input_norm
from vllm_compile_ray.models.llama import (LlamaAttention, LlamaForCausalLM, LlamaModel,
                                           make_mlp)


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPShapes, tp_size: int, rank: int, layer: int,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, dtype, offset=1.0)
        self.self_attn = LlamaAttention(cfg, tp, tp_size, rank, layer, rotary_emb, dtype)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, dtype, offset=1.0)
        self.mlp = make_mlp(cfg, tp, tp_size, rank, layer, dtype)
        self.post_feedforward_layernorm = RMSNorm(h, eps, dtype, offset=1.0)

    def forward(self, positions: Tensor, x: Tensor, residual: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        x, residual = input_norm(self.input_layernorm, x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2Model(LlamaModel):
    layer_class = Gemma2DecoderLayer
    norm_offset = 1.0

    def __init__(self, cfg: ModelConfig, tp_size: int, rank: int, dtype: torch.dtype):
        super().__init__(cfg, tp_size, rank, dtype)
        # transformers multiplies by sqrt(H) rounded to the activation dtype
        self.normalizer = torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype,
                                       device="cpu").item()

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids) * self.normalizer  # [T, H]


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_class = Gemma2Model


ARCHITECTURES: dict[str, tuple[ArchInfo, type[LlamaForCausalLM]]] = {
    "Gemma2ForCausalLM": (ArchInfo(
        "Gemma2ForCausalLM", ("gemma2",), frozenset({"attention_bias", "sliding_window", "gemma2"}),
        {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192,
         "head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
         "final_logit_softcapping": 30.0, "sliding_window": 4096, "tie_word_embeddings": True,
         "hidden_activation": "gelu_pytorch_tanh"},
        activation_key="hidden_activation", activations=("gelu_pytorch_tanh",),
        window_rule="alternate"),
        Gemma2ForCausalLM),
}
