"""The Qwen family: Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm per head) and Qwen3-MoE (q/k norm
and a sparse MoE block on the layers `decoder_sparse_step` / `mlp_only_layers` pick).

All three are the Llama decoder with features switched on by their config (`llama.py`); the
checkpoint names are Llama's, experts `mlp.experts.{e}.{gate,up,down}_proj`.
"""

from __future__ import annotations

from vllm_compile_ray.models.config import ArchInfo
from vllm_compile_ray.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    pass


_QWEN = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
         "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}

ARCHITECTURES: dict[str, tuple[ArchInfo, type[LlamaForCausalLM]]] = {
    "Qwen2ForCausalLM": (ArchInfo("Qwen2ForCausalLM", ("qwen2",),
                                  frozenset({"qkv_bias", "sliding_window"}), _QWEN,
                                  window_rule="max_window_layers"),
                         Qwen2ForCausalLM),
    "Qwen3ForCausalLM": (ArchInfo("Qwen3ForCausalLM", ("qwen3",),
                                  frozenset({"attention_bias", "qk_norm", "sliding_window"}),
                                  _QWEN, window_rule="max_window_layers"),
                         Qwen3ForCausalLM),
    # transformers' Qwen3-MoE slides every layer when use_sliding_window (no max_window_layers
    # rule) and vLLM's does not slide at all: refused rather than guessed.
    "Qwen3MoeForCausalLM": (ArchInfo("Qwen3MoeForCausalLM", ("qwen3_moe",),
                                     frozenset({"attention_bias", "qk_norm", "moe"}),
                                     {**_QWEN, "num_experts": 128, "num_experts_per_tok": 8,
                                      "moe_intermediate_size": 768, "norm_topk_prob": False,
                                      "decoder_sparse_step": 1, "mlp_only_layers": []}),
                            Qwen3MoeForCausalLM),
}
