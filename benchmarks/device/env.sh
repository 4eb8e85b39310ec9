# sourced on the device: Ray bundle + project on PYTHONPATH
[ -d /tmp/site/ray ] || { mkdir -p /tmp/site && tar -C /tmp/site -xJf .devbundle/ray312.tar.xz; }
# moto's S3 server and s3fs (s3_bundle.sh), when carried: after the Ray bundle on the path
if [ -f .devbundle/s3-312.tar.xz ] && [ ! -d /tmp/site-s3/moto ]; then
  mkdir -p /tmp/site-s3 && tar -C /tmp/site-s3 -xJf .devbundle/s3-312.tar.xz; fi
export PYTHONPATH=$PWD:/tmp/site:/tmp/site-s3 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
# the user's rank command on the defaults' cache (filled by bench_warm.py --root $R)
R=${R:-/root/e2e}
S=${S:-"--model llama-3-8b --num-layers 32 --sizes 1,2,4,8,16,32,64,128,256,512 --max-autotune --on-miss error --cache $R/user-cache"}
run() { local name=$1; shift; echo "== $name"; local t0=$(date +%s.%N)
  "$@" 2>&1 | grep -v Warning | tail -3
  echo "$name wall $(python -c "import time;print(round(time.time()-$t0,2))") s"; }
# .pyc for torch, the bundle and the package (an installed machine has them), plus extra dirs
pyc() { python -m compileall -q -j 16 $(python -c "import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))") /tmp/site /tmp/site-s3 vllm_compile_ray "$@" > /dev/null 2>&1; }
