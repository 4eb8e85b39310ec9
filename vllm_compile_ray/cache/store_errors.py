"""Translate fsspec / botocore / aiohttp failures into the package's store errors, in one place.

Every store operation runs inside `translate_errors(url, op)`; the raised error names the URL and
the operation, keeps the original as `__cause__`, and is never swallowed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from ..errors import (ArtifactNotFoundError, StoreConflictError, StoreError, StorePermissionError,
                      StoreUnavailableError, VcrError)

# Optional backends: only the installed ones contribute exception types.
_UNAVAILABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
_BOTO_ERROR: tuple[type[BaseException], ...] = ()
try:
    import botocore.exceptions as _bce

    # ConnectionError covers EndpointConnectionError/ConnectTimeoutError; HTTPClientError covers
    # ReadTimeoutError/ConnectionClosedError.
    _UNAVAILABLE += (_bce.ConnectionError, _bce.HTTPClientError)
    _BOTO_ERROR = (_bce.BotoCoreError,)
    _NO_CREDENTIALS: tuple[type[BaseException], ...] = (
        _bce.NoCredentialsError,
        _bce.PartialCredentialsError,
    )
except ImportError:  # s3fs not installed: no botocore errors to meet
    _NO_CREDENTIALS = ()
try:
    import aiohttp

    _UNAVAILABLE += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
except ImportError:
    pass

_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}
_BUCKET_MISSING_CODES = {"NoSuchBucket"}
_PERMISSION_CODES = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "ExpiredToken", "403"}


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, either `exc` or its cause (s3fs wraps them)."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return None


def _bucket_of(url: str) -> str:
    return urlsplit(url).netloc or url


def translate(exc: BaseException, url: str, op: str, key: str | None = None) -> BaseException:
    """Map one backend exception to the store error a caller should see (or `exc` itself)."""
    if isinstance(exc, VcrError):
        return exc
    what = f"{op} {key}" if key else op
    where = f"{what} on store {url!r}"
    code = _s3_error_code(exc)
    if code in _BUCKET_MISSING_CODES:
        return StoreError(f"bucket {_bucket_of(url)!r} does not exist ({where}): {exc}")
    if code in _PERMISSION_CODES or isinstance(exc, _NO_CREDENTIALS):
        return StorePermissionError(f"access denied ({where}): {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailableError(f"store unreachable ({where}): {type(exc).__name__}: {exc}")
    if isinstance(exc, PermissionError) or (
        isinstance(exc, OSError) and exc.errno in _PERMISSION_ERRNOS
    ):
        return StorePermissionError(f"not permitted ({where}): {exc}")
    if isinstance(exc, FileNotFoundError):
        return ArtifactNotFoundError(f"not found ({where})")
    if isinstance(exc, FileExistsError):
        return StoreConflictError(f"already exists ({where})")
    if isinstance(exc, OSError) or isinstance(exc, _BOTO_ERROR):
        return StoreError(f"{where} failed: {type(exc).__name__}: {exc}")
    return exc  # programming errors (TypeError, ValueError, ...) pass through untouched


@contextmanager
def translate_errors(url: str, op: str, key: str | None = None) -> Iterator[None]:
    """Run a block, re-raising backend failures as StoreError subclasses naming `url` and `op`."""
    try:
        yield
    except Exception as exc:
        new = translate(exc, url, op, key)
        if new is exc:
            raise
        raise new from exc
