# issue 25: user command (defaults) + two flag sets + the serial loop, one bench run, in a process
# session of its own so that it outlives this call; call2.sh collects it and runs the loads.
. benchmarks/device/env.sh
pyc
nvidia-smi -L; nproc; free -g | head -2; python -c "import torch, triton; print(torch.__version__, triton.__version__)"
R=/root/e2e; rm -rf $R; mkdir -p $R
setsid nohup python benchmarks/bench_warm.py --end-to-end --model llama-3-8b --num-layers 4 \
  --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune \
  --flags "--gpus-per-compile 0.0625 --max-in-flight 16" \
  --flags "--gpus-per-compile 0.125 --max-in-flight 8" --root $R > $R/bench.out 2>&1 < /dev/null &
while [ $SECONDS -lt ${1:-580} ] && pgrep -f bench_warm > /dev/null; do sleep 5; done
cat $R/bench.out
for f in user_command flags1 flags2; do echo "== $f"; grep -v "^\s*$" $R/$f.log | tail -8; done
tail -2 $R/serial.log
