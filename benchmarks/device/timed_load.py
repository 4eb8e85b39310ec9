"""`vcr load` (arguments as the CLI's) with torch's own phase timers printed at exit: where a
rank's load goes, by Inductor's `dynamo_timed` names (cProfile's cumulative times are unreliable
under dynamo's frame hook)."""
import atexit
import runpy
import sys


def _dump() -> None:
    from torch._dynamo.utils import compilation_time_metrics

    rows = sorted(((sum(v), len(v), k) for k, v in compilation_time_metrics.items()), reverse=True)
    print("torch phase timers (seconds summed, calls, name):")
    for total, calls, name in rows[:30]:
        print(f"{total:8.3f} {calls:5d} {name}")


atexit.register(_dump)
sys.argv = ["vcr", "load", *sys.argv[1:]]
runpy.run_module("vllm_compile_ray", run_name="__main__")
