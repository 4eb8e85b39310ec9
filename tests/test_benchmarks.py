"""The benchmark scripts run end to end on CPU (their numbers come from the GPU hosts, where a
crash costs device time): `bench_warm.py` with the eager backend on an in-process Ray,
`bench_load.py` against moto's S3 server, and `profile_compile.py` with one Inductor compile
checked against eager."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(*argv: str) -> subprocess.CompletedProcess:
    """A benchmark script run on an in-process Ray. faulthandler: a crash of the process (one
    SIGSEGV in a full run, session 22) shows its Python stack in the assertion's stderr."""
    tmp = tempfile.mkdtemp(prefix="vb")  # short: Ray's socket paths live under TMPDIR
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": tmp}
        return subprocess.run([sys.executable, "-X", "faulthandler", *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_bench_warm_end_to_end_times_the_user_command_and_the_serial_loop_as_processes() -> None:
    """--end-to-end: `vcr warm` as a user types it (no sizing flags) and the serial loop, each a
    process from start to exit, both compiling every task; the ratio is theirs."""
    tmp = tempfile.mkdtemp(prefix="vb")
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": tmp}
        out = subprocess.run(
            [sys.executable, "-X", "faulthandler", "benchmarks/bench_warm.py", "--end-to-end",
             "--model", "llama-tiny", "--num-layers", "2", "--sizes", "2", "--no-dynamic",
             "--device", "cpu", "--backend", "eager"], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=600)
        logs = {name: next(Path(tmp).glob(f"vcr-bench-*/{name}.log")).read_text()
                for name in ("user_command", "serial")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = json.loads(out.stdout.splitlines()[-1])
    assert row["user_command_s"] > 0 and row["serial_s"] > 0
    assert abs(row["ratio_end_to_end"] - row["serial_s"] / row["user_command_s"]) <= 0.01
    command = next(x for x in out.stdout.splitlines() if x.startswith("user_command: -m"))
    assert "vllm_compile_ray warm --model llama-tiny" in command
    assert not re.search(r"--(max-in-flight|gpus-per-compile|cpus-per-compile|pool)", command)
    assert "warm llama-tiny tp=1: 3 compiled, 0 cached" in logs["user_command"]
    assert re.search(r"^serial 3/3 compile\[", logs["serial"], re.M), logs["serial"][-2000:]


def test_bench_load_starts_ranks_from_what_vcr_warm_put_in_s3(tmp_path: Path) -> None:
    """bench_load.py fills an S3 cache (moto) with `vcr warm` and times the user's `vcr load`s:
    new nodes fetch every artifact from S3 or from its local copy, restarts take them from their
    staging directory, and the cold rank compiles them all itself."""
    out = run_script("benchmarks/bench_load.py", "--model", "llama-tiny", "--num-layers", "1",
                     "--sizes", "2", "--no-dynamic", "--device", "cpu", "--backend", "eager",
                     "--json", str(tmp_path / "runs.json"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == ["warm", "first", "shared", "local", "restart-shared",
                                         "restart-local", "cold"]
    assert "--cache s3://vcr-bench/vcr" in runs[0]["argv"]
    assert re.match(r"warm llama-tiny tp=1: (\d+) compiled, 0 cached, 0 failed", runs[0]["summary"][0])
    report = {r["mode"]: r["report"] for r in runs[1:]}
    tasks = report["cold"]["tasks"]
    assert tasks == int(re.match(r"warm \S+ tp=1: (\d+)", runs[0]["summary"][0])[1])
    for mode in ("shared", "local"):
        assert (report[mode]["hits"], report[mode]["compiles"]) == (tasks, 0)
        assert report[mode]["downloaded"] == tasks  # a new node: every artifact fetched
    for mode in ("restart-shared", "restart-local"):
        assert (report[mode]["downloaded"], report[mode]["staged"]) == (0, tasks)
    assert (report["cold"]["hits"], report["cold"]["compiles"]) == (0, tasks)
    assert "shared / local: rank ready" in out.stdout
    assert "startup from the cache: 0 piece compiles, 0 kernel compiles" in out.stdout


def test_bench_warm_prints_ratios_utilization_and_overhead() -> None:
    out = run_script("benchmarks/bench_warm.py", "--model", "llama-tiny", "--num-layers", "2",
                     "--sizes", "2", "--no-dynamic", "--device", "cpu", "--backend", "eager",
                     "--workers", "2,2", "--pool", "off,on")
    assert out.returncode == 0, out.stderr[-3000:]
    result, pooled = [json.loads(x[len("result "):]) for x in out.stdout.splitlines()
                      if x.startswith("result ")]
    assert result["ray_compiled"] == result["serial_tasks"] == 3 and result["ok"]
    assert 0 <= result["busy"]["cpu"] <= 1 and 0 <= result["serial_busy"]["cpu"] <= 1
    assert set(result["overhead"]) >= {"first_task_lag_s", "pre_mean_s", "post_mean_s", "tail_s"}
    # the ratios are what they say (rounded to 0.01; eager compiles take milliseconds)
    assert result["serial_s"] > 0 and result["ray_wall_s"] > 0
    assert abs(result["ratio_compile"] - result["serial_s"] / result["ray_wall_s"]) <= 0.01
    assert abs(result["ratio_end_to_end"] - (result["serial_plan_s"] + result["serial_s"])
               / result["ray_total_s"]) <= 0.01
    assert "compile phase" in out.stdout and "busy in the serial loop" in out.stdout
    # progress as it goes (a call cut off by a time limit keeps it): each Ray run's phase right
    # after the run, then each serial compile, all before the results
    lines = out.stdout.splitlines()
    first_result = next(i for i, x in enumerate(lines) if x.startswith("result "))
    runs = [i for i, x in enumerate(lines) if x.startswith("ray run ")]
    serial = [i for i, x in enumerate(lines) if re.match(r"serial \d/3 compile\[", x)]
    assert len(runs) == 2 and len(serial) == 3 and max(runs + serial) < first_result, lines
    assert f"compile phase {result['ray_wall_s']:.1f}s" in lines[runs[0]]
    # CPU seconds summed over the compiles, from their rows (`cpu_time`)
    assert set(result["cpu"]) == {"cpu_s", "child_cpu_s", "run_s", "runq_s"}, result["cpu"]
    # the tasks that ended last, each with its start and end in the compile phase
    assert sum(x.startswith("path compile[") and "-" in x for x in out.stdout.splitlines()) == 6
    # --pool on: the run compiled in the two pool workers started (and timed) before it
    assert (result["pool"], pooled["pool"]) == ("off", "on")
    assert pooled["ray_compiled"] == 3 and pooled["ok"] and pooled["pool_reused"] == 2
    assert pooled["pool_start_s"] > 0 and "pool of 2 compile workers started" in out.stdout
    assert abs(pooled["ratio_end_to_end_with_pool_start"] - (result["serial_plan_s"]
               + result["serial_s"]) / (pooled["ray_total_s"] + pooled["pool_start_s"])) <= 0.01


def test_sampler_sees_a_busy_core() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from utilization import Sampler
    finally:
        sys.path.pop(0)
    sampler = Sampler(interval=0.1).start()
    t0 = time.time()
    while time.time() - t0 < 1.0:  # one core busy
        pass
    sampler.stop()
    busy = sampler.mean(t0, time.time())
    assert busy["cpu"] >= 0.9 / (os.cpu_count() or 1), busy  # at least this core, of all
    assert sampler.mean(t0 - 100, t0 - 50) == {}  # no samples in that window


def test_profile_compile_checks_the_compiled_piece_against_eager() -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/profile_compile.py", "--model", "llama-tiny", "--num-layers",
         "2", "--shape", "4", "--device", "cpu", "--threads", "1", "--check", "--top", "3",
         "--gc", "freeze", "--start-at", str(time.time() + 1)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^profiling compile\[\w+/4\]", out.stdout, re.M), out.stdout[:2000]
    [check] = re.findall(r"^check: (\d+) outputs, worst .* = (\S+)$", out.stdout, re.M)
    assert int(check[0]) >= 1 and float(check[1]) < 1e-4  # fp32 on CPU
    assert "Runtimes (s)" in out.stdout  # the phase timers' table follows
    [cpu] = re.findall(r"^CPU: process (\S+) s, its children (\S+) s, compile thread ran (\S+) s",
                       out.stdout, re.M)
    # the compile ran on its thread, in-process (the process's clock ticks at 10 ms)
    assert float(cpu[0]) + 0.02 >= float(cpu[2]) > 0, cpu
    # the heap frozen first, as compile workers do; the collector still ran, and was timed
    frozen = int(re.search(r"^froze (\d+) objects", out.stdout, re.M).group(1))
    assert frozen > 100_000, out.stdout[:2000]
    [(young, _, _)] = re.findall(r"^garbage collector \(freeze\): \[(\d+), (\d+), (\d+)\]",
                                 out.stdout, re.M)
    assert int(young) > 0
    assert re.search(r"^waited -?[\d.]+ s for the start", out.stdout, re.M)


def test_bench_plan_configs_measures_vcr_plan_of_a_config_json(tmp_path: Path) -> None:
    cfg = json.loads((REPO / "tests/data/configs/mixtral-8x7b.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256)  # the public config's fields, tiny
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_plan_configs.py", "--models", str(path), "--tp", "2",
         "--sizes", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [row] = [json.loads(x[len("result "):]) for x in out.stdout.splitlines()
             if x.startswith("result ")]
    assert row["architecture"] == "MixtralForCausalLM" and row["ok"], row
    assert (row["pieces"], row["unique"], row["tasks"]) == (3, 3, 6), row
    assert 0 < row["wall_s"] and 100 < row["peak_rss_mb"] < 4096, row  # the child's, in MB
