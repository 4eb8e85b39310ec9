"""Signed artifacts and manifest rows: forged, unsigned, swapped or replayed ones never reach a
loader, and the planted-code test proves a refused artifact never ran (and would have without
signing)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import vllm_compile_ray as vcr
from vllm_compile_ray.cache import manifest
from vllm_compile_ray.cache import signing
from vllm_compile_ray.cache.store import ArtifactStore, decode_artifact, encode_artifact
from vllm_compile_ray.compiling.compiler_interface import CompileResult, CompilerInterface
from vllm_compile_ray.errors import ArtifactCorruptError, ArtifactSignatureError, ConfigError
from vllm_compile_ray.runtime.api import CompiledModel, key_context, open_store
from vllm_compile_ray.runtime.backend import VcrBackend
from vllm_compile_ray.runtime.manager import CompilerManager

K1 = hashlib.sha256(b"piece-1").hexdigest()
K2 = hashlib.sha256(b"piece-2").hexdigest()
META = {"shape": 4, "guard": [4, 4], "compiler": "eager", "fingerprint": "fp1"}
EAGER = dict(backend="eager", use_inductor=False)


@pytest.fixture
def hmac_key(tmp_path) -> signing.HmacKey:
    return signing.generate_hmac_key(str(tmp_path / "hmac.key"))


@pytest.fixture
def ed_keys(tmp_path) -> tuple[signing.Ed25519Signer, str, str]:
    priv, pub = str(tmp_path / "ed.pem"), str(tmp_path / "ed.pub.pem")
    return signing.generate_ed25519_keypair(priv, pub), priv, pub


def store_at(tmp_path: Path, node: str, signer=None, verifier=None) -> ArtifactStore:
    """A store on a shared file:// root; `node` picks the staging dir (a simulated node)."""
    return ArtifactStore(f"file://{tmp_path}/cache", staging_dir=str(tmp_path / f"stage-{node}"),
                         signer=signer, verifier=verifier)


def header_of(blob: bytes) -> dict:
    hlen = int.from_bytes(blob[6:10], "big")
    return json.loads(blob[10:10 + hlen])


def reframe(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"VCRA1\n" + len(raw).to_bytes(4, "big") + raw + payload


# ---------------------------------------------------------------- round trips

def test_hmac_round_trip_and_signature_field(tmp_path, hmac_key) -> None:
    writer = store_at(tmp_path, "a", hmac_key, hmac_key)
    assert writer.publish(K1, b"code", META) is True
    reader = store_at(tmp_path, "b", verifier=hmac_key)
    assert reader.fetch(K1).payload == b"code"
    sig = header_of(writer.read_raw(K1))["signature"]
    assert sig["scheme"] == "hmac-sha256" and sig["key_id"] == hmac_key.key_id
    assert len(base64.b64decode(sig["value"])) == 32
    assert reader.fetch_many([K1, K2]).keys() == {K1}


def test_ed25519_public_key_verifies_but_cannot_publish(tmp_path, ed_keys) -> None:
    signer, priv, pub = ed_keys
    s_signer, s_verifier = signing.load_keys("ed25519", key_file=priv)
    assert s_signer.key_id == s_verifier.key_id == signer.key_id
    assert store_at(tmp_path, "a", s_signer, s_verifier).publish(K1, b"code", META)
    none, verifier = signing.load_keys("ed25519", key_file=pub)
    assert none is None and isinstance(verifier, signing.Ed25519Verifier)
    reader = store_at(tmp_path, "b", verifier=verifier)
    assert reader.fetch(K1).payload == b"code"
    with pytest.raises(ConfigError, match="cannot publish"):
        reader.publish(K2, b"x", META)
    with pytest.raises(ConfigError, match="no signing key"):
        reader.check_access(write=True)
    reader.check_access(write=False)
    assert not reader.contains(K2)


def test_openssh_public_key(tmp_path, ed_keys) -> None:
    from cryptography.hazmat.primitives import serialization as ser
    signer, _, pub = ed_keys
    public = ser.load_pem_public_key(Path(pub).read_bytes())
    ssh = tmp_path / "id.pub"
    ssh.write_bytes(public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH))
    _, verifier = signing.load_keys("ed25519", key_file=str(ssh))
    assert verifier.key_id == signer.key_id


