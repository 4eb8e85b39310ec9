"""Signed artifacts: who may put code into the cache that every GPU worker will run.

A compiled artifact is executable code. With signing configured, the warm job (and any process
that publishes) signs each artifact's header, and every reader verifies the signature before the
payload reaches a loader; unsigned or forged artifacts are refused (`ArtifactSignatureError`).

Schemes:
    hmac-sha256  one shared secret (>= 32 bytes) signs and verifies.
    ed25519      a PEM private key signs (and verifies); a PEM or OpenSSH public key only verifies,
                 so GPU workers can hold a key that cannot publish.

The signed message covers the artifact key, the payload's sha256 and size, and the canonical JSON
of its metadata, behind a domain tag: neither the payload nor the metadata can be swapped, and a
valid signature cannot be moved to another key. Manifest rows are signed the same way over all
their columns (`sign_manifest_row`, `sign_manifest`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from ..config import CacheConfig
from ..errors import ArtifactCorruptError, ArtifactSignatureError, ConfigError
from ..keys import canonical_json
from .artifact_keys import check_key

SCHEMES = ("hmac-sha256", "ed25519")
MIN_HMAC_KEY_BYTES = 32
_ARTIFACT_TAG = b"vcr-artifact-signature-v1\n"
_MANIFEST_TAG = b"vcr-manifest-row-signature-v1\n"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def artifact_message(key: str, sha256: str, size: int, meta: Mapping[str, Any]) -> bytes:
    """The bytes an artifact signature covers."""
    body = {"key": key, "sha256": sha256, "size": size, "meta": dict(meta)}
    return _ARTIFACT_TAG + canonical_json(body).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Verifier(ABC):
    """Checks signatures of one scheme and key; `key_id` names the key without revealing it."""

    scheme: str
    key_id: str

    @abstractmethod
    def _valid(self, message: bytes, signature: bytes) -> bool: ...

    def check(self, message: bytes, signature: Any, what: str) -> None:
        """Raise ArtifactSignatureError naming `what` unless `signature` (a header's "signature"
        field) is this key's valid signature of `message`."""
        def refuse(why: str) -> ArtifactSignatureError:
            return ArtifactSignatureError(f"{what} refused: {why}")

        if signature is None:
            raise refuse(f"it is unsigned, and signatures are required (scheme {self.scheme}, "
                         f"key id {self.key_id})")
        if not (isinstance(signature, dict) and all(
                isinstance(signature.get(f), str) for f in ("scheme", "key_id", "value"))):
            raise refuse("its signature field is malformed (expected scheme, key_id, value)")
        if signature["scheme"] != self.scheme:
            raise refuse(f"it is signed with scheme {signature['scheme']!r}, this process "
                         f"verifies {self.scheme!r}")
        if signature["key_id"] != self.key_id:
            raise refuse(f"it is signed by key id {signature['key_id']!r}, this process trusts "
                         f"key id {self.key_id!r}")
        try:
            raw = base64.b64decode(signature["value"], validate=True)
        except ValueError:
            raise refuse("its signature value is not base64") from None
        if not self._valid(message, raw):
            raise refuse("the signature does not match its key, sha256, size and metadata "
                         "(forged or altered)")

    def verify_artifact(self, key: str, sha256: str, size: int, meta: Mapping[str, Any],
                        signature: Any) -> None:
        self.check(artifact_message(key, sha256, size, meta), signature, f"artifact {key}")


class Signer(ABC):
    """Signs with one key. Every signer can also verify what it signs (`verifier()`)."""

    scheme: str
    key_id: str

    @abstractmethod
    def _sign(self, message: bytes) -> bytes: ...

    @abstractmethod
    def verifier(self) -> Verifier: ...

    def sign(self, message: bytes) -> dict[str, str]:
        """The header "signature" field for `message`."""
        return {"scheme": self.scheme, "key_id": self.key_id, "value": _b64(self._sign(message))}

    def sign_artifact(self, key: str, sha256: str, size: int,
                      meta: Mapping[str, Any]) -> dict[str, str]:
        return self.sign(artifact_message(key, sha256, size, meta))


