"""Bad input, as a table: every case must fail with a clear error naming the problem, leave nothing
half-written behind (no new files, no new objects), and, where the CLI takes the same input,
make `vcr` exit non-zero with the same message and no traceback.

Add a case: one `Case(...)` row in CASES (and `cli=[...]` when `vcr` can be given the input).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import vllm_compile_ray as vcr
from s3proc import MotoProcess, leftover_files
from vllm_compile_ray import models
from vllm_compile_ray.cache import manifest
from vllm_compile_ray.cache import signing
from vllm_compile_ray.cache.store import ArtifactStore
from vllm_compile_ray.cli import main as vcr_main
from vllm_compile_ray.config import CACHE_FIELDS
from vllm_compile_ray.errors import (
    ArtifactCorruptError,
    CacheMissError,
    ConfigError,
    StoreError,
    StorePermissionError,
    UnknownModelError,
)
from vllm_compile_ray.runtime.api import open_store

K1 = hashlib.sha256(b"bad-input").hexdigest()
EAGER = dict(backend="eager", use_inductor=False)


@dataclass
class Ctx:
    """What a case works in: a fresh tmp dir, and S3 options when the case needs a server."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    s3_opts: dict = field(default_factory=dict)
    s3_url: str = ""
    data: dict = field(default_factory=dict)  # what setup made, for the call and the CLI argv

    def cache(self) -> str:
        return str(self.tmp / "cache")


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], Any]
    error: type[BaseException]
    match: str  # regex the message must contain
    setup: Callable[[Ctx], None] | None = None
    needs: str = ""  # "s3": the conftest moto server; "s3auth": a moto process that checks IAM
    cli: Callable[[Ctx], list[str]] | None = None  # the same input through `vcr`
    cli_match: str = ""  # defaults to `match`


def config(**kw: Any) -> vcr.CompilationConfig:
    """An eager CompilationConfig; CacheConfig's fields in `kw` go to its `cache`."""
    cache = {name: kw.pop(name) for name in CACHE_FIELDS if name in kw}
    return vcr.CompilationConfig(**{**EAGER, **kw}, cache=vcr.CacheConfig(**cache))


def store_of(ctx: Ctx, **kw: Any) -> ArtifactStore:
    return open_store(config(cache_dir=ctx.cache(), staging_dir=str(ctx.tmp / "stage"), **kw))


# ---------------------------------------------------------------- setups

def write(name: str, data: bytes | str, mode: int = 0o600) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(mode)
    return setup


def ec_key(ctx: Ctx) -> None:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    (ctx.tmp / "ec.pem").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                       ser.NoEncryption()))


def encrypted_ed25519(ctx: Ctx) -> None:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    pem = Ed25519PrivateKey.generate().private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw"))
    (ctx.tmp / "enc.pem").write_bytes(pem)


def manifest_with(change: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    """A cache with a good manifest of llama-tiny/fp1, then `change` applied to it."""
    def setup(ctx: Ctx) -> None:
        store = store_of(ctx)
        row = manifest.make_row(key=K1, model="llama-tiny", tp_size=1, piece="abc", shape=4,
                                bytes=1, sha256="0" * 64, compile_seconds=0.1, node="n",
                                torch="2.13.0", fingerprint={}, fingerprint_id="fp1")
        manifest.update_manifest(store, "llama-tiny", "fp1", [row])
        change(ctx)
    return setup


def overwrite(relpath: str, data: bytes) -> Callable[[Ctx], None]:
    return lambda ctx: store_of(ctx).put_file(relpath, data)


def bad_key_row(ctx: Ctx) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    store = store_of(ctx)
    path = manifest.manifest_path("llama-tiny", "fp1")
    rows = pq.read_table(pa.BufferReader(store.get_file(path))).to_pylist()
    rows.append({**rows[0], "key": "../../../etc/passwd"})
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest.SCHEMA), buf)
    store.put_file(path, buf.getvalue().to_pybytes())


def other_schema(ctx: Ctx) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": [K1], "colour": ["blue"]}), buf)
    store_of(ctx).put_file(manifest.manifest_path("llama-tiny", "fp1"), buf.getvalue().to_pybytes())


def corrupt_artifact(ctx: Ctx) -> None:
    store = ArtifactStore(ctx.cache(), staging_dir=str(ctx.tmp / "stage-writer"))
    store.publish(K1, b"payload", {"shape": 4})
    store.write_raw(K1, store.read_raw(K1)[:-2])


def read_manifest(ctx: Ctx) -> Any:
    return manifest.read_manifest(store_of(ctx), "llama-tiny", "fp1")