def test_keys_from_env_and_open_store_wiring(tmp_path, monkeypatch) -> None:
    secret = "k" * 40
    monkeypatch.setenv("VCR_TEST_SIGNING_KEY", secret)
    cfg = vcr.CompilationConfig(**EAGER,
                                cache=vcr.CacheConfig(cache_dir=str(tmp_path / "c"),
                                                      staging_dir=str(tmp_path / "s"),
                                                      signing_scheme="hmac-sha256",
                                                      signing_key_env="VCR_TEST_SIGNING_KEY"))
    store = open_store(cfg)
    assert store.signer is store.verifier and store.signer.key_id == signing.HmacKey(
        secret.encode()).key_id
    assert secret not in repr(store.signer) and secret not in repr(store.__reduce__())
    # Signing does not change what is compiled: keys and the config hash stay the same.
    assert cfg.hashed_fields() == cfg.with_cache(signing_scheme="",
                                                 signing_key_env="").hashed_fields()
    assert open_store(cfg.with_cache(signing_scheme="", signing_key_env="")).verifier is None


@pytest.mark.parametrize("scheme", ["hmac-sha256", "ed25519"])
def test_signed_store_pickles_to_other_processes(tmp_path, scheme, hmac_key, ed_keys) -> None:
    signer = hmac_key if scheme == "hmac-sha256" else ed_keys[0]
    store = store_at(tmp_path, "a", signer, signer.verifier())
    clone = pickle.loads(pickle.dumps(store))  # what a Ray task receives
    assert clone.signer.key_id == signer.key_id and clone.verifier.key_id == signer.key_id
    assert clone.publish(K1, b"code", META)
    assert store_at(tmp_path, "b", verifier=signer.verifier()).fetch(K1).payload == b"code"


# ---------------------------------------------------------------- refusals

