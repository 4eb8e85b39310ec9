# Issue 24's rank startup on the product path, S3 against local disk: bench_load.py fills moto's
# S3 server on 127.0.0.1 with `vcr warm` (its defaults), then times `vcr load`s of 32 layers:
# the first rank, 3 new nodes per side (S3 and a local copy, alternating), a restart per side.
# ~250 s on an H100. Carry .devbundle with s3-312.tar.xz (s3_bundle.sh) beside the Ray bundle.
. benchmarks/device/env.sh
python -c "import moto, s3fs" || { echo "no moto/s3fs: build .devbundle/s3-312.tar.xz (s3_bundle.sh)"; exit 1; }
pyc
python benchmarks/bench_load.py --device cuda --model llama-3-8b --warm-layers 4 --num-layers 32 \
  --sizes 1,2,4,8,16,32,64,128,256,512 --max-autotune --repeats 3 --skip-cold --json $OUT/bench_load.json
