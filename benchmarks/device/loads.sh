R=/root/e2e
S="--model llama-3-8b --num-layers 32 --sizes 1,2,4,8,16,32,64,128,256,512 --max-autotune --on-miss error --cache $R/user-cache"
run() { local name=$1; shift; echo "== $name"; local t0=$(date +%s.%N)
  "$@" 2>&1 | grep -v Warning | tail -3
  echo "$name wall $(python -c "import time;print(round(time.time()-$t0,2))") s"; }
run first env TORCHINDUCTOR_CACHE_DIR=/tmp/i0 python -m vllm_compile_ray load $S --staging-dir /tmp/s0
for i in 1 2 3; do run new$i env TORCHINDUCTOR_CACHE_DIR=/tmp/i$i python -m vllm_compile_ray load $S --staging-dir /tmp/s$i; done
run restart env TORCHINDUCTOR_CACHE_DIR=/tmp/i1 python -m vllm_compile_ray load $S --staging-dir /tmp/s1
run prof env TORCHINDUCTOR_CACHE_DIR=/tmp/ip python -m cProfile -o $OUT/load.prof -m vllm_compile_ray load $S --staging-dir /tmp/sp
echo "== importtime"; TORCHINDUCTOR_CACHE_DIR=/tmp/ix python -X importtime -m vllm_compile_ray load $S --staging-dir /tmp/sx 2> $OUT/importtime.txt | tail -2
