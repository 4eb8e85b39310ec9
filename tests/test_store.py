"""ArtifactStore conformance suite, run against memory://, file:// and a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import fsspec
import pytest

from vllm_compile_ray.cache.store import (
    MAGIC,
    Artifact,
    ArtifactStore,
    decode_artifact,
    encode_artifact,
)
from vllm_compile_ray.cache.store_errors import translate
from vllm_compile_ray.errors import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ConfigError,
    StoreConflictError,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
)

MakeStore = Callable[..., ArtifactStore]


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


K1, K2, K3 = key_of("piece-1"), key_of("piece-2"), key_of("piece-3")


@pytest.fixture(params=["memory", "file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[tuple[str, dict]]:
    """(url, storage_options) of an empty store on each backend."""
    if request.param == "memory":
        name = f"vcr-{uuid.uuid4().hex}"
        yield f"memory://{name}", {}
        mem = fsspec.filesystem("memory")
        if mem.exists(f"/{name}"):
            mem.rm(f"/{name}", recursive=True)
    elif request.param == "file":
        # tmp_path holds "[file]": keeps glob characters in the root covered.
        yield f"file://{tmp_path / 'store'}", {}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/cache", request.getfixturevalue("s3_store_options")


@pytest.fixture
def make_store(backend: tuple[str, dict], tmp_path) -> MakeStore:
    """Stores on one backend; each `node` name gets its own staging dir (a simulated node)."""
    url, opts = backend

    def make(node: str = "a", **kw) -> ArtifactStore:
        return ArtifactStore(url, opts, staging_dir=str(tmp_path / f"staging-{node}"), **kw)
    return make


def staged_path(store: ArtifactStore, key: str) -> str:
    return os.path.join(store.staging_dir, key[:2], key + ".vcra")


# ---------------------------------------------------------------- conformance (every backend)

def test_publish_fetch_round_trip(make_store: MakeStore) -> None:
    a = make_store("a")
    assert a.publish(K1, b"\x00payload\xff", {"piece": "attn", "shape": [8, 4096]}) is True
    art = a.fetch(K1)
    assert art == Artifact(K1, b"\x00payload\xff", {"piece": "attn", "shape": [8, 4096]})
    assert os.path.exists(staged_path(a, K1))  # publish stages
    fresh = make_store("b")  # another node: must read the remote object
    assert not os.path.exists(staged_path(fresh, K1))
    assert fresh.fetch(K1) == art
    assert os.path.exists(staged_path(fresh, K1))
    assert decode_artifact(fresh.read_raw(K1), K1) == art


def test_publish_once(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    assert a.publish(K1, b"first", {"v": 1}) is True
    raw = a.read_raw(K1)
    assert b.publish(K1, b"second", {"v": 2}) is False
    assert a.publish(K1, b"third") is False
    assert a.read_raw(K1) == raw
    assert make_store("c").fetch(K1).payload == b"first"
    assert b.fetch(K1).meta == {"v": 1}


def test_publish_race_after_existence_check(make_store: MakeStore, monkeypatch) -> None:
    """A publisher that passed the existence check still loses to the first writer."""
    a, b = make_store("a"), make_store("b")
    if a.url.startswith("memory://"):
        pytest.skip("memory:// checks and writes under one process-wide lock")
    assert a.publish(K1, b"first") is True
    monkeypatch.setattr(b._fs, "exists", lambda path: False)  # as if the race was lost
    assert b.publish(K1, b"second") is False
    monkeypatch.undo()
    assert make_store("c").fetch(K1).payload == b"first"


def test_contains_and_contains_many(make_store: MakeStore) -> None:
    a = make_store("a")
    assert a.contains(K1) is False
    a.publish(K1, b"x")
    a.publish(K2, b"y")
    assert a.contains(K1) is True
    b = make_store("b")  # nothing staged: answers come from the remote
    assert b.contains(K2) is True
    assert b.contains_many([K1, K2, K3]) == {K1: True, K2: True, K3: False}
    assert b.contains_many([]) == {}


def test_fetch_missing_and_fetch_many(make_store: MakeStore) -> None:
    a = make_store("a")
    with pytest.raises(ArtifactNotFoundError, match=K1):
        a.fetch(K1)
    a.publish(K1, b"one", {"i": 1})
    a.publish(K2, b"two", {"i": 2})
    b = make_store("b")
    b.fetch(K1)  # K1 staged on b, K2 remote only, K3 missing
    got = b.fetch_many([K1, K2, K3, K2])
    assert set(got) == {K1, K2}
    assert got[K1].payload == b"one" and got[K2].meta == {"i": 2}
    assert os.path.exists(staged_path(b, K2))
    assert b.fetch_many([K3]) == {}


def test_staging_hit_after_remote_delete(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    a.publish(K1, b"kept locally")
    b.delete(K1)  # another node's gc removes the remote object
    b.delete(K1)  # idempotent
    assert b.contains(K1) is False
    with pytest.raises(ArtifactNotFoundError):
        b.fetch(K1)
    assert a.fetch(K1).payload == b"kept locally"
    assert a.fetch_many([K1])[K1].payload == b"kept locally"
    a.delete(K1)  # removes a's staged copy too
    assert a.contains(K1) is False


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "zeros"])
def test_corrupt_staged_copy_is_refetched(make_store: MakeStore, damage: str) -> None:
    a = make_store("a")
    a.publish(K1, b"payload" * 100)
    path = staged_path(a, K1)
    blob = open(path, "rb").read()
    bad = {"truncate": blob[:-5], "bitflip": blob[:-1] + bytes([blob[-1] ^ 1]),
           "zeros": bytes(len(blob))}[damage]
    with open(path, "wb") as f:
        f.write(bad)
    assert a.fetch(K1).payload == b"payload" * 100
    assert open(path, "rb").read() == blob  # repaired from the remote
    with open(path, "wb") as f:
        f.write(bad)
    assert a.fetch_many([K1])[K1].payload == b"payload" * 100


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "foreign_key", "trailing", "empty"])
def test_corrupt_remote_object_raises(make_store: MakeStore, damage: str) -> None:
    a = make_store("a")
    a.publish(K1, b"payload" * 100)
    blob = a.read_raw(K1)
    bad = {"truncate": blob[:-5], "bitflip": blob[:-1] + bytes([blob[-1] ^ 1]),
           "foreign_key": encode_artifact(K2, b"payload" * 100, {}),
           "trailing": blob + b"junk", "empty": b""}[damage]
    a.write_raw(K1, bad)
    b = make_store("b")
    with pytest.raises(ArtifactCorruptError, match=K1):
        b.fetch(K1)
    with pytest.raises(ArtifactCorruptError, match=K1):
        b.fetch_many([K2, K1])
    assert not os.path.exists(staged_path(b, K1))  # never stage what failed verification


BAD_KEYS = ["", "abc", K1.upper(), K1[:-1], K1 + "0", "g" * 64, "../" + K1[3:],
            K1[:62] + "/x", " " + K1[1:]]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_invalid_keys_rejected(make_store: MakeStore, bad: str) -> None:
    a = make_store("a")
    calls = [lambda: a.publish(bad, b"x"), lambda: a.fetch(bad), lambda: a.contains(bad),
             lambda: a.contains_many([K1, bad]), lambda: a.fetch_many([K1, bad]),
             lambda: a.delete(bad), lambda: a.read_raw(bad), lambda: a.write_raw(bad, b"x"),
             lambda: encode_artifact(bad, b"x", {})]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert repr(bad) in str(info.value)
    assert a.list_keys() == []


@pytest.mark.parametrize("bad", ["", "/abs", "../up", "a/../b", "a//b", "a/", ".", "a/./b",
                                 "a b", "a\\b", "ma~nifest", "x\n",
                                 "artifacts/00/x.vcra", "artifacts"])
def test_invalid_relpaths_rejected(make_store: MakeStore, bad: str) -> None:
    a = make_store("a")
    for call in (lambda: a.put_file(bad, b"x"), lambda: a.get_file(bad),
                 lambda: a.exists_file(bad)):
        with pytest.raises(ValueError, match="invalid relative path"):
            call()


def test_concurrent_publishers_one_winner(make_store: MakeStore) -> None:
    n = 6
    stores = [make_store(f"n{i}") for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[bool | BaseException] = [False] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stores[i].publish(K1, f"payload-{i}".encode() * 1000)
        except BaseException as e:  # surfaced by the assertion below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, bool) for r in results), results
    assert results.count(True) == 1
    winner = results.index(True)
    for s in stores + [make_store("reader")]:
        assert s.fetch(K1).payload == f"payload-{winner}".encode() * 1000


def test_side_files(make_store: MakeStore) -> None:
    a = make_store("a")
    assert a.exists_file("manifest.parquet") is False
    with pytest.raises(ArtifactNotFoundError, match="manifest.parquet"):
        a.get_file("manifest.parquet")
    a.put_file("manifest.parquet", b"v1")
    a.put_file("stats/node-1/snap.json", b'{"n": 1}')
    assert a.get_file("manifest.parquet") == b"v1"
    assert a.exists_file("stats/node-1/snap.json") is True
    a.put_file("manifest.parquet", b"v2")
    assert make_store("b").get_file("manifest.parquet") == b"v2"
    with pytest.raises(StoreConflictError):
        a.put_file("manifest.parquet", b"v3", overwrite=False)
    assert a.get_file("manifest.parquet") == b"v2"
    a.put_file("lock.json", b"mine", overwrite=False)
    assert a.get_file("lock.json") == b"mine"
    assert a.list_keys() == []  # side files are not artifacts


def test_list_keys_and_delete(make_store: MakeStore) -> None:
    a = make_store("a")
    assert a.list_keys() == []
    for k in (K3, K1, K2):
        a.publish(k, k.encode())
    assert a.list_keys() == sorted([K1, K2, K3])
    a.delete(K2)
    assert a.list_keys() == sorted([K1, K3])
    assert a.contains(K2) is False  # no stale listing cache


def test_pickle_round_trip(make_store: MakeStore) -> None:
    a = make_store("a", timeout_s=7.0)
    a.publish(K1, b"pickled")  # the filesystem exists now; it must not travel
    data = pickle.dumps(a)
    assert len(data) < 2000
    b = pickle.loads(data)
    assert (b.url, b.storage_options, b.staging_dir, b.timeout_s) == (
        a.url, a.storage_options, a.staging_dir, 7.0)
    assert b._fs_obj is None
    assert b.fetch(K1).payload == b"pickled"
    assert b.publish(K2, b"from the copy") is True
    assert a.fetch(K2).payload == b"from the copy"


def test_check_access_ok(make_store: MakeStore) -> None:
    a = make_store("a")
    a.check_access(write=True)
    a.check_access(write=False)
    assert a.list_keys() == []


# ---------------------------------------------------------------- failure modes

def test_unreachable_endpoint_fails_fast(tmp_path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    url = "s3://vcr-test/cache"
    opts = {"key": "k", "secret": "s", "client_kwargs": {
        "endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    store = ArtifactStore(url, opts, staging_dir=str(tmp_path / "st"))
    for call in (store.check_access, lambda: store.fetch(K1), lambda: store.publish(K1, b"x"),
                 lambda: store.contains_many([K1, K2])):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError, match=url):
            call()
        assert time.monotonic() - t0 < 15


def test_frozen_server_times_out(tmp_path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # the kernel accepts connections; nobody ever answers
    try:
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        opts = {"key": "k", "secret": "s",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        store = ArtifactStore("s3://vcr-test/c", opts, staging_dir=str(tmp_path), timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="timeout"):
            store.fetch(K1)
        assert time.monotonic() - t0 < 15
    finally:
        sock.close()


def test_missing_bucket_is_a_clear_error(s3_bucket: str, s3_store_options: dict, tmp_path) -> None:
    store = ArtifactStore("s3://no-such-bucket/cache", s3_store_options, staging_dir=str(tmp_path))
    for call in (store.check_access, lambda: store.publish(K1, b"x"), lambda: store.fetch(K1),
                 lambda: store.fetch_many([K1])):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as info:
            call()
        assert not isinstance(info.value, ArtifactNotFoundError)


def test_s3_default_timeouts_and_user_overrides(s3_store_options: dict) -> None:
    store = ArtifactStore("s3://vcr-test/c", s3_store_options, timeout_s=3)
    cfg = store._make_fs().config_kwargs
    assert cfg["connect_timeout"] == 5 and cfg["read_timeout"] == 3
    assert cfg["retries"]["max_attempts"] <= 3
    opts = {**s3_store_options, "config_kwargs": {"read_timeout": 99}}
    assert ArtifactStore("s3://vcr-test/c", opts)._make_fs().config_kwargs["read_timeout"] == 99
    assert "config_kwargs" not in s3_store_options  # the caller's dict is not mutated


def test_s3_reads_are_one_get_each(s3_bucket: str, s3_store_options: dict, tmp_path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """A whole-object read is one GET, never HEAD + GET (s3fs sizes objects first unless told)."""
    url = f"s3://{s3_bucket}/c"
    a = ArtifactStore(url, s3_store_options, staging_dir=str(tmp_path / "a"))
    a.publish(K1, b"one", {})
    a.publish(K2, b"two", {})
    a.put_file("side.json", b"{}")
    b = ArtifactStore(url, s3_store_options, staging_dir=str(tmp_path / "b"))  # a new node
    with caplog.at_level(logging.DEBUG, logger="s3fs"):
        assert b.fetch(K1).payload == b"one"
        assert set(b.fetch_many([K2, K3])) == {K2}
        assert b.get_file("side.json") == b"{}"
    calls = [r.getMessage().split()[1] for r in caplog.records
             if r.name == "s3fs" and r.getMessage().startswith("CALL:")]
    assert sorted(calls) == ["get_object"] * 4


def test_local_path_under_a_file_is_not_writable(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    store = ArtifactStore(f"file://{afile}/sub", staging_dir=str(tmp_path / "st"))
    with pytest.raises(StorePermissionError, match="check_access"):
        store.check_access(write=True)
    with pytest.raises(StorePermissionError, match=str(afile)):
        store.publish(K1, b"x")
    with pytest.raises(StorePermissionError):
        store.put_file("manifest.parquet", b"x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        store = ArtifactStore(str(root), staging_dir=str(tmp_path / "st"))
        with pytest.raises(StorePermissionError):
            store.check_access(write=True)
        store.check_access(write=False)
    finally:
        root.chmod(0o755)


def test_plain_path_url_and_default_staging_dir(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path / "plain"))
    assert store.staging_dir.startswith(os.path.expanduser("~/.cache/vllm_compile_ray/staging/"))
    assert store.staging_dir != ArtifactStore(str(tmp_path / "other")).staging_dir
    store = ArtifactStore(str(tmp_path / "plain"), staging_dir=str(tmp_path / "st"))
    assert store.publish(K1, b"x") is True
    assert (tmp_path / "plain" / "artifacts" / K1[:2] / f"{K1}.vcra").exists()


def test_unknown_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="foo") as info:
        ArtifactStore("foo://bucket/x")
    for proto in ("s3", "gs", "az", "file", "memory"):
        assert proto in str(info.value)
    with pytest.raises(ConfigError, match="timeout_s"):
        ArtifactStore("memory://x", timeout_s=0)
    with pytest.raises(ConfigError, match="chained"):
        ArtifactStore("simplecache::s3://b/x")


@pytest.mark.parametrize("url,package", [("gs://b/x", "gcsfs"), ("az://c/x", "adlfs")])
def test_missing_backend_package_is_a_config_error(url: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ConfigError, match=package):
        ArtifactStore(url)


# ---------------------------------------------------------------- framing and error mapping

def test_encode_decode_round_trip_and_extensible_header() -> None:
    blob = encode_artifact(K1, b"abc", {"piece": "mlp"})
    assert blob.startswith(MAGIC)
    assert decode_artifact(blob, K1) == Artifact(K1, b"abc", {"piece": "mlp"})
    hlen = int.from_bytes(blob[6:10], "big")
    header = json.loads(blob[10:10 + hlen])
    header["signature"] = "future-field"
    raw = json.dumps(header).encode()
    assert decode_artifact(MAGIC + len(raw).to_bytes(4, "big") + raw + b"abc", K1).payload == b"abc"
    with pytest.raises(ValueError, match=K1):
        encode_artifact(K1, b"x", {"bad": object()})


def _frame(header: object, payload: bytes, raw: bytes | None = None) -> bytes:
    raw = json.dumps(header).encode() if raw is None else raw
    return MAGIC + len(raw).to_bytes(4, "big") + raw + payload


GOOD = {"key": K1, "sha256": hashlib.sha256(b"abc").hexdigest(), "size": 3, "meta": {}}


@pytest.mark.parametrize("blob,why", [
    (b"VCRA1", "truncated"),
    (b"VCRA2\n" + _frame(GOOD, b"abc")[6:], "magic"),
    (_frame(GOOD, b"abc")[:12], "header length"),
    (_frame(GOOD, b"ab"), "truncated payload"),
    (_frame(GOOD, b"abcd"), "trailing garbage"),
    (_frame(None, b"abc", raw=b"{not json"), "JSON"),
    (_frame(None, b"abc", raw=b"\xff\xfe"), "UTF-8"),
    (_frame([1, 2], b"abc"), "not a JSON object"),
    (_frame({**GOOD, "size": "3"}, b"abc"), "types"),
    (_frame({k: v for k, v in GOOD.items() if k != "meta"}, b"abc"), "meta"),
    (_frame(GOOD, b"abd"), "sha256 mismatch"),
    (_frame({**GOOD, "key": K2}, b"abc"), "header names key"),
    (MAGIC + (2**31).to_bytes(4, "big") + b"{}", "header length"),
])
def test_decode_rejects(blob: bytes, why: str) -> None:
    assert decode_artifact(_frame(GOOD, b"abc"), K1).payload == b"abc"  # the control is valid
    with pytest.raises(ArtifactCorruptError, match=why) as info:
        decode_artifact(blob, K1)
    assert K1 in str(info.value)


def _boto_errors() -> list[tuple[BaseException, type]]:
    botocore = pytest.importorskip("botocore.exceptions")
    aiohttp = pytest.importorskip("aiohttp")
    no_bucket = FileNotFoundError("The specified bucket does not exist")
    no_bucket.__cause__ = botocore.ClientError(
        {"Error": {"Code": "NoSuchBucket", "Message": "nope"}}, "PutObject")
    return [
        (botocore.EndpointConnectionError(endpoint_url="http://x"), StoreUnavailableError),
        (botocore.ConnectTimeoutError(endpoint_url="http://x"), StoreUnavailableError),
        (botocore.ReadTimeoutError(endpoint_url="http://x"), StoreUnavailableError),
        (aiohttp.ClientPayloadError("cut"), StoreUnavailableError),
        (ConnectionResetError("reset"), StoreUnavailableError),
        (TimeoutError("slow"), StoreUnavailableError),
        (PermissionError("Access Denied"), StorePermissionError),
        (botocore.ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"),
         StorePermissionError),
        (botocore.NoCredentialsError(), StorePermissionError),
        (no_bucket, StoreError),
        (FileNotFoundError("x"), ArtifactNotFoundError),
        (FileExistsError("x"), StoreConflictError),
        (OSError(5, "EIO"), StoreError),
    ]


def test_translate_errors_maps_backend_failures() -> None:
    for exc, expected in _boto_errors():
        out = translate(exc, "s3://b/p", "fetch", K1)
        assert type(out) is expected, (exc, out)
        assert "s3://b/p" in str(out) and "fetch" in str(out)
    assert "bucket 'b' does not exist" in str(translate(_boto_errors()[9][0], "s3://b/p", "x"))
    bug = TypeError("a bug")
    assert translate(bug, "s3://b/p", "fetch") is bug  # programming errors pass through


def test_fetch_many_can_collect_corrupt_objects_instead_of_raising(make_store: MakeStore) -> None:
    store = make_store()
    good, bad = "a" * 64, "b" * 64
    store.publish(good, b"good", {})
    store.publish(bad, b"bad", {})
    raw = bytearray(store.read_raw(bad))
    raw[-1] ^= 0xFF
    store.write_raw(bad, bytes(raw))
    import shutil
    shutil.rmtree(store.staging_dir, ignore_errors=True)  # force the remote read
    rejected: dict = {}
    found = store.fetch_many([good, bad, "c" * 64], rejected=rejected)
    assert list(found) == [good] and list(rejected) == [bad]
    assert isinstance(rejected[bad], ArtifactCorruptError)
    assert not os.path.exists(os.path.join(store.staging_dir, bad[:2], bad + ".vcra"))
    with pytest.raises(ArtifactCorruptError):
        store.fetch_many([good, bad])