def _forge(kind: str, blob: bytes, hmac_key, ed_keys) -> tuple[str, bytes]:
    """(key to plant it at, forged blob) made from a genuine signed blob of K1."""
    header, payload = header_of(blob), blob[10 + int.from_bytes(blob[6:10], "big"):]
    if kind == "unsigned":
        del header["signature"]
    elif kind == "other_key":
        other = signing.HmacKey(b"x" * 32)
        header["signature"] = other.sign_artifact(K1, header["sha256"], header["size"],
                                                  header["meta"])
    elif kind == "meta_swapped":  # the genuine signature on another fingerprint's metadata
        header["meta"] = {**header["meta"], "fingerprint": "other-gpu"}
    elif kind == "payload_swapped":  # new code, consistent sha256/size, old signature
        payload = b"import os; os.system('evil')"
        header.update(sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    elif kind == "replayed_key":  # a valid artifact of K1 copied to K2
        header["key"] = K2
        return K2, reframe(header, payload)
    elif kind == "other_scheme":
        header["signature"] = ed_keys[0].sign_artifact(K1, header["sha256"], header["size"],
                                                       header["meta"])
    elif kind == "malformed":
        header["signature"] = "trust me"
    elif kind == "not_base64":
        header["signature"] = {**header["signature"], "value": "@@@"}
    return K1, reframe(header, payload)


@pytest.mark.parametrize("kind,why", [
    ("unsigned", "is unsigned, and signatures are required"),
    ("other_key", "signed by key id"),
    ("meta_swapped", "forged or altered"),
    ("payload_swapped", "forged or altered"),
    ("replayed_key", "forged or altered"),
    ("other_scheme", "scheme 'ed25519'"),
    ("malformed", "signature field is malformed"),
    ("not_base64", "not base64"),
])
def test_forged_artifacts_are_refused(tmp_path, hmac_key, ed_keys, kind: str, why: str) -> None:
    writer = store_at(tmp_path, "a", hmac_key, hmac_key)
    writer.publish(K1, b"code", META)
    key, forged = _forge(kind, writer.read_raw(K1), hmac_key, ed_keys)
    writer.write_raw(key, forged)
    assert decode_artifact(forged, key).key == key  # well framed: only the signature gives it away
    reader = store_at(tmp_path, "b", verifier=hmac_key)
    with pytest.raises(ArtifactSignatureError, match=why) as info:
        reader.fetch(key)
    assert key in str(info.value) and isinstance(info.value, ArtifactCorruptError)
    with pytest.raises(ArtifactSignatureError):
        reader.fetch_many([key])
    assert not os.path.exists(reader._staged_path(key))  # refused copies are never staged


def test_staged_copy_is_verified_too(tmp_path, hmac_key) -> None:
    node = store_at(tmp_path, "a", hmac_key, hmac_key)
    node.publish(K1, b"code", META)
    staged = node._staged_path(K1)
    Path(staged).write_bytes(encode_artifact(K1, b"local evil", META))  # unsigned, on this node
    assert node.fetch(K1).payload == b"code"  # refused, deleted, refetched and staged again
    assert header_of(Path(staged).read_bytes())["signature"]["key_id"] == hmac_key.key_id
    node.write_raw(K1, encode_artifact(K1, b"remote evil", META))
    Path(staged).write_bytes(encode_artifact(K1, b"local evil", META))
    with pytest.raises(ArtifactSignatureError):
        node.fetch(K1)
    assert not os.path.exists(staged)


def test_publish_replaces_a_forged_object(tmp_path, hmac_key) -> None:
    store = store_at(tmp_path, "a", hmac_key, hmac_key)
    store.write_raw(K1, encode_artifact(K1, b"evil", META))
    assert store.publish(K1, b"code", META) is True  # refused object replaced, not kept forever
    assert store_at(tmp_path, "b", verifier=hmac_key).fetch(K1).payload == b"code"
    assert store.publish(K1, b"other", META) is False  # a good object stays: publish once


# ---------------------------------------------------------------- planted code never runs

class ExecAdaptor(CompilerInterface):
    """Like a real Inductor loader, `load` executes the artifact's code (a Python snippet here;
    Inductor imports generated modules and dlopens kernels)."""

    name = "exec"

    def compile(self, graph, input_specs, shape, device) -> CompileResult:
        return CompileResult(graph, b"pass\n", (1, None))

    def load(self, artifact, graph, shape, device):
        exec(compile(artifact, "<artifact>", "exec"), {})
        return graph


def _compiled(config: vcr.CompilationConfig) -> CompiledModel:
    compiler = ExecAdaptor()
    context = key_context(config, compiler, "cpu")
    manager = CompilerManager(config, compiler, open_store(config), "cpu", context.fingerprint_id)
    return CompiledModel(vcr.models.build("llama-tiny", num_layers=2, seed=0),
                         VcrBackend(config, manager, context, "cpu", "llama-tiny"))


def _plant(config: vcr.CompilationConfig, marker: Path) -> list[str]:
    """Warm the cache, then overwrite every artifact with code that writes `marker`, keeping the
    genuine metadata (anyone who can write the bucket can read it). Returns the keys."""
    first = _compiled(config)
    ids, pos = torch.randint(0, 512, (4,)), torch.arange(4)
    first(ids, pos)
    store = open_store(config)
    keys = first.plan.keys
    assert first.counter.num_artifacts_saved == len(keys) > 0
    evil = f"open({str(marker)!r}, 'a').write('ran\\n')\n".encode()
    for key in keys:
        store.write_raw(key, encode_artifact(key, evil, store.fetch(key).meta))
    return keys


@pytest.mark.parametrize("signed", [True, False])
def test_planted_artifact_is_refused_and_never_runs(tmp_path, signed: bool) -> None:
    key_file = tmp_path / "hmac.key"
    signing.generate_hmac_key(str(key_file))
    marker = tmp_path / "PLANTED_CODE_RAN"
    extra = dict(signing_scheme="hmac-sha256", signing_key_file=str(key_file)) if signed else {}
    config = vcr.CompilationConfig(compile_sizes=[4], **EAGER,
                                   cache=vcr.CacheConfig(cache_dir=f"file://{tmp_path}/cache",
                                                         staging_dir=str(tmp_path / "stage-warm"),
                                                         **extra))
    keys = _plant(config, marker)
    assert not marker.exists()
    # A fresh node (its own staging dir) starts the model from the poisoned cache.
    loader = _compiled(config.with_cache(staging_dir=str(tmp_path / "stage-gpu")))
    ids, pos = torch.randint(0, 512, (4,)), torch.arange(4)
    with torch.no_grad():
        out = loader(ids, pos)
        expected = loader.model(ids, pos)
    torch.testing.assert_close(out, expected)
    if not signed:  # the control: without signing the planted code runs on load
        assert marker.exists() and loader.counter.num_artifacts_loaded == len(keys)
        return
    assert not marker.exists(), "a refused artifact's code ran"
    c = loader.counter
    assert (c.num_artifacts_rejected, c.num_artifacts_loaded) == (len(keys), 0)
    assert c.num_backend_compilations == len(keys)  # recompiled locally ...
    assert c.num_artifacts_saved == len(keys)  # ... and the refused objects replaced, signed
    again = _compiled(config.with_cache(staging_dir=str(tmp_path / "stage-gpu2")))
    again(ids, pos)
    assert again.counter.num_artifacts_loaded == len(keys) and not marker.exists()


# ---------------------------------------------------------------- manifest rows

def _row(key: str, **kw) -> dict:
    args = dict(key=key, model="llama-tiny", tp_size=1, piece="abc", shape=4, bytes=10,
                sha256="0" * 64, compile_seconds=1.25, node="10.0.0.1", torch="2.13.0",
                fingerprint={"torch": "2.13.0"}, fingerprint_id="fp1",
                created_at=1_700_000_000.123456)
    args.update(kw)
    return manifest.make_row(**args)


def test_manifest_rows_signed_and_verified(tmp_path, hmac_key) -> None:
    writer = store_at(tmp_path, "a", hmac_key, hmac_key)
    manifest.update_manifest(writer, "llama-tiny", "fp1", [_row(K1), _row(K2, shape="dynamic")])
    table = manifest.read_manifest(store_at(tmp_path, "b", verifier=hmac_key), "llama-tiny", "fp1")
    assert table.num_rows == 2 and all(json.loads(s)["key_id"] == hmac_key.key_id
                                       for s in table.column("signature").to_pylist())
    # Merged again (old rows keep verifying after the Parquet round trip of created_at).
    manifest.update_manifest(writer, "llama-tiny", "fp1", [_row(K1, bytes=11)])
    assert manifest.read_manifest(writer, "llama-tiny", "fp1").num_rows == 2


def _tamper(store: ArtifactStore, change) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = manifest.manifest_path("llama-tiny", "fp1")
    rows = pq.read_table(pa.BufferReader(store.get_file(path))).to_pylist()
    change(rows)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest.SCHEMA), buf)
    store.put_file(path, buf.getvalue().to_pybytes())


