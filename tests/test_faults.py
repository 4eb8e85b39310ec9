"""The fault matrix: each case makes a real component fail.

1. The S3 server (moto in its own process, `s3proc.MotoProcess`) killed (SIGKILL) or frozen
   (SIGSTOP) while a publish or a fetch is on the wire: StoreUnavailableError within a few
   store_timeout_s, nothing staged, and afterwards the store holds the whole artifact or nothing.
2. Damaged objects in the store (truncated, bit-flipped, garbage, foreign fingerprint) and a
   damaged staged copy: detected before the loader sees them, then recompiled (and the bad object
   replaced) or refetched, and counted.
3. Ray (marked `ray`): a worker SIGKILLed mid-compile, the warm driver SIGKILLed mid-run and
   restarted, two warm jobs racing on one cache, and a signed warm run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import vllm_compile_ray as vcr
from s3proc import MotoProcess, leftover_files
from test_signing import ExecAdaptor
from vllm_compile_ray.cache import signing
from vllm_compile_ray.cache.store import ArtifactStore, decode_artifact, encode_artifact
from vllm_compile_ray.errors import ArtifactNotFoundError, StoreUnavailableError
from vllm_compile_ray.runtime.api import CompiledModel, key_context, open_store
from vllm_compile_ray.runtime.backend import VcrBackend
from vllm_compile_ray.runtime.manager import CompilerManager

REPO = Path(__file__).resolve().parents[1]
BUCKET = "vcr-faults"
URL = f"s3://{BUCKET}/cache"
TIMEOUT_S = 2.0  # store_timeout_s of every store here
BOUND_S = 15.0  # a frozen or dead store must fail an operation within this
K1 = hashlib.sha256(b"fault-1").hexdigest()
PAYLOAD = os.urandom(4096)
META = {"shape": 4, "guard": [4, 4], "compiler": "exec", "fingerprint": "fp"}
EAGER = dict(backend="eager", use_inductor=False)


# ---------------------------------------------------------------- S3 server in a process

@pytest.fixture(scope="module")
def moto_proc(tmp_path_factory) -> Iterator[MotoProcess]:
    server = MotoProcess(log_path=str(tmp_path_factory.mktemp("moto") / "moto.log")).start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_proc: MotoProcess) -> Iterator[MotoProcess]:
    """The server running, thawed, reset, with an empty bucket."""
    moto_proc.thaw()
    moto_proc.start()
    moto_proc.reset()
    moto_proc.create_bucket(BUCKET)
    yield moto_proc
    moto_proc.thaw()  # a failed test must not leave it stopped


def artifact_keys(store) -> list[str]:
    """The store's compiled pieces: its keys but the traced models (the warm job publishes one)."""
    return [k for k in store.list_keys() if store.fetch(k).meta.get("kind") != "dynamo"]


def s3_store(s3: MotoProcess, tmp_path: Path, node: str = "a", **kw) -> ArtifactStore:
    return ArtifactStore(URL, s3.storage_options(), staging_dir=str(tmp_path / f"stage-{node}"),
                         timeout_s=TIMEOUT_S, **kw)


def on_call(store: ArtifactStore, method: str, action: Callable[[], None]) -> None:
    """Run `action` (freeze or kill the server) once, as `store` sends its next `method` request,
    i.e. after the calls before it (publish's existence check) went through."""
    fs = store._fs
    original = getattr(fs, method)

    def hooked(*args, **kwargs):
        setattr(fs, method, original)
        action()
        return original(*args, **kwargs)
    setattr(fs, method, hooked)


def freeze_then_kill(s3: MotoProcess, after_s: float = 1.0) -> tuple[Callable[[], None], list]:
    """An action freezing the server so the request sits unanswered, then SIGKILLing it."""
    timers: list[threading.Timer] = []

    def action() -> None:
        s3.freeze()
        timers.append(threading.Timer(after_s, s3.kill))
        timers[-1].start()
    return action, timers


def restart(s3: MotoProcess) -> None:
    s3.kill()
    s3.start()
    s3.create_bucket(BUCKET)  # moto keeps state in memory: a killed server comes back empty


