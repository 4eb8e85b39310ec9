# warm defaults beside 16 compile slots (issue 25), then the rank startup A/B (ab_load.sh)
. benchmarks/device/env.sh
pyc ${AB_BASE:-}; nvidia-smi -L
rm -rf $R; mkdir -p $R
python benchmarks/bench_warm.py --end-to-end --skip-serial --model llama-3-8b --num-layers 4 \
  --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune \
  --flags "--gpus-per-compile 0.0625 --max-in-flight 16" --root $R 2>&1 | tail -3
for f in user_command flags1; do echo "== $f"; grep -E "^took|^complete" $R/$f.log; done
bash benchmarks/device/ab_load.sh
