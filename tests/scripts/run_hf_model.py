"""Compile (or load) tiny transformers models through vcr.compile and report, as JSON: the
counter, the keys and the max abs diff against transformers' own output at each size.

    python run_hf_model.py CONFIG_JSON OUT_JSON ARCH[,ARCH...] SIZES

ARCH "<arch>_fp8": that architecture's FP8 block-quantized checkpoint, from its config.json
(`planning/hf_quant.py`); the reference is the same quantized model run eagerly.
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hf_models  # noqa: E402

import vllm_compile_ray as vcr  # noqa: E402


def build(arch: str) -> torch.nn.Module:
    if not arch.endswith("_fp8"):
        return hf_models.build(arch, num_hidden_layers=2)
    from vllm_compile_ray.planning import hf, intake

    name = arch.removesuffix("_fp8")
    ckpt = hf_models.save_config(
        name, tempfile.mkdtemp(), {"qwen3_moe": "Qwen3MoeForCausalLM"}[name], num_hidden_layers=2, quantization_config={
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [16, 16]})
    return hf.prepare(intake.build(ckpt, device="cpu").module)


def main() -> None:
    config = vcr.CompilationConfig.from_json(sys.argv[1])
    archs, sizes = sys.argv[3].split(","), [int(s) for s in sys.argv[4].split(",")]
    result = {}
    for arch in archs:
        reference, model = build(arch), build(arch)
        compiled = vcr.compile(model, config, model_name=f"hf-{arch}")
        diffs = {}
        for n in sizes:
            ids = hf_models.tokens(n, seed=n)
            with torch.no_grad():
                want = reference(input_ids=ids).logits
            diffs[n] = (compiled(input_ids=ids).logits - want).abs().max().item()
        result[arch] = {"counter": dataclasses.asdict(compiled.counter),
                        "keys": sorted(compiled.plan.keys), "max_abs_diff": diffs,
                        "pieces": len(compiled.plan.pieces),
                        "unique": len({p.code_id for p in compiled.plan.pieces})}
    Path(sys.argv[2]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