def timed(call: Callable[[], object]) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=URL) as info:
        call()
    return info.value, time.monotonic() - start


def whole_or_nothing(s3: MotoProcess, tmp_path: Path, node: str) -> bytes | None:
    """What another node finds at K1: the whole artifact, or nothing. Never a partial one."""
    objects = s3.objects(BUCKET)
    assert all(decode_artifact(blob, name.rsplit("/", 1)[-1].removesuffix(".vcra"))
               for name, blob in objects.items() if name.endswith(".vcra"))
    try:
        return s3_store(s3, tmp_path, node).fetch(K1).payload
    except ArtifactNotFoundError:
        return None


def test_server_killed_during_publish(s3: MotoProcess, tmp_path: Path) -> None:
    store = s3_store(s3, tmp_path)
    action, timers = freeze_then_kill(s3)
    on_call(store, "pipe_file", action)
    _, elapsed = timed(lambda: store.publish(K1, PAYLOAD, META))
    timers[0].join()
    assert elapsed < BOUND_S
    assert leftover_files(store.staging_dir) == []  # nothing staged, no temp files
    restart(s3)
    assert whole_or_nothing(s3, tmp_path, "b") is None
    assert s3_store(s3, tmp_path, "c").publish(K1, PAYLOAD, META) is True  # works again


def test_server_frozen_during_publish(s3: MotoProcess, tmp_path: Path) -> None:
    """The PUT hung forever before the store bounded writes (aiohttp waits for '100 Continue'
    with no timeout); now it fails within 4 x store_timeout_s."""
    store = s3_store(s3, tmp_path)
    on_call(store, "pipe_file", s3.freeze)
    err, elapsed = timed(lambda: store.publish(K1, PAYLOAD, META))
    assert elapsed < BOUND_S and "publish" in str(err)
    assert leftover_files(store.staging_dir) == []
    s3.thaw()
    time.sleep(0.5)  # let it process whatever it had buffered
    assert whole_or_nothing(s3, tmp_path, "b") in (None, PAYLOAD)
    store = s3_store(s3, tmp_path, "c")
    assert store.publish(K1, PAYLOAD, META) in (True, False)
    assert whole_or_nothing(s3, tmp_path, "d") == PAYLOAD


def test_server_killed_during_fetch(s3: MotoProcess, tmp_path: Path) -> None:
    assert s3_store(s3, tmp_path, "a").publish(K1, PAYLOAD, META)
    reader = s3_store(s3, tmp_path, "b")  # another node: nothing staged there
    action, timers = freeze_then_kill(s3)
    on_call(reader, "cat_file", action)
    _, elapsed = timed(lambda: reader.fetch(K1))
    timers[0].join()
    assert elapsed < BOUND_S
    assert leftover_files(reader.staging_dir) == []
    restart(s3)
    assert whole_or_nothing(s3, tmp_path, "c") is None


def test_server_frozen_during_fetch(s3: MotoProcess, tmp_path: Path) -> None:
    assert s3_store(s3, tmp_path, "a").publish(K1, PAYLOAD, META)
    reader = s3_store(s3, tmp_path, "b")
    on_call(reader, "cat_file", s3.freeze)
    _, elapsed = timed(lambda: reader.fetch(K1))
    assert elapsed < BOUND_S
    assert leftover_files(reader.staging_dir) == []
    s3.freeze()  # batched fetches (async, not through cat_file) time out the same way
    _, elapsed = timed(lambda: reader.fetch_many([K1]))
    assert elapsed < BOUND_S
    s3.thaw()
    assert reader.fetch(K1).payload == PAYLOAD  # the same store object recovers
    assert leftover_files(reader.staging_dir) == [f"{K1[:2]}/{K1}.vcra"]


def _eager_config(s3: MotoProcess, tmp_path: Path, node: str, **kw) -> vcr.CompilationConfig:
    return vcr.CompilationConfig(compile_sizes=[4], **EAGER, **kw,
                                 cache=vcr.CacheConfig(cache_dir=URL,
                                                       storage_options=s3.storage_options(),
                                                       staging_dir=str(tmp_path / f"stage-{node}"),
                                                       store_timeout_s=TIMEOUT_S))


