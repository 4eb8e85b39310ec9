"""Parquet manifests through the artifact store: memory, file and a moto S3 server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from vllm_compile_ray.cache import manifest
from vllm_compile_ray.cache.store import ArtifactStore
from vllm_compile_ray.errors import ArtifactSignatureError

FP = {"torch": "2.13.0", "device_type": "cpu", "isa": "avx2"}


def _row(key_char: str, shape: int | str, piece: str = "abc", **kw) -> dict:
    args = dict(key=key_char * 64, model="llama-tiny", tp_size=2, piece=piece, shape=shape, bytes=10,
                sha256="0" * 64, compile_seconds=1.5, node="10.0.0.1", torch="2.13.0",
                fingerprint=FP, fingerprint_id="fp1", created_at=1_700_000_000.0)
    args.update(kw)
    return manifest.make_row(**args)


@pytest.fixture(params=["memory", "file", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "memory":
        return ArtifactStore(f"memory://manifest-{id(request)}", staging_dir=str(tmp_path / "stage"))
    if request.param == "file":
        return ArtifactStore(str(tmp_path / "cache"), staging_dir=str(tmp_path / "stage"))
    bucket = request.getfixturevalue("s3_bucket")
    return ArtifactStore(f"s3://{bucket}/vcr", request.getfixturevalue("s3_store_options"),
                         staging_dir=str(tmp_path / "stage"), timeout_s=5)


def test_missing_manifest_is_empty_with_schema(store: ArtifactStore) -> None:
    table = manifest.read_manifest(store, "llama-tiny", "fp1")
    assert table.num_rows == 0 and table.schema == manifest.SCHEMA
    assert manifest.list_manifests(store) == []


def test_write_merge_read_and_list(store: ArtifactStore) -> None:
    manifest.update_manifest(store, "llama-tiny", "fp1", [_row("a", 4), _row("b", "dynamic")])
    table = manifest.update_manifest(store, "llama-tiny", "fp1",
                                     [_row("c", 1), _row("a", 4, sha256="f" * 64)])
    assert table.num_rows == 3
    back = manifest.read_manifest(store, "llama-tiny", "fp1")
    assert back.equals(table)
    rows = back.to_pylist()
    assert [r["shape"] for r in rows] == ["dynamic", "1", "4"]  # dynamic first, then by size
    assert rows[2]["sha256"] == "f" * 64  # the newer row of a key wins
    assert rows[0]["tp_size"] == 2 and rows[0]["created_at"].year == 2023
    assert '"isa":"avx2"' in rows[0]["fingerprint"]
    manifest.update_manifest(store, "org/Other Model", "fp2", [_row("d", 8, model="org/Other Model")])
    listed = manifest.list_manifests(store)
    assert [(e["model"], e["fingerprint_id"], e["rows"]) for e in listed] == [
        ("llama-tiny", "fp1", 3), ("org/Other Model", "fp2", 1)]
    assert listed[1]["path"] == "manifests/org_Other_Model/fp2.parquet"
    assert store.exists_file(listed[1]["path"])


def test_merge_is_pure_and_typed() -> None:
    table = manifest.merge(manifest.empty(), [_row("a", 2), _row("a", 2, bytes=99)])
    assert table.num_rows == 1 and table.column("bytes").to_pylist() == [99]
    assert table.schema.field("created_at").type == pa.timestamp("ms", tz="UTC")


def test_reading_a_signed_manifest_does_not_import_pandas(tmp_path) -> None:
    """A rank reads and verifies the manifest on its startup path: pyarrow's `read_table` and
    timestamp `to_pylist` import pandas (0.4-0.7 s), so neither may run there. The rows still
    carry their timestamps and their signatures verify."""
    import subprocess
    import sys
    import textwrap

    from vllm_compile_ray.cache import signing

    signer = signing.HmacKey(b"k" * 32)
    writer = ArtifactStore(str(tmp_path / "c"), signer=signer)
    manifest.update_manifest(writer, "m", "fp1", [_row("a", 4, created_at=1_700_000_000.5)])
    code = textwrap.dedent(f"""
        import sys
        from vllm_compile_ray.cache import manifest, signing
        from vllm_compile_ray.cache.store import ArtifactStore
        key = signing.HmacKey(b"k" * 32)
        store = ArtifactStore({str(tmp_path / "c")!r}, verifier=key.verifier())
        rows = signing.manifest_rows(manifest.read_manifest(store, "m", "fp1"))
        assert "pandas" not in sys.modules, "reading imported pandas"
        assert rows[0]["created_at"].timestamp() == 1_700_000_000.5, rows
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    forged = ArtifactStore(str(tmp_path / "c"), verifier=signing.HmacKey(b"x" * 32).verifier())
    with pytest.raises(ArtifactSignatureError, match="refused: it is signed by key id"):
        manifest.read_manifest(forged, "m", "fp1")
