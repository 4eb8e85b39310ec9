"""Artifact store over fsspec: publish once, verify sha256 on every read, stage node-locally.

Layout under the store root: `artifacts/<key[:2]>/<key>.vcra` plus small side files (manifest,
stats) at validated relative paths. One object = one framed blob (magic, header length, JSON
header with key/sha256/size/meta, payload) so the checksum is published atomically with the data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from ..errors import ArtifactCorruptError, ArtifactNotFoundError, ConfigError, StoreError
from .artifact import (MAGIC, Artifact, check_key, check_relpath, decode_artifact,
                       encode_artifact, KEY_RE as _KEY_RE)
from .local_files import link_new, replace_file
from .s3_options import check_s3_options as _check_s3_options
from .store_errors import translate, translate_errors
from .store_fs import S3_PROTOCOLS as _S3
from .store_fs import filesystem_class, gather, open_filesystem, read_options

if TYPE_CHECKING:  # only the types; the store never signs or verifies itself
    from .signing import Signer, Verifier

log = logging.getLogger(__name__)

_SUFFIX = ".vcra"
# memory:// lives in this process only, so one lock makes its check-then-write publish exact.
_MEMORY_LOCK = threading.Lock()
# aiohttp starts its read timeout only once a request body is written, and botocore sends PUTs
# with "Expect: 100-continue", which aiohttp awaits with no timeout: a frozen S3 server hung a
# publish forever (tests/test_faults.py). Writes on async backends therefore get an overall
# deadline (fsspec `sync(timeout=)`): 4 x timeout_s plus the body at this many bytes/s.
_MIN_WRITE_RATE = 1 << 20


class ArtifactStore:
    """Publish-once artifact store at `url` with a node-local, verified staging directory."""

    def __init__(self, url: str, storage_options: dict | None = None,
                 staging_dir: str | None = None, timeout_s: float = 30.0,
                 signer: Signer | None = None, verifier: Verifier | None = None):
        """signer: signs what this store publishes. verifier: when set, every artifact read
        (remote or staged) must carry its valid signature, else ArtifactSignatureError."""
        if not isinstance(url, str) or not url:
            raise ConfigError(f"store url must be a non-empty string, got {url!r}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigError(f"storage_options must be a dict of fsspec options, got "
                              f"{type(storage_options).__name__} {storage_options!r}")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.timeout_s = float(timeout_s)
        self.signer = signer
        self.verifier = verifier
        self._protocol, cls = filesystem_class(url)
        if self._protocol in _S3:
            _check_s3_options(url, self.storage_options)
        self._root = cls._strip_protocol(url).rstrip("/")
        if staging_dir is None:
            tag = hashlib.sha256(url.encode()).hexdigest()[:16]
            staging_dir = os.path.join(os.path.expanduser("~/.cache/vllm_compile_ray/staging"), tag)
        self.staging_dir = os.path.abspath(staging_dir)
        self._fs_obj: Any = None
        self._fs_lock = threading.Lock()

    def __reduce__(self) -> tuple[Callable[..., ArtifactStore], tuple]:
        # Only the configuration travels; each process builds its own filesystem lazily.
        return (ArtifactStore, (self.url, self.storage_options, self.staging_dir, self.timeout_s,
                                self.signer, self.verifier))

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r}, staging_dir={self.staging_dir!r})"

    # ---- filesystem and paths ----
    @property
    def _fs(self) -> Any:
        with self._fs_lock:
            if self._fs_obj is None:
                self._fs_obj = self._make_fs()
            return self._fs_obj

    def _make_fs(self) -> Any:
        return open_filesystem(self._protocol, self.storage_options, self.timeout_s)

    def _path(self, key: str) -> str:
        return f"{self._root}/artifacts/{key[:2]}/{key}{_SUFFIX}"

    def _side_path(self, relpath: str) -> str:
        return f"{self._root}/{check_relpath(relpath)}"

    def _staged_path(self, key: str) -> str:
        return os.path.join(self.staging_dir, key[:2], key + _SUFFIX)

    def _gather(self, fn: Callable[..., Any], afn_name: str, paths: list[str],
                **kwargs: Any) -> list[Any]:
        """Run one call per path concurrently (async backends) or in turn; exceptions returned."""
        return gather(self._fs, fn, afn_name, paths, **kwargs)

    def _read(self, path: str) -> bytes:
        """A whole object's bytes (one request on S3: `read_options`)."""
        return self._fs.cat_file(path, **read_options(self._protocol))

    # ---- access ----
    def check_access(self, write: bool = True) -> None:
        """Fail fast with a clear StoreError if the store is unreachable, missing or unwritable."""
        with translate_errors(self.url, "check_access"):
            fs = self._fs
            if self._protocol in _S3:
                bucket = self._root.split("/", 1)[0]
                try:
                    fs.call_s3("head_bucket", Bucket=bucket)
                except FileNotFoundError as e:
                    msg = f"bucket {bucket!r} does not exist (store {self.url!r})"
                    raise StoreError(msg) from e
            else:
                fs.exists(self._root)  # a round trip: reachability and credentials
            if write and self.verifier is not None and self.signer is None:
                raise ConfigError(f"store {self.url!r} verifies signatures but holds no signing "
                                  f"key (key id {self.verifier.key_id} is a public key): it cannot "
                                  "publish; give the private key, or on_miss='compile'/'error'")
            if write:
                probe = self._side_path(f".vcr-access-probe-{uuid.uuid4().hex}")
                self._put(probe, b"", overwrite=True)
                fs.rm_file(probe)

    # ---- artifacts ----
    def contains(self, key: str) -> bool:
        """True if the shared store holds `key`. Staged copies do not count: they outlive a
        wiped or garbage-collected store, and a warm run that trusted them skipped keys the store
        no longer had (tests/test_faults.py). Loaders read staged copies through `fetch`."""
        with translate_errors(self.url, "contains", check_key(key)):
            return bool(self._fs.exists(self._path(key)))

    def contains_many(self, keys: list[str]) -> dict[str, bool]:
        """`contains` for many keys, remote lookups issued concurrently."""
        todo = list(dict.fromkeys(check_key(k) for k in keys))
        results = self._gather(self._fs.exists, "_exists", [self._path(k) for k in todo])
        out: dict[str, bool] = {}
        with translate_errors(self.url, "contains_many"):
            for k, r in zip(todo, results):
                if isinstance(r, BaseException):
                    raise r
                out[k] = bool(r)
        return out

    def publish(self, key: str, payload: bytes, meta: dict | None = None) -> bool:
        """Store once: True if this call stored `key`, False if a good artifact was already there.

        An object already at `key` that fails verification (truncated, bit-flipped, unsigned or
        forged) is replaced: nobody can load it, and publish-once would otherwise keep it forever.
        """
        if self.verifier is not None and self.signer is None:
            raise ConfigError(f"store {self.url!r} verifies signatures but holds no signing key: "
                              f"it cannot publish {key}")
        blob = encode_artifact(key, payload, meta, signer=self.signer)
        with translate_errors(self.url, "publish", key):
            stored = self._create(self._path(key), blob)
            if not stored and self._is_bad(key):
                self._put(self._path(key), blob, overwrite=True)
                stored = True
        if stored:
            self._stage(key, blob)
        return stored

    def _is_bad(self, key: str) -> bool:
        """True if the stored object at `key` fails verification (logged: it is replaced)."""
        try:
            decode_artifact(self._read(self._path(key)), key, self.verifier)
        except FileNotFoundError:
            return False  # deleted meanwhile: leave it to the next publish
        except ArtifactCorruptError as e:
            log.warning("replacing the artifact stored at %s: %s", key, e)
            return True
        return False

    def _write_deadline(self, nbytes: int) -> dict[str, float]:
        """`timeout=` for a sync write call on async backends (see _MIN_WRITE_RATE)."""
        if not getattr(self._fs, "async_impl", False):
            return {}
        return {"timeout": 4 * self.timeout_s + nbytes / _MIN_WRITE_RATE}

    def _create(self, path: str, blob: bytes) -> bool:
        """Write `blob` at `path` unless something is there; never overwrite."""
        fs = self._fs
        if self._protocol == "file":
            return link_new(path, blob)
        if self._protocol == "memory":
            with _MEMORY_LOCK:
                if fs.exists(path):
                    return False
                fs.pipe_file(path, blob)
                return True
        if fs.exists(path):  # S3 conditional put still uploads the whole body: check first
            return False
        try:
            fs.pipe_file(path, blob, mode="create", **self._write_deadline(len(blob)))
        except FileExistsError:
            return False
        return True

    def fetch(self, key: str) -> Artifact:
        """The verified artifact: from staging if intact, else from the store (then staged)."""
        art = self._read_staged(check_key(key))
        if art is not None:
            return art
        with translate_errors(self.url, "fetch", key):
            blob = self._read(self._path(key))
        art = decode_artifact(blob, key, self.verifier)
        self._stage(key, blob)
        return art

    def fetch_many(self, keys: list[str], rejected: dict[str, ArtifactCorruptError] | None = None
                   ) -> dict[str, Artifact]:
        """Fetch many; missing keys are absent from the result. A corrupt one raises, or, when
        `rejected` is given, is recorded there (key -> error) while the rest still arrive."""
        unique = [check_key(k) for k in dict.fromkeys(keys)]
        # Reads, sha256 and signature checks release the GIL: one thread per artifact (up to
        # _READERS) verifies a batch of hundreds of MB in a fraction of the time of one by one.
        staged = _threaded(self._read_staged, unique)
        out = {k: art for k, art in zip(unique, staged) if art is not None}
        todo = [k for k in unique if k not in out]
        results = self._gather(self._fs.cat_file, "_cat_file", [self._path(k) for k in todo],
                               **read_options(self._protocol))
        blobs = {}
        for k, r in zip(todo, results):
            if isinstance(r, BaseException):
                err = translate(r, self.url, "fetch_many", k)
                if isinstance(err, ArtifactNotFoundError):
                    continue  # missing keys are simply absent (a missing bucket is not this)
                if err is r:
                    raise r
                raise err from r
            blobs[k] = r

        def decode(key: str) -> Artifact | ArtifactCorruptError:
            try:
                art = decode_artifact(blobs[key], key, self.verifier)
            except ArtifactCorruptError as exc:
                return exc
            self._stage(key, blobs[key])
            return art

        for k, art in zip(blobs, _threaded(decode, list(blobs))):
            if isinstance(art, ArtifactCorruptError):
                if rejected is None:
                    raise art
                rejected[k] = art
            else:
                out[k] = art
        return out

    def delete(self, key: str) -> None:
        """Remove the artifact from the store and this node's staging dir (no error if absent)."""
        path = self._path(check_key(key))
        # Already gone is fine: delete is idempotent (S3 itself does not report a missing key).
        with translate_errors(self.url, "delete", key), suppress(FileNotFoundError):
            self._fs.rm_file(path)
        with translate_errors(self.staging_dir, "unstage", key), suppress(FileNotFoundError):
            os.unlink(self._staged_path(key))

    def list_keys(self) -> list[str]:
        """All artifact keys in the store (a full listing: slow on S3; for verify/gc tools)."""
        prefix = f"{self._root}/artifacts"
        with translate_errors(self.url, "list_keys"):
            try:
                paths = self._fs.find(prefix)
            except FileNotFoundError:
                paths = []
            self._fs.invalidate_cache(prefix)
        names = (p.rsplit("/", 1)[-1] for p in paths)
        return sorted(n[:-len(_SUFFIX)] for n in names
                      if n.endswith(_SUFFIX) and _KEY_RE.fullmatch(n[:-len(_SUFFIX)]))

    def read_raw(self, key: str) -> bytes:
        """The stored object's bytes, unverified (tools and fault-injection tests)."""
        with translate_errors(self.url, "read_raw", check_key(key)):
            return self._read(self._path(key))

    def write_raw(self, key: str, data: bytes) -> None:
        """Overwrite the stored object with `data`, unverified (tools and fault-injection tests)."""
        with translate_errors(self.url, "write_raw", check_key(key)):
            self._put(self._path(key), bytes(data), overwrite=True)

    # ---- side files ----
    def put_file(self, relpath: str, data: bytes, overwrite: bool = True) -> None:
        """Write a side file; with overwrite=False an existing file raises StoreConflictError."""
        path = self._side_path(relpath)
        with translate_errors(self.url, "put_file", relpath):
            self._put(path, bytes(data), overwrite)

    def _put(self, path: str, data: bytes, overwrite: bool) -> None:
        if not overwrite:
            if not self._create(path, data):
                raise FileExistsError(f"{path} exists and overwrite=False")
        elif self._protocol == "file":
            replace_file(path, data, fsync=True)
        else:  # one PUT on object stores: atomic
            self._fs.pipe_file(path, data, **self._write_deadline(len(data)))

    def get_file(self, relpath: str) -> bytes:
        """Read a side file; ArtifactNotFoundError if missing."""
        with translate_errors(self.url, "get_file", relpath):
            return self._read(self._side_path(relpath))

    def exists_file(self, relpath: str) -> bool:
        with translate_errors(self.url, "exists_file", relpath):
            return bool(self._fs.exists(self._side_path(relpath)))

    # ---- staging ----
    def _read_staged(self, key: str) -> Artifact | None:
        path = self._staged_path(key)
        with translate_errors(self.staging_dir, "read staged", key):
            try:
                with open(path, "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                return None  # not staged on this node
        try:
            return decode_artifact(blob, key, self.verifier)
        except ArtifactCorruptError as e:
            log.warning("deleting corrupt staged copy %s and refetching: %s", path, e)
            # A concurrent reader may have removed it first.
            with translate_errors(self.staging_dir, "unstage", key), suppress(FileNotFoundError):
                os.unlink(path)
            return None

    def _stage(self, key: str, blob: bytes) -> None:
        with translate_errors(self.staging_dir, "stage", key):
            replace_file(self._staged_path(key), blob, fsync=False)


_READERS = 16


def _threaded(fn: Callable[[str], Any], keys: Sequence[str]) -> list[Any]:
    """fn(key) for each key, on up to `_READERS` threads, in order; the first exception raises."""
    if len(keys) < 2:
        return [fn(k) for k in keys]
    with ThreadPoolExecutor(min(_READERS, len(keys)), thread_name_prefix="vcr-read") as pool:
        return list(pool.map(fn, keys))