@pytest.mark.parametrize("change,why", [
    (lambda rows: rows[0].update(bytes=999), "forged or altered"),
    (lambda rows: rows[0].update(sha256="f" * 64), "forged or altered"),
    (lambda rows: rows[0].update(signature=None), "unsigned"),
    (lambda rows: rows.append({**rows[0], "key": K2}), "forged or altered"),
])
def test_tampered_manifest_rows_are_refused(tmp_path, hmac_key, change, why: str) -> None:
    store = store_at(tmp_path, "a", hmac_key, hmac_key)
    manifest.update_manifest(store, "llama-tiny", "fp1", [_row(K1)])
    _tamper(store, change)
    with pytest.raises(ArtifactSignatureError, match=why):
        manifest.read_manifest(store, "llama-tiny", "fp1")
    assert manifest.read_manifest(store_at(tmp_path, "c"), "llama-tiny", "fp1").num_rows >= 1


@pytest.mark.parametrize("bad_key", ["../../etc/passwd", "A" * 64, "ab" * 31, ""])
def test_manifest_keys_are_validated_without_signing(tmp_path, bad_key: str) -> None:
    store = store_at(tmp_path, "a")
    manifest.update_manifest(store, "llama-tiny", "fp1", [_row(K1)])
    _tamper(store, lambda rows: rows.append({**rows[0], "key": bad_key}))
    with pytest.raises(ArtifactCorruptError, match="invalid artifact key"):
        manifest.read_manifest(store, "llama-tiny", "fp1")
