# Issue 24's S3 target: rank startup from an S3 cache (moto's server on 127.0.0.1) against the same
# bytes on local disk. `vcr warm` fills the bucket with its defaults, a first rank publishes the
# traced model there, the bucket is copied to a local directory, then new-node `vcr load`s
# alternate S3 and local (ABBA), then restarts; summary by ab_summary.py. ~250 s on an H100.
# Needs .devbundle/s3-312.tar.xz (s3_bundle.sh) carried beside the Ray bundle. W: the warm's
# model arguments, S: the ranks' (env.sh), both without --cache.
. benchmarks/device/env.sh
W=${W:-"--model llama-3-8b --num-layers 4 --sizes 1,2,4,8,16,32,64,128,256,512 --device cuda --max-autotune"}
S=${S/ --cache $R\/user-cache/}
python -c "import moto, s3fs" || { echo "no moto/s3fs: carry .devbundle/s3-312.tar.xz"; exit 1; }
rm -rf $R; mkdir -p $R
PORT=${PORT:-5055}
python -m moto.server -H 127.0.0.1 -p $PORT > $R/moto.log 2>&1 &
MOTO=$!; trap 'kill $MOTO' EXIT
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
OPTS="{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:$PORT\"}}"
BUCKET=s3://vcr-bench/vcr
s3() { python - "$OPTS" "$@" <<'PY'
import json, sys, time, s3fs
fs = s3fs.S3FileSystem(**json.loads(sys.argv[1]))
for _ in range(100):  # the server is up when a request answers
    try:
        fs.ls("")
        break
    except Exception:
        time.sleep(0.2)
if sys.argv[2] == "mkbucket":
    fs.mkdir("vcr-bench")
else:  # copy the bucket's cache to a local directory
    fs.get("vcr-bench/vcr/", sys.argv[3], recursive=True)
PY
}
s3 mkbucket
echo "== warm"; ( time VCR_STORAGE_OPTIONS="$OPTS" python -m vllm_compile_ray warm $W --cache $BUCKET ) 2>&1 \
  | grep -E "^took|^complete|^warm|^real"
side_run() { local side=$1 name=$2 dir=$3; local cache=$BUCKET opts=$OPTS
  if [ "$side" = local ]; then cache=$R/local-cache; opts=""; fi
  run "$side $name" env VCR_STORAGE_OPTIONS="$opts" TORCHINDUCTOR_CACHE_DIR=$R/i-$dir \
    python -m vllm_compile_ray load $S --cache $cache --staging-dir $R/s-$dir; }
{
side_run s3 first first  # traces the ranks' model and publishes it to the bucket
s3 copy $R/local-cache
du -sh $R/local-cache
for i in 1 2 3 4; do
  order="s3 local"; [ $((i % 2)) = 0 ] && order="local s3"
  for side in $order; do side_run $side new-node $side$i; done
done
for side in s3 local local s3; do side_run $side restart ${side}1; done
} 2>&1 | tee $R/ab.log
python benchmarks/device/ab_summary.py $R/ab.log
