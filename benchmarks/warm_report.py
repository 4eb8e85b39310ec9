"""What `bench_warm.py` reports of its runs: Inductor's phases summed over the tasks, the
compile phase's overhead, the tasks that ended last or ran longest, the worker start-ups, and the
lines and ratios printed at the end."""

from __future__ import annotations

import json

from vllm_compile_ray.orchestration.stats import cpu_sums, top_phases


ALL = 1 << 30


def ray_phases(summary) -> dict[str, float]:
    """Inductor phase seconds (and runtime tuning, publishing, the collector) summed over a Ray
    run's compiles."""
    return top_phases([{"phases": {**r.get("phases", {}), "tune_s": r.get("tune_s", 0.0),
                                   "publish_s": r.get("publish_s", 0.0),
                                   "gc_s": r.get("gc_s", 0.0)}}
                       for r in summary.rows if r.get("status") == "compiled"], top=ALL)


def print_phases(serial_phases: dict[str, float], runs: list[dict], top: int = 24) -> None:
    """Phase seconds summed over the tasks: serial, then each Ray run with its ratio to serial."""
    names = sorted(set(serial_phases) | {n for r in runs for n in r["phases"]},
                   key=lambda n: -max([serial_phases.get(n, 0.0)] +
                                      [r["phases"].get(n, 0.0) for r in runs]))[:top]
    print(f"{'phase (s summed over tasks)':58} {'serial':>8} " +
          " ".join(f"{_label(r):>16}" for r in runs))
    for name in names:
        base = serial_phases.get(name, 0.0)
        cells = []
        for r in runs:
            value = r["phases"].get(name, 0.0)
            cells.append(f"{value:8.1f} ({value / base:4.2f}x)" if base else f"{value:8.1f}       ")
        print(f"{name[:58]:58} {base:8.1f} " + " ".join(f"{c:>16}" for c in cells))


def _label(run: dict) -> str:
    return f"ray {run['workers']}"


def overhead(summary) -> dict[str, float]:
    """Where the compile phase's wall time goes besides compiling, from the task rows: Ray's lag
    to the first task, per task the time before compiling (CUDA start, fingerprint, stats actor)
    and after (publish, checksum, report), and the phase's tail after the last task ended."""
    rows = [r for r in summary.rows if r.get("entered_at")]
    if not rows:
        return {}
    pre = [r["started_at"] - r["entered_at"] for r in rows]
    post = [r["wall_s"] - r["seconds"] for r in rows]
    end = summary.phase_started_at + summary.wall_s
    return {"first_task_lag_s": round(min(r["entered_at"] for r in rows) - summary.phase_started_at, 3),
            "pre_mean_s": round(sum(pre) / len(pre), 3), "pre_max_s": round(max(pre), 3),
            "post_mean_s": round(sum(post) / len(post), 3), "post_max_s": round(max(post), 3),
            "tail_s": round(end - max(r["finished_at"] for r in rows), 3),
            "longest_task_ends_at_s": round(max(r["finished_at"] for r in rows
                                                if r["seconds"] == max(x["seconds"] for x in rows))
                                            - summary.phase_started_at, 3)}


_KEY_PHASES = ("GraphLowering.run", "Scheduler.__init__", "PythonWrapperCodegen.generate",
               "async_compile.precompile")


def critical_tasks(summary, top: int = 6) -> list[str]:
    """One line per task that ended last or ran longest: when it started and ended in the
    compile phase, its GEMM waits and selections, and Inductor's main phases."""
    t0 = summary.phase_started_at
    rows = [r for r in summary.rows if r.get("status") == "compiled"]
    last = sorted(rows, key=lambda r: -r["finished_at"])[:top]
    longest = sorted(rows, key=lambda r: -r["seconds"])[:top]
    lines = []
    for row in last + [r for r in longest if r not in last]:
        phases = row.get("phases", {})
        lines.append(
            f"path {row['name']:34} {row.get('submitted_at', t0) - t0:4.1f}>"
            f"{row['started_at'] - t0:5.1f}-{row['finished_at'] - t0:5.1f}s "
            f"compile {row['seconds']:5.1f}s gpu {','.join(map(str, row.get('process_gpu_ids', [])))}"
            f" gemm: {row.get('gemm_benchmarked', 0)} benchmarked; cpu {row.get('cpu_s', 0.0):.1f} + children "
            f"{row.get('child_cpu_s', 0.0):.1f} (thread "
            f"ran {row.get('run_s', 0.0):.1f}, waited for a core {row.get('runq_s', 0.0):.1f}); "
            f"gc {row.get('gc_s', 0.0):.1f}, "
            + ", ".join(f"{n.split('.')[-1]} {phases.get(n, 0.0):.1f}" for n in _KEY_PHASES))
    return lines


