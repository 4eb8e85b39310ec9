# A/B of a change to what `vcr warm` publishes: a warm with this tree and one with a base package
# (AB_BASE, e.g. `git archive <rev> vllm_compile_ray | tar -x -C DIR`), what both caches' Triton
# bundles hold, then the rank startup A/B (ab_load.sh) across the two caches. ~300 s on an H100.
# The base warm runs second and takes its compiles from the first warm's local Inductor cache:
# both caches then hold the same compiled code, as each side's publishing step left it.
# Session 27: bundles cut to the launched kernels against whole ones (benchmarks/RESULTS.md).
. benchmarks/device/env.sh
B=${AB_BASE:?AB_BASE: a directory holding the base vllm_compile_ray}
pyc $B
rm -rf $R; mkdir -p $R
W="--model llama-3-8b --num-layers 4 --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune"
echo "== warm new"; python -m vllm_compile_ray warm $W --cache $R/user-cache 2>&1 | grep -E "^took|^complete"
echo "== warm base"; env -C $(realpath $B) PYTHONPATH=$(realpath $B):/tmp/site python -m vllm_compile_ray warm $W \
  --cache $R/base-cache 2>&1 | grep -E "^took|^complete"
for c in user-cache base-cache; do echo "== $c"; python benchmarks/device/bundle_stats.py $R/$c 2>&1 | tail -9; done
AB_BASE_CACHE=$R/base-cache bash benchmarks/device/ab_load.sh 2>&1 | tail -12