class HmacKey(Signer, Verifier):
    """HMAC-SHA256 with a shared secret: signs and verifies."""

    scheme = "hmac-sha256"

    def __init__(self, secret: bytes):
        if len(secret) < MIN_HMAC_KEY_BYTES:
            raise ConfigError(f"HMAC signing key is {len(secret)} bytes; hmac-sha256 needs at "
                              f"least {MIN_HMAC_KEY_BYTES} (e.g. `openssl rand -hex 32`)")
        self._secret = bytes(secret)
        self.key_id = hashlib.sha256(b"vcr-hmac-key-id\n" + self._secret).hexdigest()[:16]

    def __repr__(self) -> str:  # never the secret
        return f"HmacKey(key_id={self.key_id!r})"

    def _sign(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def _valid(self, message: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self._sign(message), signature)

    def verifier(self) -> Verifier:
        return self


def _ed25519_key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class Ed25519Verifier(Verifier):
    """Ed25519 public key: verifies only."""

    scheme = "ed25519"

    def __init__(self, public_raw: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._public_raw = bytes(public_raw)
        self._key = Ed25519PublicKey.from_public_bytes(self._public_raw)
        self.key_id = _ed25519_key_id(self._public_raw)

    def __reduce__(self) -> tuple:  # cryptography's key objects do not pickle
        return (Ed25519Verifier, (self._public_raw,))

    def __repr__(self) -> str:
        return f"Ed25519Verifier(key_id={self.key_id!r})"

    def _valid(self, message: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(signature, message)
            return True
        except InvalidSignature:
            return False


class Ed25519Signer(Signer):
    """Ed25519 private key: signs; `verifier()` holds only its public half."""

    scheme = "ed25519"

    def __init__(self, private_raw: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._private_raw = bytes(private_raw)
        self._key = Ed25519PrivateKey.from_private_bytes(self._private_raw)
        self._verifier = Ed25519Verifier(_raw_public(self._key.public_key()))
        self.key_id = self._verifier.key_id

    def __reduce__(self) -> tuple:
        return (Ed25519Signer, (self._private_raw,))

    def __repr__(self) -> str:
        return f"Ed25519Signer(key_id={self.key_id!r})"

    def _sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def verifier(self) -> Verifier:
        return self._verifier


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------- keys from files and env vars

def _ed25519_from_pem(data: bytes, source: str) -> Ed25519Signer | Ed25519Verifier:
    if importlib.util.find_spec("cryptography") is None:
        raise ConfigError("signing_scheme='ed25519' needs the `cryptography` package "
                          "(pip install cryptography); hmac-sha256 needs nothing extra")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    text = data.strip()
    try:
        if b"PRIVATE KEY" in text:
            key: Any = serialization.load_pem_private_key(text, password=None)
        elif text.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(text)
        else:
            key = serialization.load_pem_public_key(text)
    except TypeError as exc:  # "Password was not given but private key is encrypted"
        raise ConfigError(f"Ed25519 signing key from {source} is password-protected; give an "
                          f"unencrypted PEM key ({exc})") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"Ed25519 signing key from {source} is not a PEM Ed25519 private or "
                          f"public key (nor an OpenSSH ssh-ed25519 public key): "
                          f"{type(exc).__name__}: {exc}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return Ed25519Signer(key.private_bytes(serialization.Encoding.Raw,
                                               serialization.PrivateFormat.Raw,
                                               serialization.NoEncryption()))
    if isinstance(key, ed25519.Ed25519PublicKey):
        return Ed25519Verifier(_raw_public(key))
    kind = type(key).__name__.lstrip("_")
    raise ConfigError(f"signing key from {source} is {'an' if kind[0] in 'AEIOU' else 'a'} "
                      f"{kind}, not an Ed25519 key (signing_scheme='ed25519')")


def _read_key(key_file: str, key_env: str, environ: Mapping[str, str]) -> tuple[bytes, str]:
    """(key bytes, where they came from); ConfigError naming the file or variable."""
    if key_file:
        source = f"signing_key_file {key_file!r}"
        try:
            with open(os.path.expanduser(key_file), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{source} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"{source} is a directory, not a key file") from None
        except PermissionError as exc:
            raise ConfigError(f"{source} is not readable: {exc}") from None
    else:
        source = f"environment variable {key_env!r} (signing_key_env)"
        value = environ.get(key_env)
        if value is None:
            raise ConfigError(f"{source} is not set")
        data = value.encode()
    if not data.strip():
        raise ConfigError(f"{source} is empty")
    return data, source


def load_keys(scheme: str, key_file: str = "", key_env: str = "",
              environ: Mapping[str, str] | None = None) -> tuple[Signer | None, Verifier | None]:
    """(signer, verifier) for a scheme and one key source; (None, None) when scheme is "".

    An Ed25519 public key gives (None, verifier): the process verifies but cannot publish.
    """
    if not scheme:
        if key_file or key_env:
            raise ConfigError("a signing key is given but signing_scheme is empty; "
                              f"set signing_scheme to one of {SCHEMES}")
        return None, None
    if scheme not in SCHEMES:
        raise ConfigError(f"signing_scheme={scheme!r} is invalid: allowed {SCHEMES} or ''")
    if bool(key_file) == bool(key_env):
        raise ConfigError(f"signing_scheme={scheme!r} needs exactly one key source: "
                          "signing_key_file or signing_key_env")
    data, source = _read_key(key_file, key_env, os.environ if environ is None else environ)
    if scheme == "hmac-sha256":
        try:
            key = HmacKey(data.strip())
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return key, key
    key = _ed25519_from_pem(data, source)
    if isinstance(key, Ed25519Signer):
        return key, key.verifier()
    return None, key


def from_config(config: CacheConfig, environ: Mapping[str, str] | None = None
                ) -> tuple[Signer | None, Verifier | None]:
    """`load_keys` for a CacheConfig's signing_scheme / signing_key_file / signing_key_env.
    Called at the edge (`api.open_store`), where the environment may be read."""
    return load_keys(config.signing_scheme, config.signing_key_file, config.signing_key_env,
                     environ)


def generate_hmac_key(path: str) -> HmacKey:
    """Write a fresh 32-byte hex secret to `path` (mode 0600) and return the key."""
    secret = os.urandom(32).hex().encode()
    _write_private(path, secret + b"\n")
    return HmacKey(secret)


def generate_ed25519_keypair(private_path: str, public_path: str) -> Ed25519Signer:
    """Write a PEM private key (mode 0600) and its PEM public key; return the signer."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    _write_private(private_path, key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                   ser.NoEncryption()))
    with open(public_path, "wb") as f:
        f.write(key.public_key().public_bytes(ser.Encoding.PEM,
                                              ser.PublicFormat.SubjectPublicKeyInfo))
    return Ed25519Signer(key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw,
                                           ser.NoEncryption()))


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- manifest rows

def _json_value(value: Any) -> Any:
    """Manifest cell -> canonical JSON value (timestamps as integer milliseconds since the epoch,
    the manifest's own precision, so a Parquet round trip does not change the message)."""
    if isinstance(value, datetime):
        when = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return {"ms": (when - _EPOCH) // timedelta(milliseconds=1)}
    return value


def manifest_rows(table: Any) -> list[dict[str, Any]]:
    """A pyarrow manifest table's rows as dicts, timestamps as UTC datetimes. Not `to_pylist`
    on the timestamp column: that imports pandas (0.4-0.7 s on a rank's startup)."""
    import pyarrow as pa

    stamps = [f for f in table.schema if pa.types.is_timestamp(f.type)]
    rows = table.drop_columns([f.name for f in stamps]).to_pylist()
    for f in stamps:
        per_ms = {"s": 1e-3, "ms": 1, "us": 1e3, "ns": 1e6}[f.type.unit]
        for row, n in zip(rows, table.column(f.name).cast(pa.int64()).to_pylist()):
            row[f.name] = None if n is None else _EPOCH + timedelta(milliseconds=n / per_ms)
    return rows


def manifest_row_message(row: Mapping[str, Any]) -> bytes:
    """The bytes a manifest row's signature covers: every column but "signature"."""
    body = {k: _json_value(v) for k, v in row.items() if k != "signature"}
    return _MANIFEST_TAG + canonical_json(body).encode()


def sign_manifest_row(row: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """`row` plus a "signature" column (canonical JSON of the signature field)."""
    return {**row, "signature": canonical_json(signer.sign(manifest_row_message(row)))}


def verify_manifest_row(row: Mapping[str, Any], verifier: Verifier | None = None,
                        where: str = "manifest") -> None:
    """Validate a manifest row read from the store: its key must be an artifact key (so no path
    built from it escapes the cache prefix) and, with a verifier, its signature must hold."""
    key = row.get("key")
    try:
        check_key(key)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ArtifactCorruptError(f"{where}: row has {exc}") from None
    if verifier is None:
        return
    raw = row.get("signature")
    try:
        signature = None if raw in (None, "") else json.loads(raw)
    except ValueError:
        signature = raw  # refused below as malformed
    verifier.check(manifest_row_message(row), signature, f"{where} row for artifact {key}")


def sign_manifest(table: Any, signer: Signer) -> Any:
    """A pyarrow manifest table with its "signature" column (re)computed for every row."""
    import pyarrow as pa

    if "signature" in table.column_names:
        table = table.drop_columns(["signature"])
    rows = manifest_rows(table)  # after the cast to the manifest schema: values as stored
    sigs = [sign_manifest_row(row, signer)["signature"] for row in rows]
    return table.append_column("signature", pa.array(sigs, pa.string()))


def verify_manifest(table: Any, verifier: Verifier | None = None,
                    where: str = "manifest") -> None:
    """Every row of a pyarrow manifest table passes `verify_manifest_row`."""
    for row in manifest_rows(table):
        verify_manifest_row(row, verifier, where)
