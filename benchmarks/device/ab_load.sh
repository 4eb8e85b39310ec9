# A/B of rank startup: this tree's package against a base copy of it (AB_BASE: a directory
# holding another vllm_compile_ray, e.g. `git archive <rev> vllm_compile_ray | tar -x -C DIR`).
# After a warm filled $R/user-cache (and, when the base warms apart, AB_BASE_CACHE): one first
# rank per side (publishes the traced model), then new-node `vcr load`s in ABBA order, then
# restarts; a summary of the report's phases per side.
. benchmarks/device/env.sh
B=${AB_BASE:?AB_BASE: a directory holding the base vllm_compile_ray}
# each side runs from its own directory: `python -m` puts the working directory first on sys.path
side_run() { local side=$1 name=$2 dir=$3; local pp=$PWD args=$S
  if [ "$side" = base ]; then pp=$(realpath $B); args=${S/$R\/user-cache/${AB_BASE_CACHE:-$R/user-cache}}; fi
  run "$side $name" env -C $pp PYTHONPATH=$pp:/tmp/site TORCHINDUCTOR_CACHE_DIR=/tmp/ab-i-$dir \
    python -m vllm_compile_ray load $args --staging-dir /tmp/ab-s-$dir; }
{
side_run new first first-new
side_run base first first-base
for i in 1 2 3 4; do
  order="base new"; [ $((i % 2)) = 0 ] && order="new base"
  for side in $order; do side_run $side new-node $side$i; done
done
for side in base new new base; do side_run $side restart ${side}1; done
} 2>&1 | tee $R/ab.log
python benchmarks/device/ab_summary.py $R/ab.log
