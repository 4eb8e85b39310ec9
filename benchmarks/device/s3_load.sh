# Issue 24's rank startup on the product path, S3 against local disk and a cold compile:
# bench_load.py fills moto's S3 server on 127.0.0.1 with `vcr warm` (its defaults), then times
# `vcr load`s of 32 layers: the first rank, 3 new nodes per side (S3 and a local copy,
# alternating), a restart per side, and a cold `--on-miss compile` rank (~500 s of it on an H100).
# The bench runs in a process session of its own so that it outlives a call: run this script in
# two calls back to back (the second finds the bench and waits for it); `$1` is this call's wait.
# Carry .devbundle with s3-312.tar.xz (s3_bundle.sh) beside the Ray bundle.
. benchmarks/device/env.sh
python -c "import moto, s3fs" || { echo "no moto/s3fs: build .devbundle/s3-312.tar.xz (s3_bundle.sh)"; exit 1; }
W=/root/s3-load
if [ ! -f $W/bench.out ]; then
  nvidia-smi -L; python -c "import torch, triton; print(torch.__version__, triton.__version__)"
  pyc; mkdir -p $W
  setsid nohup python benchmarks/bench_load.py --device cuda --model llama-3-8b --warm-layers 4 \
    --num-layers 32 --sizes 1,2,4,8,16,32,64,128,256,512 --max-autotune --repeats 3 \
    --json $W/bench_load.json > $W/bench.out 2>&1 < /dev/null &
  sleep 2
fi
while [ $SECONDS -lt ${1:-580} ] && pgrep -f bench_load.py > /dev/null; do sleep 3; done
if pgrep -f bench_load.py > /dev/null; then echo "== running at ${SECONDS}s"; tail -3 $W/bench.out
else grep -v Warning $W/bench.out | tail -40; cp $W/bench_load.json $OUT/ 2>/dev/null; fi
