"""Load every artifact of a cache as a rank does, with torch's loader or ours, in this process.

    python benchmarks/bench_artifact_loader.py <cache_dir> memory   # artifact_format.load
    python benchmarks/bench_artifact_loader.py <cache_dir> file     # torch's CompiledArtifact.load

Run each in a fresh process (and TORCHINDUCTOR_CACHE_DIR: fresh for a new node, kept for a
restart). Fetches every compiled artifact of the cache first, then times their loads (autotune
results first, as the adaptor does) and counts kernel compiles and autotunes during them.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import vllm_compile_ray as vcr
from vllm_compile_ray.compiling.compiler_interface import unpack_tuned
from vllm_compile_ray.torch_private import artifact_format, inductor
from vllm_compile_ray.torch_private.inductor_metrics import kernel_work


def main() -> None:
    cache, loader = sys.argv[1], sys.argv[2]
    load = {"memory": artifact_format.load, "file": artifact_format._load_through_file}[loader]
    store = vcr.open_store(vcr.CacheConfig(cache_dir=cache))
    artifacts = [a for a in map(store.fetch, store.list_keys()) if "guard" in a.meta]
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context, before the clock
    start = time.perf_counter()
    with kernel_work() as work:
        for artifact in artifacts:
            standalone, tuning = unpack_tuned(artifact.payload)
            if tuning:
                inductor.load_tuning(tuning)
            load(standalone)
    print(json.dumps({"loader": loader, "artifacts": len(artifacts),
                      "bytes": sum(len(a.payload) for a in artifacts),
                      "load_s": round(time.perf_counter() - start, 3), **work}))


if __name__ == "__main__":
    main()
