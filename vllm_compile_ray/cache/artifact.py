"""The artifact object format (key and path checks: `artifact_keys`).

One stored object = MAGIC | u32 header length | JSON header {key, sha256, size, meta[, signature]}
| payload, so the checksum (and signature) is published atomically with the data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ArtifactCorruptError
from .artifact_keys import KEY_RE, check_key, check_relpath  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # only the types: the format calls a signer/verifier it is given
    from .signing import Signer, Verifier

MAGIC = b"VCRA1\n"
_LEN = struct.Struct(">I")
_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class Artifact:
    key: str
    payload: bytes
    meta: dict = field(default_factory=dict)  # JSON-able: piece name, shape, fingerprint, ...


def encode_artifact(key: str, payload: bytes, meta: dict | None = None,
                    signer: Signer | None = None) -> bytes:
    """Frame `payload` as MAGIC | u32 header length | JSON header | payload; with a signer the
    header carries a "signature" over key, sha256, size and meta."""
    check_key(key)
    payload = bytes(payload)
    header = {"key": key, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
              "meta": dict(meta or {})}
    try:
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if signer is not None:  # sign the meta as readers will decode it (tuples -> lists, ...)
            header["meta"] = json.loads(raw)["meta"]
            header["signature"] = signer.sign_artifact(key, header["sha256"], header["size"],
                                                       header["meta"])
            raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta of artifact {key} is not JSON-serializable: {e}") from e
    return MAGIC + _LEN.pack(len(raw)) + raw + payload


def decode_artifact(blob: bytes, expected_key: str, verifier: Verifier | None = None) -> Artifact:
    """Parse and verify a framed blob; ArtifactCorruptError names the key and what failed.

    With a verifier, an unsigned or forged header raises ArtifactSignatureError (a subclass).
    Unknown header fields are ignored so the header can grow.
    """
    def bad(why: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(f"artifact {expected_key} is corrupt: {why}")

    blob = bytes(blob)
    head = len(MAGIC) + _LEN.size
    if len(blob) < head:
        raise bad(f"truncated ({len(blob)} bytes, shorter than the frame header)")
    if not blob.startswith(MAGIC):
        raise bad(f"bad magic {blob[:len(MAGIC)]!r}")
    (hlen,) = _LEN.unpack_from(blob, len(MAGIC))
    if hlen > _MAX_HEADER or head + hlen > len(blob):
        raise bad(f"truncated or bad header length {hlen}")
    try:
        header = json.loads(blob[head:head + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    key, sha, size, meta = (header.get(f) for f in ("key", "sha256", "size", "meta"))
    if not (isinstance(key, str) and isinstance(sha, str) and type(size) is int
            and isinstance(meta, dict)):
        raise bad("header lacks key/sha256/size/meta of the right types")
    if key != expected_key:
        raise bad(f"header names key {key!r}")
    if verifier is not None:  # before anything else trusts the header
        verifier.verify_artifact(key, sha, size, meta, header.get("signature"))
    payload = blob[head + hlen:]
    if len(payload) < size:
        raise bad(f"truncated payload ({len(payload)} of {size} bytes)")
    if len(payload) > size:
        raise bad(f"{len(payload) - size} bytes of trailing garbage after the payload")
    if hashlib.sha256(payload).hexdigest() != sha:
        raise bad("sha256 mismatch")
    return Artifact(key=key, payload=payload, meta=meta)