def s3_store(ctx: Ctx, **opts: Any) -> ArtifactStore:
    return ArtifactStore(ctx.s3_url, {**ctx.s3_opts, **opts}, staging_dir=str(ctx.tmp / "stage"),
                         timeout_s=5)


# ---------------------------------------------------------------- the table

LS = lambda ctx: ["ls", "--cache", ctx.cache()]  # noqa: E731
LOAD = ["load", "--model", "llama-tiny", "--num-layers", "1", "--device", "cpu",
        "--backend", "eager"]
WARM = ["warm", "--model", "llama-tiny", "--device", "cpu", "--backend", "eager"]

CASES = [
    # -- config values: ConfigError naming the field and what is allowed
    Case("level", lambda c: config(compilation_level="fast"), ConfigError,
         r"compilation_level='fast'.*allowed: \('piecewise', 'dynamo_once'\)"),
    Case("backend", lambda c: config(backend="tvm", use_inductor=False), ConfigError,
         r"backend='tvm'.*allowed"),
    Case("use_inductor_type", lambda c: vcr.CompilationConfig(use_inductor="yes"), ConfigError,
         r"use_inductor='yes'.*True or False"),
    Case("size_zero", lambda c: config(compile_sizes=[0]), ConfigError,
         r"compile_sizes.*entry 0 is not a positive int",
         cli=lambda c: [*WARM, "--sizes", "0", "--cache", c.cache()]),
    Case("sizes_string", lambda c: config(compile_sizes="1,2"), ConfigError,
         r"compile_sizes='1,2'.*list of positive ints"),
    Case("no_shapes", lambda c: config(compile_sizes=(), compile_dynamic=False), ConfigError,
         r"at least one size when compile_dynamic is False",
         cli=lambda c: [*WARM, "--no-dynamic", "--cache", c.cache()]),
    Case("timeout_zero", lambda c: config(store_timeout_s=0), ConfigError,
         r"store_timeout_s=0.*seconds > 0"),
    Case("compile_time_type", lambda c: config(max_compile_time="10"), ConfigError,
         r"max_compile_time='10'.*seconds > 0",
         cli=lambda c: [*WARM, "--max-compile-time", "0", "--cache", c.cache()],
         cli_match=r"max_compile_time=0\.0.*seconds > 0"),
    Case("on_miss", lambda c: config(on_miss="ignore"), ConfigError,
         r"on_miss='ignore'.*allowed.*compile_and_publish"),
    Case("splitting_op", lambda c: config(splitting_ops=["attention"]), ConfigError,
         r"splitting_ops.*'attention'.*namespace::op"),
    Case("inductor_config", lambda c: config(inductor_compile_config={"x": object()}), ConfigError,
         r"inductor_compile_config.*JSON-serializable",
         cli=lambda c: [*WARM, "--inductor-config", "[1]", "--cache", c.cache()],
         cli_match=r"expected a JSON object"),
    Case("config_json", lambda c: vcr.CompilationConfig.from_json("{"), ConfigError,
         r"not valid JSON"),
    Case("config_field", lambda c: vcr.CompilationConfig.from_dict({"cache": {"url": "/x"}}),
         ConfigError, r"CacheConfig has no field\(s\) \['url'\]; allowed"),
    Case("config_cache", lambda c: vcr.CompilationConfig(cache="/x"), ConfigError,
         r"CompilationConfig.cache='/x' is invalid: must be a CacheConfig"),
    # -- signing configuration and keys
    Case("signing_scheme", lambda c: config(signing_scheme="rsa"), ConfigError,
         r"signing_scheme='rsa'.*allowed: \('', 'hmac-sha256', 'ed25519'\)"),
    Case("signing_no_key", lambda c: config(signing_scheme="hmac-sha256"), ConfigError,
         r"exactly one key source.*neither"),
    Case("signing_two_keys", lambda c: config(signing_scheme="ed25519", signing_key_file="/k",
                                              signing_key_env="K"), ConfigError,
         r"exactly one key source"),
    Case("signing_key_no_scheme", lambda c: config(signing_key_file="/k"), ConfigError,
         r"signing_key_file='/k'.*needs signing_scheme"),
    Case("signing_env_name", lambda c: config(signing_scheme="hmac-sha256",
                                              signing_key_env="s3cr3t key!"), ConfigError,
         r"environment variable name"),
    Case("key_file_missing", lambda c: store_of(c, signing_scheme="hmac-sha256",
                                                signing_key_file=str(c.tmp / "nope.key")),
         ConfigError, r"signing_key_file '.*nope.key' does not exist"),
    Case("key_file_is_dir", lambda c: store_of(c, signing_scheme="hmac-sha256",
                                               signing_key_file=str(c.tmp)),
         ConfigError, r"is a directory, not a key file"),
    Case("key_env_unset", lambda c: store_of(c, signing_scheme="hmac-sha256",
                                             signing_key_env="VCR_NO_SUCH_KEY_VAR"),
         ConfigError, r"environment variable 'VCR_NO_SUCH_KEY_VAR'.*is not set"),
    Case("hmac_key_short", lambda c: store_of(c, signing_scheme="hmac-sha256",
                                              signing_key_file=str(c.tmp / "short.key")),
         ConfigError, r"short.key.*is 8 bytes; hmac-sha256 needs at least 32",
         setup=write("short.key", "12345678\n")),
    Case("ed25519_garbage", lambda c: store_of(c, signing_scheme="ed25519",
                                               signing_key_file=str(c.tmp / "junk.pem")),
         ConfigError, r"junk.pem.*not a PEM Ed25519 private or public key",
         setup=write("junk.pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")),
    Case("ed25519_wrong_type", lambda c: store_of(c, signing_scheme="ed25519",
                                                  signing_key_file=str(c.tmp / "ec.pem")),
         ConfigError, r"ec.pem' is an? \w*PrivateKey, not an Ed25519 key", setup=ec_key),
    Case("ed25519_encrypted", lambda c: store_of(c, signing_scheme="ed25519",
                                                 signing_key_file=str(c.tmp / "enc.pem")),
         ConfigError, r"enc.pem.*password-protected", setup=encrypted_ed25519),
    # -- model names
    Case("model_unknown", lambda c: models.build("llama-9000"), UnknownModelError,
         r"unknown model preset 'llama-9000'; known presets: \[.*'llama-tiny'",
         cli=lambda c: ["plan", "--model", "llama-9000", "--device", "cpu"]),
    Case("cache_miss", lambda c: vcr.load(models.build("llama-tiny", num_layers=1), config(
        compile_sizes=[2], on_miss="error", cache_dir=c.cache(), staging_dir=str(c.tmp / "st"))),
         CacheMissError, r"\d+ of \d+ compiled pieces are missing from .*cache \(on_miss='error'\)"
                         r"(.|\n)*Fill the cache with: vcr warm",
         cli=lambda c: [*LOAD, "--sizes", "2", "--on-miss", "error", "--cache", c.cache(),
                        "--staging-dir", str(c.tmp / "st")]),
    Case("model_type", lambda c: models.build(42), ConfigError,
         r"model must be a preset name, a config.json path or directory, a config dict or a "
         r"ModelConfig, got int"),
    # -- URLs
    Case("url_protocol", lambda c: open_store(config(cache_dir="nosuch://bucket/x")), ConfigError,
         r"unknown protocol 'nosuch'; common ones are s3",
         cli=lambda c: ["ls", "--cache", "nosuch://bucket/x"]),
    Case("url_chained", lambda c: ArtifactStore("simplecache::s3://b/x"), ConfigError,
         r"chained URLs are not supported"),
    Case("url_type", lambda c: config(cache_dir=123), ConfigError,
         r"cache_dir=123.*must be a string"),
    Case("url_shape", lambda c: config(cache_dir="S3://Bucket/x"), ConfigError,
         r"cache_dir='S3://Bucket/x'.*expected an fsspec URL"),
    Case("url_missing_bucket", lambda c: vcr.compile(models.build("llama-tiny", num_layers=1),
                                                     config(cache_dir="s3://no-such-bucket/x",
                                                            storage_options=c.s3_opts)),
         StoreError, r"bucket 'no-such-bucket' does not exist", needs="s3",
         cli=lambda c: ["verify", "--cache", "s3://no-such-bucket/x", "--storage-options",
                        json.dumps(c.s3_opts)]),
    # -- storage options
    Case("options_type", lambda c: config(storage_options="key=x"), ConfigError,
         r"storage_options='key=x'.*must be a dict",
         cli=lambda c: [*LS(c), "--storage-options", "key=x"], cli_match=r"expected a JSON object"),
    Case("options_unknown_s3", lambda c: s3_store(c, endpoint="http://127.0.0.1:1"), ConfigError,
         r"unknown s3 option\(s\) \['endpoint'\]; allowed: \[.*'endpoint_url'", needs="s3",
         cli=lambda c: ["ls", "--cache", c.s3_url, "--storage-options",
                        json.dumps({**c.s3_opts, "endpoint": "x"})]),
    Case("options_s3_type", lambda c: s3_store(c, client_kwargs="http://127.0.0.1:1"),
         ConfigError, r"storage_options\['client_kwargs'\].*must be dict, got str", needs="s3"),
    Case("options_s3_bool", lambda c: s3_store(c, anon="yes"), ConfigError,
         r"storage_options\['anon'\].*must be bool", needs="s3"),
    Case("options_not_dict", lambda c: ArtifactStore("memory://x", storage_options=["a"]),
         ConfigError, r"storage_options must be a dict of fsspec options, got list"),
    # -- permissions
    Case("cache_under_file", lambda c: vcr.compile(models.build("llama-tiny", num_layers=1),
                                                   config(cache_dir=f"file://{c.tmp}/afile/cache")),
         StorePermissionError, r"not permitted \(check_access on store .*afile/cache",
         setup=write("afile", "x")),
    Case("s3_access_denied", lambda c: s3_store(c).check_access(), StorePermissionError,
         r"access denied \(check_access on store 's3://vcr-bad/x'\)", needs="s3auth"),
    Case("publish_without_private_key",
         lambda c: store_of(c, signing_scheme="ed25519", signing_key_file=str(c.tmp / "pub.pem"))
         .check_access(write=True),
         ConfigError, r"verifies signatures but holds no signing key",
         setup=lambda c: signing.generate_ed25519_keypair(str(c.tmp / "priv.pem"),
                                                          str(c.tmp / "pub.pem"))),
    # -- corrupt manifests and artifacts
    Case("manifest_garbage", read_manifest, ArtifactCorruptError,
         r"manifest .*manifests/llama-tiny/fp1.parquet is corrupt",
         setup=manifest_with(overwrite(manifest.manifest_path("llama-tiny", "fp1"), b"PAR1junk")),
         cli=LS, cli_match=r"fp1.parquet is corrupt"),
    Case("manifest_schema", read_manifest, ArtifactCorruptError,
         r"fp1.parquet is corrupt or not a manifest of this schema",
         setup=manifest_with(other_schema), cli=LS, cli_match="not a manifest of this schema"),
    Case("manifest_bad_key", read_manifest, ArtifactCorruptError,
         r"fp1.parquet: row has invalid artifact key '../../../etc/passwd'",
         setup=manifest_with(bad_key_row), cli=LS, cli_match="invalid artifact key"),
    Case("manifest_index_json", lambda c: manifest.list_manifests(store_of(c)),
         ArtifactCorruptError, r"manifest index .*manifests/index.json is not JSON",
         setup=manifest_with(overwrite(manifest.INDEX_PATH, b"{not json")), cli=LS),
    Case("manifest_index_shape", lambda c: manifest.list_manifests(store_of(c)),
         ArtifactCorruptError, r"manifests/index.json is malformed",
         setup=manifest_with(overwrite(manifest.INDEX_PATH, b'{"manifests": [1]}')), cli=LS),
    Case("artifact_truncated", lambda c: store_of(c).fetch(K1), ArtifactCorruptError,
         r"artifact [0-9a-f]{64} is corrupt: truncated payload", setup=corrupt_artifact,
         cli=lambda c: ["verify", "--cache", c.cache()], cli_match=r"1 corrupt"),
]
assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------- running a case

