# exp/prune-bundles on the user's path: `vcr warm` with this tree (bundles cut to launched
# kernels) and with the base package (AB_BASE), then the contents of both caches and the rank
# startup A/B. ~420 s.
. benchmarks/device/env.sh
B=${AB_BASE:?AB_BASE: a directory holding the base vllm_compile_ray}
pyc $B
rm -rf $R; mkdir -p $R
W="--model llama-3-8b --num-layers 4 --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune"
echo "== warm new"; python -m vllm_compile_ray warm $W --cache $R/user-cache 2>&1 | grep -E "^took|^complete"
echo "== warm base"; env -C $(realpath $B) PYTHONPATH=$(realpath $B):/tmp/site python -m vllm_compile_ray warm $W \
  --cache $R/base-cache 2>&1 | grep -E "^took|^complete"
for c in user-cache base-cache; do echo "== $c"; python benchmarks/device/bundle_stats.py $R/$c 2>&1 | tail -9; done
AB_BASE_CACHE=$R/base-cache bash benchmarks/device/ab_load.sh 2>&1 | tail -8
