# torch 2.11 contract + the changed loaders' tests, then what the warm's Triton bundles hold
. benchmarks/device/env.sh
python -m pytest -q -x -p no:cacheprovider tests/test_torch_contract.py tests/test_retarget.py \
  tests/test_artifact_format.py tests/test_autotune_ship.py 2>&1 | tail -3
rm -rf $R; mkdir -p $R
python -m vllm_compile_ray warm --model llama-3-8b --num-layers 4 --sizes 1,2,4,8,16,32,64,128,256,512 \
  --device cuda --max-autotune --cache $R/user-cache 2>&1 | grep -E "^took|^complete"
python benchmarks/device/bundle_stats.py $R/user-cache 2>&1 | grep -v Warning | tail -45
