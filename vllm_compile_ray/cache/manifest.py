"""Parquet manifests: one per (model, fingerprint), one row per artifact, so loaders and `ls`
never list the bucket.

    <cache>/manifests/<model>/<fingerprint_id>.parquet   the rows
    <cache>/manifests/index.json                          which manifests exist

Read-merge-write without a lock: two runs writing the same manifest at the same moment can drop
the other's new rows (the artifacts stay; the next warm run lists them again).
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArtifactCorruptError, ArtifactNotFoundError
from . import signing
from .store import ArtifactStore

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("model", pa.string()),
    ("tp_size", pa.int32()),
    ("piece", pa.string()),  # code id of the canonical piece
    ("shape", pa.string()),  # "dynamic" or a size
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("compile_seconds", pa.float64()),
    ("node", pa.string()),
    ("torch", pa.string()),
    ("fingerprint_id", pa.string()),
    ("fingerprint", pa.string()),  # canonical JSON of the environment fingerprint
    ("created_at", pa.timestamp("ms", tz="UTC")),
    ("signature", pa.string()),  # signing.sign_manifest, when the store has a signer; else null
])
INDEX_PATH = "manifests/index.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(model: str) -> str:
    """A model name usable as one path segment ("org/Model 7B" -> "org_Model_7B")."""
    name = _UNSAFE.sub("_", model).strip("._") or "model"
    return name


def manifest_path(model: str, fingerprint_id: str) -> str:
    return f"manifests/{safe_name(model)}/{safe_name(fingerprint_id)}.parquet"


def stats_path(model: str, fingerprint_id: str) -> str:
    """The stats snapshot of the latest warm run, next to the manifest."""
    return f"manifests/{safe_name(model)}/{safe_name(fingerprint_id)}.stats.json"


def make_row(*, key: str, model: str, tp_size: int, piece: str, shape: int | str, bytes: int,
             sha256: str, compile_seconds: float, node: str, torch: str,
             fingerprint: dict[str, str], fingerprint_id: str,
             created_at: float | None = None) -> dict[str, Any]:
    """One manifest row; `created_at` is a Unix time (now when None)."""
    when = datetime.fromtimestamp(time.time() if created_at is None else created_at, timezone.utc)
    return {"key": key, "model": model, "tp_size": int(tp_size), "piece": piece, "shape": str(shape),
            "bytes": int(bytes), "sha256": sha256, "compile_seconds": float(compile_seconds),
            "node": node, "torch": torch, "fingerprint_id": fingerprint_id,
            "fingerprint": json.dumps(fingerprint, sort_keys=True, separators=(",", ":")),
            "created_at": when}


def empty() -> pa.Table:
    return SCHEMA.empty_table()


def merge(table: pa.Table, rows: Iterable[dict[str, Any]]) -> pa.Table:
    """`table` plus `rows`; a row replaces an older one of the same key. Sorted by piece, shape."""
    merged = {row["key"]: row for row in signing.manifest_rows(table)}
    merged.update((row["key"], row) for row in rows)
    ordered = sorted(merged.values(), key=lambda r: (r["piece"], _shape_order(r["shape"]), r["key"]))
    return pa.Table.from_pylist(ordered, schema=SCHEMA)


def _shape_order(shape: str) -> tuple[int, int]:
    return (0, 0) if shape == "dynamic" else (1, int(shape) if shape.isdigit() else 0)


def read_manifest(store: ArtifactStore, model: str, fingerprint_id: str) -> pa.Table:
    """The manifest's rows (an empty table with the schema if there is none yet)."""
    path = manifest_path(model, fingerprint_id)
    try:
        data = store.get_file(path)
    except ArtifactNotFoundError:
        return empty()
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()  # read_table imports pandas
        if "signature" not in table.column_names:  # written before manifests were signed
            table = table.append_column("signature", pa.nulls(table.num_rows, pa.string()))
        table = table.cast(SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise ArtifactCorruptError(f"manifest {store.url}/{path} is corrupt or not a manifest "
                                   f"of this schema: {exc}") from None
    # Keys must be artifact keys; with a verifier, every row must carry a valid signature.
    signing.verify_manifest(table, store.verifier, where=f"manifest {store.url}/{path}")
    return table


def write_manifest(store: ArtifactStore, model: str, fingerprint_id: str, table: pa.Table) -> str:
    """Replace the manifest with `table` and list it in the index; returns its relative path."""
    buf = io.BytesIO()
    table = table.cast(SCHEMA)
    if store.signer is not None:
        table = signing.sign_manifest(table, store.signer)
    pq.write_table(table, buf, compression="zstd")
    path = manifest_path(model, fingerprint_id)
    store.put_file(path, buf.getvalue())
    _update_index(store, {"model": model, "fingerprint_id": fingerprint_id, "path": path,
                          "rows": table.num_rows, "updated_at": time.time()})
    return path


def update_manifest(store: ArtifactStore, model: str, fingerprint_id: str,
                    rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Merge `rows` into the stored manifest (read just before writing) and write it back."""
    table = merge(read_manifest(store, model, fingerprint_id), rows)
    write_manifest(store, model, fingerprint_id, table)
    return table


def list_manifests(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every manifest in the store: model, fingerprint_id, path, rows, updated_at (from the index)."""
    try:
        index = json.loads(store.get_file(INDEX_PATH))
    except ArtifactNotFoundError:
        return []
    except ValueError as exc:
        raise ArtifactCorruptError(f"manifest index {store.url}/{INDEX_PATH} is not JSON: "
                                   f"{exc}") from None
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("model"), str)
            and isinstance(e.get("fingerprint_id"), str) for e in entries):
        raise ArtifactCorruptError(f"manifest index {store.url}/{INDEX_PATH} is malformed: "
                                   "expected {\"manifests\": [{\"model\": str, "
                                   "\"fingerprint_id\": str, ...}]}")
    return sorted(entries, key=lambda e: (e["model"], e["fingerprint_id"]))


def other_environments(store: ArtifactStore, model: str, fingerprint_id: str
                       ) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """`model`'s manifests warmed under another environment fingerprint, newest first: each
    index entry with the fingerprint its rows record."""
    found = []
    for entry in sorted(list_manifests(store), key=lambda e: -float(e.get("updated_at") or 0)):
        if entry["model"] == model and entry["fingerprint_id"] != fingerprint_id:
            table = read_manifest(store, model, entry["fingerprint_id"])
            if table.num_rows:
                found.append((entry, json.loads(table.column("fingerprint")[0].as_py())))
    return found


# What the fingerprint's hashed fields stand for, said where one differs.
_HASHED = {"torch_key": "another build of torch",
           "inductor_config": "Inductor options (TORCHINDUCTOR_* variables or config set in the "
                              "process)",
           "functorch_config": "AOTAutograd (functorch) options"}


def environment_difference(here: dict[str, str], there: dict[str, str]) -> list[str]:
    """"field: there's value there, here's value here" for each fingerprint field that differs."""
    return [f"{k}: {there.get(k, '(none)')} there, {here.get(k, '(none)')} here"
            + (f" ({_HASHED[k]})" if k in _HASHED else "")
            for k in sorted(set(here) | set(there)) if here.get(k) != there.get(k)]


def _update_index(store: ArtifactStore, entry: dict[str, Any]) -> None:
    current = [e for e in list_manifests(store) if e["path"] != entry["path"]]
    body = {"version": 1, "manifests": sorted(current + [entry], key=lambda e: e["path"])}
    store.put_file(INDEX_PATH, json.dumps(body, indent=1, sort_keys=True).encode())
