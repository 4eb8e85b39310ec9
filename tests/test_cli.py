"""The `vcr` CLI end to end: warm (embedded Ray), ls, stats, verify, gc, load, plan, and clear
errors with non-zero exit codes for bad input."""

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest

from vllm_compile_ray.cache import manifest
from vllm_compile_ray.cli import commands as cli
from vllm_compile_ray.config import CacheConfig, CompilationConfig
from vllm_compile_ray.orchestration.warm_summary import WarmSummary
from vllm_compile_ray.runtime.api import open_store

TINY = ["--model", "llama-tiny", "--num-layers", "2", "--device", "cpu", "--backend", "eager"]
TINY_INDUCTOR = ["--model", "llama-tiny", "--num-layers", "2", "--device", "cpu"]


def vcr(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory) -> tuple[str, str]:
    """A cache warmed by `vcr warm` on an embedded in-process Ray (sizes 1,2 + dynamic), and
    what the command printed."""
    cache = str(tmp_path_factory.mktemp("cli") / "cache")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["warm", *TINY, "--sizes", "1,2", "--cache", cache,
                         "--gpus-per-compile", "0", "--cpus-per-compile", "0.5"])
    assert code == 0, out.getvalue()
    return cache, out.getvalue()


@pytest.fixture(scope="module")
def warmed(warm_run) -> str:
    return warm_run[0]


def test_warm_prints_progress_and_a_short_summary(warm_run) -> None:
    lines = warm_run[1].splitlines()
    assert sum(line.startswith("compiled ") for line in lines) == 9, lines  # progress
    assert any("9 compiled, 0 cached, 0 failed, 0 timed out of 9" in line for line in lines)
    assert any(line.startswith("took ") and "compile phase" in line for line in lines)
    slowest = next(line for line in lines if line.startswith("slowest: "))
    assert slowest.count("compile[") == 3
    assert any(re.fullmatch(r"published: 9 artifacts, \d+\.\d MB", line) for line in lines), lines
    assert not any(line.lstrip().startswith(("{", "summary ")) for line in lines)  # no JSON


def _fake_warm(monkeypatch) -> None:
    """`vcr warm` without Ray: warm() says a progress line and its summary, as the real one."""
    import vllm_compile_ray.orchestration.warm  # noqa: F401  (the package's `warm` attribute is the function)

    def fake(model, config, progress, **_):
        summary = WarmSummary(model, 1, "fp", total=2, compiled=1, cached=1, failed=0,
                              timed_out=0, wall_s=1.0, plan_s=0.5, task_s_sum=1.0, total_s=2.0,
                              rows=[{"name": "compile[a/1]", "status": "compiled", "seconds": 1.0}])
        progress("compiled 1/1 compile[a/1]")
        progress(summary.format())
        return summary
    monkeypatch.setattr(sys.modules["vllm_compile_ray.orchestration.warm"], "warm", fake)


def test_warm_json_goes_to_stdout_alone(capsys, monkeypatch) -> None:
    _fake_warm(monkeypatch)
    code, out, err = vcr(capsys, "warm", *TINY, "--json")
    assert code == 0 and json.loads(out)["rows"][0]["name"] == "compile[a/1]"
    assert "compiled 1/1" in err and "slowest: compile[a/1] 1.0s" in err
    code, out, err = vcr(capsys, "warm", *TINY)
    assert code == 0 and "slowest: compile[a/1] 1.0s" in out and "{" not in out and not err


def test_warm_summary_json_writes_a_file(capsys, monkeypatch, tmp_path) -> None:
    _fake_warm(monkeypatch)
    path = tmp_path / "summary.json"
    code, out, _ = vcr(capsys, "warm", *TINY, "--summary-json", str(path))
    assert code == 0 and "slowest: " in out and "{" not in out
    assert json.loads(path.read_text())["compiled"] == 1


def test_help_lists_commands_and_examples(capsys) -> None:
    code, out, _ = vcr(capsys, "--help")
    assert code == 0
    for command in ("warm", "load", "plan", "ls", "stats", "verify", "gc"):
        assert command in out
        code, text, _ = vcr(capsys, command, "--help")
        assert code == 0 and "Examples:" in text and f"vcr {command}" in text


