"""What the Triton bundles inside a cache's artifacts hold: per artifact, its kernel groups
(Triton cache dirs), files and bytes by extension, and how many groups name a kernel its wrapper
launches. Run on the GPU host after a warm:  python benchmarks/device/bundle_stats.py <cache_dir>"""
import collections
import os
import re
import sys

import vllm_compile_ray as vcr
from vllm_compile_ray.compiling.compiler_interface import unpack_tuned
from vllm_compile_ray.torch_private import artifact_format

store = vcr.open_store(vcr.CacheConfig(cache_dir=sys.argv[1]))
artifacts = [a for a in map(store.fetch, store.list_keys()) if "guard" in a.meta]
by_ext, groups, used_groups, files, total = collections.Counter(), 0, 0, 0, 0
for artifact in artifacts:
    standalone, tuning = unpack_tuned(artifact.payload)
    total += len(artifact.payload)
    graph = artifact_format.unpickle(standalone).entry.compiled_fw.result
    launched = set(re.findall(r"async_compile\.triton\('(\w+)'", graph.source_code))
    bundle = graph._triton_bundle
    for group in bundle.kernel_artifacts:
        groups += 1
        names = {os.path.splitext(f.filename)[0] for f in group.artifacts}
        used_groups += bool(names & launched)
        for f in group.artifacts:
            files += 1
            by_ext[os.path.splitext(f.filename)[1] or f.filename] += len(f.payload)
    print(f"{artifact.meta.get('shape', '?')!s:>8} {len(artifact.payload) / 1e6:7.2f} MB "
          f"tuning {len(tuning) / 1e6:5.2f} MB, {len(bundle.kernel_artifacts)} groups, "
          f"{len(launched)} kernels launched, {len(bundle.static_autotuners)} static")
print(f"{len(artifacts)} artifacts {total / 1e6:.1f} MB: {groups} kernel groups, {used_groups} "
      f"naming a launched kernel, {files} files")
for ext, size in by_ext.most_common():
    print(f"  {ext:10s} {size / 1e6:8.1f} MB")