def startups(summary) -> str:
    """How the worker start-ups went, from the compile phase's start (negative: while planning):
    Ray's lag from submit to the start-up running, each step's median / max seconds, when the
    last one ended."""
    rows = summary.prestart_rows
    if not rows:
        return "start-ups: none"
    t0 = summary.phase_started_at

    def spread(values: list[float]) -> str:
        values = sorted(values)
        return f"{values[len(values) // 2]:.1f}/{values[-1]:.1f}"

    steps = {name: [r["steps"].get(name, 0.0) for r in rows]
             for name in dict.fromkeys(n for r in rows for n in r.get("steps", {}))}
    return (f"start-ups: {len(rows)} submitted at {rows[0]['submitted_at'] - t0:.1f}s, running "
            f"after (median/max) {spread([r['entered_at'] - r['submitted_at'] for r in rows])}s, "
            + ", ".join(f"{name} {spread(v)}s" for name, v in steps.items())
            + f"; ended {spread([r['finished_at'] - t0 for r in rows])}s into the phase")


def workers_per_gpu(rows: list[dict]) -> dict[str, int]:
    """Compile worker processes per GPU they are bound to (the GPUs of each one's first task)."""
    pids: dict[str, set] = {}
    for row in rows:
        for gpu in row.get("process_gpu_ids", []):
            pids.setdefault(str(gpu), set()).add(row["pid"])
    return {gpu: len(p) for gpu, p in sorted(pids.items())}


def run_row(summary, workers: int, resources: dict[str, float], precompile: str,
            pool: str, gpu_sharing: str, pool_start_s: float) -> dict:
    """One Ray run's results from its WarmSummary: the JSON line's fields, its compile phase's
    window (for the utilization sampler) and the lines printed about its slowest tasks."""
    return {"workers": workers, **resources, "precompile_threads": precompile,
            "pool": pool, "gpu_sharing": gpu_sharing,
            "pool_start_s": pool_start_s, "cpu": cpu_sums(summary.rows),
            "pool_reused": summary.pool_reused,
            "gemm_benchmarked_in_compiles": summary.gemm_benchmarked,
            "overhead": overhead(summary), "phases": ray_phases(summary),
            "window": (summary.phase_started_at,
                       summary.phase_started_at + summary.wall_s),
            "benchmarked_by_task": {r["name"]: r["gemm_benchmarked"] for r in summary.rows
                                    if r.get("gemm_benchmarked")},
            "peak_rss_mb_max": max((r.get("peak_rss_mb", 0.0) for r in summary.rows),
                                   default=0.0),
            "ray_total_s": summary.total_s,
            "ray_wall_s": summary.wall_s, "ray_plan_s": summary.plan_s,
            "ray_task_s_sum": summary.task_s_sum, "ray_compiled": summary.compiled,
            "ray_failed": summary.failed + summary.timed_out,
            "max_concurrent": summary.max_concurrent, "prestarted": summary.prestarted,
            "prestart_s": summary.prestart_s,
            "prestart_ready": summary.prestart_ready,
            "prestart_last_s": summary.prestart_last_s,
            "ran_in_prestarted": summary.ran_in_prestarted,
            "longest_task_s": max((r.get("seconds", 0.0) for r in summary.rows), default=0.0),
            "worker_pids": len({r["pid"] for r in summary.rows if "pid" in r}),
            "workers_per_gpu": workers_per_gpu(summary.rows),
            # printed as lines, not in the JSON:
            "critical": [startups(summary)] + critical_tasks(summary),
            "ok": summary.ok}


def print_results(common: dict, runs: list[dict], serial_phases: dict[str, float] | None) -> None:
    """Each run's JSON line, then the phases, utilization, slowest tasks and ratios
    (serial_phases None: no serial loop ran)."""
    for run in runs:
        print("result " + json.dumps({**common, **{k: v for k, v in run.items()
                                                   if k != "critical"}}), flush=True)
    if serial_phases is not None:
        print(f"busy in the serial loop: {common['serial_busy']}")
        print_phases(serial_phases, runs)
    for run in runs:
        print(f"busy in the compile phase of ray {run['workers']} ({run['gpu_sharing']}): "
              f"{run['busy']}; overhead {run['overhead']}; workers per GPU "
              f"{run['workers_per_gpu']}; tasks that ended last "
              "or ran longest:")
        print("\n".join(run["critical"]))
    for run in runs:
        if "ratio_end_to_end" in run:
            print(f"{run['workers']} workers x {run['cpus_per_compile']:g} CPUs (precompile "
                  f"threads: {run['precompile_threads']}, "
                  f"GPU sharing {run['gpu_sharing']}: {run['gemm_benchmarked_in_compiles']} GEMMs "
                  f"benchmarked in compiles): end to end serial "
                  f"{common['serial_plan_s'] + common['serial_s']:.1f}s / ray {run['ray_total_s']:.1f}s"
                  f" = {run['ratio_end_to_end']}x; compile phase {common['serial_s']:.1f}s / "
                  f"{run['ray_wall_s']:.1f}s = {run['ratio_compile']}x ({common['serial_tasks']} tasks, "
                  f"longest Ray task {run['longest_task_s']:.1f}s, peak RSS of a worker "
                  f"{run['peak_rss_mb_max'] / 1024:.1f} GiB; serial loop / longest serial task "
                  f"{common['ceiling']}x)")
