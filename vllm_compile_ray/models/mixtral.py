"""Mixtral: the Mistral decoder with a sparse MoE block (softmax router, top-k renormalized,
`num_local_experts` experts) in every layer. Checkpoints name the block `block_sparse_moe` and the
experts' projections w1 (gate), w3 (up), w2 (down)."""

from __future__ import annotations

from vllm_compile_ray.models.config import ArchInfo
from vllm_compile_ray.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    checkpoint_renames = ((r"\.block_sparse_moe\.", ".mlp."),)
    expert_names = ("w1", "w3", "w2")


ARCHITECTURES: dict[str, tuple[ArchInfo, type[LlamaForCausalLM]]] = {
    "MixtralForCausalLM": (ArchInfo("MixtralForCausalLM", ("mixtral",),
                                    frozenset({"moe", "sliding_window"}),
                                    {"rms_norm_eps": 1e-5, "rope_theta": 1e6,
                                     "max_position_embeddings": 4096 * 32,
                                     "num_local_experts": 8, "num_experts_per_tok": 2,
                                     "norm_topk_prob": True}),
                           MixtralForCausalLM),
}