@pytest.fixture(scope="module")
def moto_auth(tmp_path_factory) -> Iterator[MotoProcess]:
    """A moto process with IAM checks on: the test credentials are not valid there."""
    server = MotoProcess(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                         log_path=str(tmp_path_factory.mktemp("moto-auth") / "moto.log")).start()
    yield server
    server.stop()


@pytest.fixture
def ctx(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    case: Case = request.param
    out = Ctx(tmp_path, monkeypatch)
    if case.needs == "s3":
        out.s3_url = f"s3://{request.getfixturevalue('s3_bucket')}/x"
        out.s3_opts = request.getfixturevalue("s3_store_options")
    elif case.needs == "s3auth":
        out.s3_url = "s3://vcr-bad/x"
        out.s3_opts = request.getfixturevalue("moto_auth").storage_options()
    if case.setup:
        case.setup(out)
    return out


def files(root: Path) -> set[str]:
    """Files under `root`; staging lock files do not count (they hold no data)."""
    return set(leftover_files(root))


@pytest.mark.parametrize("ctx", CASES, ids=[c.id for c in CASES], indirect=True)
def test_bad_input_is_a_clear_error(ctx: Ctx, request: pytest.FixtureRequest) -> None:
    case: Case = request.node.callspec.params["ctx"]
    before = files(ctx.tmp)
    with pytest.raises(case.error, match=case.match):
        case.call(ctx)
    assert files(ctx.tmp) == before  # nothing half-written


CLI_CASES = [c for c in CASES if c.cli]


@pytest.mark.parametrize("ctx", CLI_CASES, ids=[c.id for c in CLI_CASES], indirect=True)
def test_cli_exits_non_zero_naming_the_problem(ctx: Ctx, request: pytest.FixtureRequest,
                                               capsys: pytest.CaptureFixture) -> None:
    case: Case = request.node.callspec.params["ctx"]
    before = files(ctx.tmp)
    code = vcr_main(case.cli(ctx))
    out, err = capsys.readouterr()
    assert code not in (0, None), out + err
    assert "Traceback" not in out + err
    assert re.search(case.cli_match or case.match, out + err), out + err
    assert files(ctx.tmp) == before


def test_cli_entry_point_exit_code(tmp_path: Path) -> None:
    """The installed `vcr` script (a real process) exits non-zero on bad input."""
    proc = subprocess.run(["vcr", "ls", "--cache", "nosuch://b/x"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown protocol 'nosuch'" in proc.stderr


# ---------------------------------------------------------------- disks: full, read-only

@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at `path` (root only); yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a tmpfs: the staging temp file write fails as a full disk would."""
    import vllm_compile_ray.cache.store as store_mod
    real = store_mod._tmp_write

    def full(path: str, data: bytes, fsync: bool) -> str:
        if "/stage" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, data, fsync)
    monkeypatch.setattr(store_mod, "_tmp_write", full)


@pytest.mark.parametrize("op", ["fetch", "publish"])
def test_full_staging_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    stage = tmp_path / "stage"
    payload = os.urandom(256 << 10)  # larger than the 64 KiB disk
    with tmpfs(stage, "size=64k") as mounted:
        if not mounted:
            _no_space(monkeypatch)
        writer = ArtifactStore(str(tmp_path / "cache"), staging_dir=str(tmp_path / "stage-w"))
        store = ArtifactStore(str(tmp_path / "cache"), staging_dir=str(stage))
        if op == "fetch":
            writer.publish(K1, payload, {"shape": 4})
            call = lambda: store.fetch(K1)  # noqa: E731
        else:
            call = lambda: store.publish(K1, payload, {"shape": 4})  # noqa: E731
        with pytest.raises(StoreError, match=rf"stage {K1} on store '{stage}'.*No space left"):
            call()
        assert [p for p in stage.rglob("*") if p.is_file()] == []  # no partial temp file
        # The shared store holds the whole artifact either way; a later fetch elsewhere works.
        assert writer.fetch(K1).payload == payload


def test_read_only_staging_dir(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    writer = ArtifactStore(str(tmp_path / "cache"), staging_dir=str(tmp_path / "stage-w"))
    writer.publish(K1, b"payload", {"shape": 4})
    with tmpfs(stage, "ro,size=64k") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a read-only tmpfs (root ignores chmod)")
        store = ArtifactStore(str(tmp_path / "cache"), staging_dir=str(stage))
        with pytest.raises(StorePermissionError, match=rf"not permitted \(stage {K1} on store "
                                                       rf"'{stage}'\).*Read-only file system"):
            store.fetch(K1)


def test_read_only_cache_dir(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with tmpfs(cache, "ro,size=64k") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a read-only tmpfs (root ignores chmod)")
        store = ArtifactStore(str(cache), staging_dir=str(tmp_path / "stage"))
        store.check_access(write=False)  # reading is fine
        with pytest.raises(StorePermissionError, match=rf"check_access on store '{cache}'"):
            store.check_access(write=True)
        with pytest.raises(StorePermissionError, match=rf"publish {K1}.*Read-only"):
            store.publish(K1, b"x")
        assert not (tmp_path / "stage").exists() or files(tmp_path / "stage") == set()


def test_unsigned_cache_with_signing_on_is_refused_not_loaded(tmp_path: Path) -> None:
    """Turning signing on over an old unsigned cache: its artifacts are refused (and recompiled
    by on_miss), never loaded."""
    cache = str(tmp_path / "cache")
    ArtifactStore(cache, staging_dir=str(tmp_path / "s1")).publish(
        K1, b"old", {"shape": 4})
    key = signing.generate_hmac_key(str(tmp_path / "k"))
    store = ArtifactStore(cache, staging_dir=str(tmp_path / "s2"), signer=key, verifier=key)
    with pytest.raises(ArtifactCorruptError, match="unsigned"):
        store.fetch(K1)
    assert store.publish(K1, b"new", {"shape": 4}) is True  # replaced, signed
    assert store.fetch(K1).payload == b"new"
