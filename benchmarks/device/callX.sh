# defaults beside flags (issue 25), then rank startups from the defaults' cache + profile (issue 24)
. benchmarks/device/env.sh
pyc; nvidia-smi -L; nproc; python -c "import torch, triton; print(torch.__version__, triton.__version__)"
R=/root/e2e; rm -rf $R; mkdir -p $R
python benchmarks/bench_warm.py --end-to-end --skip-serial --model llama-3-8b --num-layers 4 \
  --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune \
  --flags "--gpus-per-compile 0.0625 --max-in-flight 16" \
  --flags "--gpus-per-compile 0.125 --max-in-flight 8" --root $R 2>&1 | tail -8
for f in user_command flags1 flags2; do echo "== $f"; grep -v "^\s*$" $R/$f.log | tail -12; done
bash benchmarks/device/loads.sh
tar -C $R -czf $OUT/logs.tgz --exclude='*-cache' --exclude='*-inductor' . 2>/dev/null
