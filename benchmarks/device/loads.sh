# rank startups from the defaults' cache (after callX.sh's bench), and a profile
. benchmarks/device/env.sh
run first env TORCHINDUCTOR_CACHE_DIR=/tmp/i0 python -m vllm_compile_ray load $S --staging-dir /tmp/s0
for i in 1 2 3; do run new$i env TORCHINDUCTOR_CACHE_DIR=/tmp/i$i python -m vllm_compile_ray load $S --staging-dir /tmp/s$i; done
run restart env TORCHINDUCTOR_CACHE_DIR=/tmp/i1 python -m vllm_compile_ray load $S --staging-dir /tmp/s1
run prof env TORCHINDUCTOR_CACHE_DIR=/tmp/ip python -m cProfile -o $OUT/load.prof -m vllm_compile_ray load $S --staging-dir /tmp/sp
echo "== importtime"; TORCHINDUCTOR_CACHE_DIR=/tmp/ix python -X importtime -m vllm_compile_ray load $S --staging-dir /tmp/sx 2> $OUT/importtime.txt | tail -2
