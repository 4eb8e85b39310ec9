"""Compile llama-tiny through the cache in a fresh process and report what happened as JSON.

usage: run_model.py CONFIG_JSON OUT_JSON [SIZES]   (SIZES: comma-separated num_tokens to run)
"""

import json
import sys

import torch
from torch._dynamo.utils import counters as dynamo_counters

import vllm_compile_ray as vcr


def main() -> None:
    config = vcr.CompilationConfig.from_json(sys.argv[1])
    sizes = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "1,3,4,9").split(",")]
    model = vcr.models.build("llama-tiny", num_layers=4, seed=0)
    compiled = vcr.compile(model, config, model_name="llama-tiny")
    diffs = {}
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=generator)
        positions = torch.arange(n)
        with torch.no_grad():
            expected = model(ids, positions)
        diffs[n] = (compiled(ids, positions) - expected).abs().max().item()
    json.dump({
        "counter": compiled.counter.to_dict(),
        "max_abs_diff": diffs,
        "keys": compiled.plan.keys,
        "summary": compiled.plan.summary(),
        "inductor_counters": dict(dynamo_counters["inductor"]),
    }, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