def test_frozen_store_fails_a_model_start_fast(s3: MotoProcess, tmp_path: Path) -> None:
    """End to end: a frozen S3 stops compile() at its access check, and a model whose store
    froze after start-up at its first call (the batched fetch), in seconds, never minutes."""
    model = vcr.models.build("llama-tiny", num_layers=1, seed=0)
    compiled = vcr.compile(model, _eager_config(s3, tmp_path, "a"))
    s3.freeze()
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=URL):
        compiled(torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert time.monotonic() - start < BOUND_S
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="check_access"):
        vcr.compile(model, _eager_config(s3, tmp_path, "b"))
    assert time.monotonic() - start < BOUND_S


# ---------------------------------------------------------------- damaged artifacts

class RecordingAdaptor(ExecAdaptor):
    """Executes artifacts as a real loader would, and records every payload it was handed."""

    def __init__(self) -> None:
        self.loaded: list[bytes] = []

    def load(self, artifact, graph, shape, device):
        self.loaded.append(bytes(artifact))
        return super().load(artifact, graph, shape, device)


def model_from(config: vcr.CompilationConfig) -> tuple[CompiledModel, RecordingAdaptor]:
    compiler = RecordingAdaptor()
    context = key_context(config, compiler, "cpu")
    manager = CompilerManager(config, compiler, open_store(config), "cpu", context.fingerprint_id)
    model = vcr.models.build("llama-tiny", num_layers=2, seed=0)
    return CompiledModel(model, VcrBackend(config, manager, context, "cpu", "llama-tiny")), compiler


def run(compiled: CompiledModel) -> None:
    ids, pos = torch.randint(0, 512, (4,)), torch.arange(4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), compiled.model(ids, pos))


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1:]


DAMAGE: dict[str, Callable[[str, bytes, dict], bytes]] = {
    "truncated": lambda key, blob, meta: blob[:-3],
    "bit_flipped_payload": lambda key, blob, meta: _flip(blob, len(blob) - 2),
    "bit_flipped_header": lambda key, blob, meta: _flip(blob, blob.index(b'"sha256":"') + 12),
    "garbage": lambda key, blob, meta: os.urandom(len(blob)),
    "empty": lambda key, blob, meta: b"",
    # Intact and well framed, but made for another torch/GPU (meta fingerprint) under our key.
    "foreign": lambda key, blob, meta: encode_artifact(key, b"pass\n",
                                                       {**meta, "fingerprint": "other-gpu"}),
}


@pytest.mark.parametrize("kinds", [("truncated", "bit_flipped_payload", "bit_flipped_header"),
                                   ("garbage", "empty", "foreign")], ids="-".join)
def test_damaged_artifacts_are_rejected_before_loading_then_recompiled(
        s3: MotoProcess, tmp_path: Path, kinds: tuple[str, ...]) -> None:
    """Each key of a warmed model gets one kind of damage (round robin over `kinds`)."""
    config = _eager_config(s3, tmp_path, "warm")
    warm, _ = model_from(config)
    run(warm)
    keys = warm.plan.keys
    assert len(keys) >= len(kinds)
    store = open_store(config)
    damage = {key: kinds[i % len(kinds)] for i, key in enumerate(keys)}
    for key, kind in damage.items():
        store.write_raw(key, DAMAGE[kind](key, store.read_raw(key), store.fetch(key).meta))
    loader, compiler = model_from(config.with_cache(staging_dir=str(tmp_path / "stage-gpu")))
    with loader.counter.expect(num_artifacts_rejected=len(keys), num_artifacts_loaded=0,
                               num_backend_compilations=len(keys)):
        run(loader)
    assert compiler.loaded == []  # no damaged byte reached the loader
    # The recompile's publish replaces every refused object, the foreign (intact, but made for
    # another torch/GPU under this environment's key) one included: the next loader loads all.
    again, _ = model_from(config.with_cache(staging_dir=str(tmp_path / "stage-gpu2")))
    with again.counter.expect(num_artifacts_loaded=len(keys), num_artifacts_rejected=0):
        run(again)


