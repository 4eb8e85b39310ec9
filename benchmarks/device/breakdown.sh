# where a new-node rank's load goes: warm with the defaults, a first rank, then new-node loads
# with torch's phase timers (timed_load.py) and a cProfile ($OUT/load.prof: read self times)
. benchmarks/device/env.sh
pyc; nvidia-smi -L
rm -rf $R; mkdir -p $R
python -m vllm_compile_ray warm --model llama-3-8b --num-layers 4 --sizes 1,2,4,8,16,32,64,128,256,512 \
  --device cuda --max-autotune --cache $R/user-cache 2>&1 | grep -E "^took|^complete"
run first env TORCHINDUCTOR_CACHE_DIR=/tmp/b0 python -m vllm_compile_ray load $S --staging-dir /tmp/bs0
for i in 1 2; do run new$i env TORCHINDUCTOR_CACHE_DIR=/tmp/b$i python -m vllm_compile_ray load $S --staging-dir /tmp/bs$i; done
echo "== timed"; TORCHINDUCTOR_CACHE_DIR=/tmp/bt python benchmarks/device/timed_load.py $S --staging-dir /tmp/bst 2>&1 | grep -v Warning | tail -34
TORCHINDUCTOR_CACHE_DIR=/tmp/bp python -m cProfile -o $OUT/load.prof -m vllm_compile_ray load $S --staging-dir /tmp/bsp > /dev/null 2>&1
python - <<'PY'
import os, pstats
p = pstats.Stats(os.environ["OUT"] + "/load.prof")
rows = sorted(((v[2], v[1], k) for k, v in p.stats.items()), reverse=True)
print("cProfile self times:")
for tt, n, k in rows[:30]:
    print(f"{tt:7.3f} {n:6d} {k[0].split('site-packages/')[-1]}:{k[1]}:{k[2]}")
PY