def test_plan_counts_tasks_without_compiling(capsys) -> None:
    code, out, _ = vcr(capsys, "plan", *TINY, "--sizes", "1,2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["summary"]["unique_pieces"] == 3 and len(data["tasks"]) == 9
    assert {t["uses"] for t in data["tasks"]} == {1}  # 2 layers: first and last piece differ, no middle


def test_ls_lists_the_manifest(capsys, warmed) -> None:
    code, out, _ = vcr(capsys, "ls", "--cache", warmed, "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 9 and {r["model"] for r in rows} == {"llama-tiny"}
    code, out, _ = vcr(capsys, "ls", "--cache", warmed, "--shape", "dynamic")
    assert code == 0 and out.count("dynamic") == 3 and "piece" in out.splitlines()[0]


def test_stats_from_the_stored_snapshot(capsys, warmed) -> None:
    code, out, _ = vcr(capsys, "stats", "--cache", warmed, "--model", "llama-tiny")
    assert code == 0
    assert json.loads(out)["status"] == {"compiled": 9}
    code, _, err = vcr(capsys, "stats", "--cache", warmed, "--model", "llama-9000")
    assert code == 1 and "no manifest for model 'llama-9000'" in err


def test_load_pulls_with_zero_compiles(capsys, warmed) -> None:
    code, out, _ = vcr(capsys, "load", *TINY, "--sizes", "1,2", "--cache", warmed, "--on-miss", "error")
    assert code == 0, out
    assert "hits" in out and "compiles" in out
    header, row = [line.split() for line in out.splitlines() if line.split()][1:3]
    report = dict(zip(header, row))
    assert report["compiles"] == "0" and report["hits"] == "9" and report["misses"] == "0", out


def test_load_cold_cache_fails_with_the_warm_command(capsys, tmp_path) -> None:
    code, _, err = vcr(capsys, "load", *TINY, "--sizes", "2", "--cache", str(tmp_path / "empty"))
    assert code == 1
    assert "missing" in err and "vcr warm --model llama-tiny" in err


def _traced_models(store) -> list[str]:
    return [k for k in store.list_keys() if store.fetch(k).meta.get("kind") == "dynamo"]


def test_verify_reports_corruption(capsys, warmed, tmp_path) -> None:
    code, out, _ = vcr(capsys, "verify", "--cache", warmed)
    store = open_store(CompilationConfig(cache=CacheConfig(cache_dir=warmed)))
    traced = len(_traced_models(store))  # a `vcr load` of this module may have published one
    assert code == 0 and f"{9 + traced} artifacts: {9 + traced} ok, 0 corrupt, 0 orphaned" in out
    assert f"{traced} traced models" in out
    key = store.list_keys()[0]
    raw = bytearray(store.read_raw(key))
    raw[-1] ^= 0xFF
    store.write_raw(key, bytes(raw))
    try:
        code, out, _ = vcr(capsys, "verify", "--cache", warmed)
        assert code == 1 and f"corrupt {key}" in out and "sha256 mismatch" in out
    finally:
        raw[-1] ^= 0xFF
        store.write_raw(key, bytes(raw))


def test_gc_is_a_dry_run_unless_yes(capsys, tmp_path, warmed) -> None:
    """Artifacts of other fingerprints go with their manifest rows, and so do the traced models
    (`aot`, in no manifest) of other fingerprints; a traced model of a kept one stays."""
    import shutil
    cache = str(tmp_path / "copy")
    shutil.copytree(warmed, cache)
    store = open_store(CompilationConfig(cache=CacheConfig(cache_dir=cache,
                                                           staging_dir=str(tmp_path / "stage"))))
    traced = _traced_models(store)
    kept = "ab" * 32
    store.publish(kept, b"a traced model", {"kind": "dynamo", "fingerprint": "another-gpu",
                                            "torch": "2.99", "published_at": 0.0})
    code, out, _ = vcr(capsys, "gc", "--cache", cache, "--keep-fingerprint", "another-gpu")
    assert code == 0 and f"{9 + len(traced)} artifacts to delete (dry run" in out
    assert len(store.list_keys()) == 9 + len(traced) + 1
    code, out, _ = vcr(capsys, "gc", "--cache", cache, "--keep-fingerprint", "another-gpu", "--yes")
    assert code == 0 and f"{9 + len(traced)} artifacts deleted" in out
    assert store.list_keys() == [kept]
    entry = manifest.list_manifests(store)[0]
    assert manifest.read_manifest(store, entry["model"], entry["fingerprint_id"]).num_rows == 0
    code, out, _ = vcr(capsys, "gc", "--cache", cache, "--older-than-days", "1", "--yes")
    assert code == 0 and "1 artifacts deleted" in out and store.list_keys() == []
    code, _, err = vcr(capsys, "gc", "--cache", cache)
    assert code == 2 and "--keep-fingerprint and/or --older-than-days" in err


@pytest.mark.parametrize("argv,code,needle", [
    (["warm", "--model", "llama-tiny", "--sizes", "1,x"], 2, "comma-separated positive ints"),
    (["warm", "--model", "llama-tiny", "--storage-options", "[1]"], 2, "expected a JSON object"),
    (["warm", "--model", "llama-tiny", "--device", "tpu"], 2, "'cuda', 'cpu'"),
    (["warm", "--sizes", "1"], 2, "Missing option '--model'"),
    (["plan", "--model", "llama-9000", "--device", "cpu"], 1, "llama-tiny"),
    (["plan", "--model", "llama-tiny", "--device", "cpu", "--sizes", "0"], 2, "compile_sizes"),
    (["plan", "--model", "llama-tiny", "--device", "cpu", "--tp", "3"], 2, "tp_size"),
    (["ls", "--cache", "nosuch://x"], 2, "unknown protocol 'nosuch'"),
    (["nosuchcommand"], 2, "No such command"),
])
def test_bad_input_exits_non_zero_with_a_clear_message(capsys, argv, code, needle) -> None:
    actual, out, err = vcr(capsys, *argv)
    assert actual == code, (out, err)
    assert needle in out + err


def test_console_entry_point_exit_code() -> None:
    proc = subprocess.run([sys.executable, "-m", "vllm_compile_ray", "plan", "--model", "nope",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "vcr: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_with_a_signing_key_refuses_unsigned_artifacts(capsys, warmed, monkeypatch) -> None:
    monkeypatch.setenv("VCR_TEST_SIGNING_KEY", "k" * 40)
    code, out, err = vcr(capsys, "verify", "--cache", warmed, "--signing-scheme", "hmac-sha256",
                         "--signing-key-env", "VCR_TEST_SIGNING_KEY")
    assert code == 1 and "unsigned, and signatures are required" in err


def test_signing_flags_are_validated(capsys, warmed) -> None:
    code, _, err = vcr(capsys, "verify", "--cache", warmed, "--signing-scheme", "rsa")
    assert code == 2 and "'hmac-sha256', 'ed25519'" in err
    code, _, err = vcr(capsys, "verify", "--cache", warmed, "--signing-scheme", "hmac-sha256",
                       "--signing-key-env", "VCR_NO_SUCH_VARIABLE")
    assert code != 0 and "VCR_NO_SUCH_VARIABLE" in err


def test_unknown_model_fails_before_ray_starts(capsys, tmp_path) -> None:
    import ray
    code, _, err = vcr(capsys, "warm", "--model", "llama-9000", "--device", "cpu", "--cache", str(tmp_path))
    assert code == 1 and "llama-tiny" in err and not ray.is_initialized()


def test_a_checkpoint_directory_plans_and_loads_with_its_weights(capsys, tmp_path) -> None:
    """--model takes a transformers checkpoint directory (config.json), --weights its safetensors:
    the first load compiles and publishes, the second (on_miss=error) compiles nothing."""
    import hf_models

    ckpt = tmp_path / "ckpt"
    hf_models.build("qwen3", num_hidden_layers=2).save_pretrained(ckpt)
    common = ["--model", str(ckpt), "--device", "cpu", "--backend", "eager", "--sizes", "4",
              "--cache", str(tmp_path / "cache")]
    code, out, _ = vcr(capsys, "plan", *common)
    assert code == 0 and out.startswith(f"Qwen3ForCausalLM ({ckpt}), 2 layers")
    assert "vcr warm --model" in out
    for on_miss, compiles in (("compile_and_publish", 6), ("error", 0)):
        code, out, _ = vcr(capsys, "load", *common, "--weights", str(ckpt), "--on-miss", on_miss)
        header, row = out.strip().splitlines()[-2:]
        report = dict(zip(header.split(), row.split()))
        assert code == 0 and int(report["compiles"]) == compiles, out


def test_warm_summary_says_which_artifacts_a_rank_would_finish_compiling() -> None:
    rows = [{"name": "compile[a/1]", "status": "compiled", "seconds": 1.0, "bytes": 1_500_000,
             "check_kernel_compiles": 0, "check_autotunes": 0, "bundle_groups": 30,
             "bundle_groups_kept": 7},
            {"name": "compile[a/8]", "status": "compiled", "seconds": 2.0, "bytes": 2_000_000,
             "check_kernel_compiles": 3, "check_autotunes": 5, "bundle_groups": 40,
             "bundle_groups_kept": 9}]
    summary = WarmSummary("m", 1, "fp", total=2, compiled=2, cached=0, failed=0, timed_out=0,
                          wall_s=2.0, plan_s=0.5, task_s_sum=3.0, total_s=3.0, rows=rows)
    assert ("published: 2 artifacts, 3.5 MB (Triton bundles cut to the launched kernels: 16 of 70 "
            "kernel groups)") in summary.format().splitlines()
    line = next(x for x in summary.format().splitlines() if x.startswith("complete artifacts"))
    assert line.startswith("complete artifacts: 1 of 2 checked")
    assert "1 need 3 kernel compiles, 5 autotunes" in line and "compile[a/8]" in line
    summary.rows = rows[:1]
    assert "complete artifacts: 1 of 1 checked" in summary.format()
    assert "whole Triton bundle" not in summary.format()
    summary.rows = [{**rows[0], "bundle_cut_undone": 1}]
    assert ("complete artifacts: 1 of 1 checked load and run with no kernel compile or autotune; "
            "1 shipped with their whole Triton bundle") in summary.format()
    summary.rows = [{"name": "compile[a/1]", "status": "compiled", "seconds": 1.0,
                     "bytes": 250_000}]  # CPU: no check, no Triton bundle
    assert "complete artifacts" not in summary.format()
    assert "published: 1 artifact, 0.2 MB" in summary.format().splitlines()


def test_max_autotune_leaves_out_what_cannot_ship(monkeypatch) -> None:
    """--max-autotune adds coordinate descent only where its results load complete; asked for
    explicitly where they do not, the compiler refuses it instead of shipping artifacts that
    every rank re-tunes."""
    from vllm_compile_ray.torch_private import inductor
    from vllm_compile_ray.compiling.compiler_interface import make_compiler
    from vllm_compile_ray.errors import ConfigError

    argv = [*TINY_INDUCTOR, "--max-autotune", "--cache", "/tmp/unused"]
    for ships in (True, False):
        monkeypatch.setattr(inductor, "COORDINATE_DESCENT_SHIPS", ships)
        config = cli.make_config(cli.load.make_context("load", list(argv)).params)
        assert config.inductor_compile_config.get("max_autotune") is True
        assert config.inductor_compile_config.get("coordinate_descent_tuning", False) is ships
        make_compiler(config)  # what the CLI builds compiles
    explicit = CompilationConfig(backend="inductor", compile_sizes=[8], inductor_compile_config={
        "max_autotune": True, "coordinate_descent_tuning": True})
    with pytest.raises(ConfigError, match="coordinate_descent_tuning on torch .*ship_autotune"):
        make_compiler(explicit)
    make_compiler(CompilationConfig(**{**explicit.to_dict(), "ship_autotune": False}))