def test_damaged_staged_copy_is_refetched(s3: MotoProcess, tmp_path: Path) -> None:
    config = _eager_config(s3, tmp_path, "node")
    first, _ = model_from(config)
    run(first)
    keys = first.plan.keys
    store = open_store(config)
    for key in keys:  # this node's disk damaged the staged copies; the store is fine
        path = Path(store._staged_path(key))
        path.write_bytes(path.read_bytes()[:-1])
    loader, compiler = model_from(config)
    with loader.counter.expect(num_artifacts_rejected=0, num_artifacts_loaded=len(keys),
                               num_backend_compilations=0):
        run(loader)
    assert len(compiler.loaded) == len(keys)
    assert all(decode_artifact(Path(store._staged_path(k)).read_bytes(), k) for k in keys)


# ---------------------------------------------------------------- Ray: workers, drivers, races

WARM = dict(progress=None, compute=vcr.ComputeOptions(device_type="cpu", gpus_per_compile=0,
                                                   cpus_per_compile=0.5))


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_mid_compile_is_retried_and_counted_once(ray_head, tmp_path) -> None:
    from vllm_compile_ray.orchestration.compile_task import Faults
    from vllm_compile_ray.orchestration.warm import warm

    config = vcr.CompilationConfig(compile_sizes=(2,), compile_dynamic=False, **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path / "cache")))
    # Each task sits 3 s in its compile phase (after the stats actor saw it start, announced by
    # a sleeping-<pid> file); one is SIGKILLed there.
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = Faults(sleep="compile[*/2]", sleep_s=3.0, marker_dir=str(markers))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        summary=warm("llama-tiny", config, num_layers=2, faults=faults, **WARM)))
    thread.start()
    deadline = time.monotonic() + 60
    while not list(markers.glob("sleeping-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = int(sorted(markers.glob("sleeping-*"))[0].name.removeprefix("sleeping-"))
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    summary = result["summary"]
    assert (summary.compiled, summary.failed, summary.total) == (3, 0, 3), summary.errors
    store = open_store(config)
    snap = json.loads(store.get_file(summary.stats_path.removeprefix(store.url + "/")))
    assert snap["retried_tasks"] == 1
    assert snap["counter"]["num_eager_compiles"] == summary.total  # the killed attempt: not counted
    assert sorted(artifact_keys(store)) == sorted(r["key"] for r in summary.rows)


def _job(address: str, cache: str, *extra: str, storage_options: dict | None = None,
         cli: bool = False) -> list[str]:
    """A warm driver process: jobs/warm_cache.py, or `vcr warm` (cli=True; it has --staging-dir)."""
    entry = ["-m", "vllm_compile_ray", "warm"] if cli else [str(REPO / "jobs" / "warm_cache.py")]
    return [sys.executable, *entry, "--model", "llama-tiny", "--num-layers", "2", "--device", "cpu",
            "--backend", "eager", "--gpus-per-compile", "0", "--cpus-per-compile", "0.5",
            "--address", address, "--cache", cache,
            "--storage-options", json.dumps(storage_options or {}), *extra]


@pytest.mark.ray
@pytest.mark.slow
def test_driver_killed_mid_run_resumes_with_only_the_missing(ray_head, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    sizes = ["--sizes", "1,2,3,4,5,6,7,8", "--max-in-flight", "1"]
    driver = subprocess.Popen(_job(ray_head, cache, *sizes), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO)
    seen: list[str] = []
    for line in driver.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if line.startswith("compiled 3/"):
            driver.send_signal(signal.SIGKILL)
            break
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "".join(seen)
    store = ArtifactStore(cache, staging_dir=str(tmp_path / "stage"))
    present, stable_since = set(artifact_keys(store)), time.monotonic()
    while time.monotonic() - stable_since < 2:  # let Ray reap the dead driver's tasks
        time.sleep(0.2)
        now = set(artifact_keys(store))
        if now != present:
            present, stable_since = now, time.monotonic()
    out = tmp_path / "summary.json"
    rerun = subprocess.run(_job(ray_head, cache, *sizes, "--summary-json", str(out)),
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads(out.read_text())
    compiled = {r["key"] for r in summary["rows"] if r["status"] == "compiled"}
    cached = {r["key"] for r in summary["rows"] if r["status"] == "cached"}
    assert 3 <= len(present) < summary["total"] == 27
    assert compiled.isdisjoint(present) and cached >= present  # only the missing ones compiled
    assert compiled | cached == set(artifact_keys(store))
    assert all(decode_artifact(store.read_raw(k), k) for k in store.list_keys())
    shutil.rmtree(ArtifactStore(cache).staging_dir, ignore_errors=True)  # the job's default one


# A warm job as a process: warm() with every compile held 3 s after its "already published?"
# check, so two such jobs started together both compile every key and race to publish it.
RACER = """
import json, sys
from vllm_compile_ray import CacheConfig, CompilationConfig, ComputeOptions
from vllm_compile_ray.orchestration.compile_task import Faults
from vllm_compile_ray.orchestration.warm import warm
address, url, opts, staging, out = sys.argv[1:6]
config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(2,),
                           compile_dynamic=False, cache=CacheConfig(
                               cache_dir=url, storage_options=json.loads(opts), staging_dir=staging))
summary = warm("llama-tiny", config, num_layers=2, progress=None,
               compute=ComputeOptions(address=address, device_type="cpu", gpus_per_compile=0,
                                      cpus_per_compile=0.25),
               faults=Faults(sleep="compile[*]", sleep_s=3.0))
json.dump(summary.to_dict(), open(out, "w"), default=str)
sys.exit(0 if summary.ok else 1)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_two_warm_jobs_racing_publish_each_key_once(ray_head, s3: MotoProcess, tmp_path) -> None:
    opts = s3.storage_options()
    outs = [tmp_path / f"summary-{i}.json" for i in range(2)]
    jobs = [subprocess.Popen([sys.executable, "-c", RACER, ray_head, URL, json.dumps(opts),
                              str(tmp_path / f"stage-{i}"), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
            for i, out in enumerate(outs)]
    logs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], logs
    rows = [r for out in outs for r in json.loads(out.read_text())["rows"]]
    store = ArtifactStore(URL, opts, staging_dir=str(tmp_path / "stage"), timeout_s=TIMEOUT_S)
    keys = artifact_keys(store)
    assert len(keys) == 3 and sorted(keys) == sorted({r["key"] for r in rows})
    compiled = [r for r in rows if r["status"] == "compiled"]
    assert len(compiled) > len(keys), "the jobs did not race (a key compiled by one job only)"
    assert sorted(r["key"] for r in compiled if r["published"]) == sorted(keys)  # one winner each
    for key in keys:  # every compile read back the object that won, intact
        sha = hashlib.sha256(store.fetch(key).payload).hexdigest()
        assert all(r["sha256"] == sha for r in compiled if r["key"] == key)


@pytest.mark.ray
def test_signed_warm_run_signs_every_artifact_and_manifest_row(ray_head, tmp_path) -> None:
    from vllm_compile_ray.cache import manifest
    from vllm_compile_ray.orchestration.warm import warm

    priv, pub = str(tmp_path / "warm.pem"), str(tmp_path / "gpu.pub.pem")
    signer = signing.generate_ed25519_keypair(priv, pub)
    config = vcr.CompilationConfig(compile_sizes=(2,), **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=str(tmp_path / "cache"),
                                                         signing_scheme="ed25519",
                                                         signing_key_file=priv))
    summary = warm("llama-tiny", config, num_layers=2, **WARM)
    assert summary.ok and summary.compiled == summary.total
    # GPU workers hold only the public key: everything verifies, nothing unsigned slips in.
    reader = open_store(config.with_cache(signing_key_file=pub, staging_dir=str(tmp_path / "gpu")))
    assert reader.signer is None
    for key in reader.list_keys():
        assert reader.fetch(key)
    table = manifest.read_manifest(reader, "llama-tiny", summary.fingerprint_id)
    assert table.num_rows == summary.total
    key_ids = {json.loads(s)["key_id"] for s in table.column("signature").to_pylist()}
    assert key_ids == {signer.key_id}
