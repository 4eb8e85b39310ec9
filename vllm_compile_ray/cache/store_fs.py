"""The fsspec side of the artifact store: which filesystem a URL names, how it is opened (S3
timeouts and retries), and many calls on it at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.asyn import sync
from fsspec.registry import known_implementations, registry
from fsspec.utils import get_protocol

from ..errors import ConfigError

S3_PROTOCOLS = ("s3", "s3a")
_COMMON_PROTOCOLS = "s3, gs/gcs, az/abfs, file (or a plain absolute path), memory"
_CONCURRENCY = 32


def filesystem_class(url: str) -> tuple[str, type]:
    """Resolve the protocol of `url`; ConfigError for unknown protocols or missing packages."""
    if "::" in url:
        raise ConfigError(f"store url {url!r}: chained URLs are not supported (the store does its "
                          "own verified local staging); give a single protocol")
    protocol = get_protocol(url)
    if protocol not in known_implementations and protocol not in registry:
        raise ConfigError(f"store url {url!r}: unknown protocol {protocol!r}; "
                          f"common ones are {_COMMON_PROTOCOLS}")
    try:
        return protocol, fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        hint = known_implementations.get(protocol, {}).get("err") or str(e)
        raise ConfigError(f"store url {url!r}: protocol {protocol!r} needs an optional "
                          f"package: {hint}") from e


def open_filesystem(protocol: str, storage_options: dict, timeout_s: float) -> Any:
    """The fsspec filesystem of `protocol`; on S3 reads time out after `timeout_s`."""
    opts = dict(storage_options)
    if protocol not in S3_PROTOCOLS:
        return fsspec.filesystem(protocol, **opts)
    cfg = dict(opts.get("config_kwargs") or {})
    cfg.setdefault("connect_timeout", 5)
    cfg.setdefault("read_timeout", timeout_s)
    cfg.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
    opts["config_kwargs"] = cfg
    # Own instance: s3fs's outer retry loop (5 tries on top of botocore's) would multiply a
    # frozen server's read timeout; botocore's retries above are the only ones we want.
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
    fs.retries = 1
    return fs


def read_options(protocol: str) -> dict[str, Any]:
    """Keyword arguments of a whole-object read (`cat_file`): on S3 one GET. s3fs otherwise
    sends a HEAD first, to split objects past its 50 MiB block into ranged reads: a round trip
    more per artifact, for objects that small."""
    return {"max_concurrency": 1} if protocol in S3_PROTOCOLS else {}


def gather(fs: Any, fn: Callable[..., Any], afn_name: str, paths: list[str],
           **kwargs: Any) -> list[Any]:
    """Run one call per path concurrently (async backends: `fs.<afn_name>`) or in turn (`fn`),
    each with `kwargs`; exceptions returned."""
    if not getattr(fs, "async_impl", False):
        return [_call(fn, p, **kwargs) for p in paths]
    afn = getattr(fs, afn_name)

    async def run() -> list[Any]:
        sem = asyncio.Semaphore(_CONCURRENCY)

        async def one(p: str) -> Any:
            async with sem:
                return await afn(p, **kwargs)
        return await asyncio.gather(*(one(p) for p in paths), return_exceptions=True)
    return sync(fs.loop, run)


def _call(fn: Callable[..., Any], arg: str, **kwargs: Any) -> Any:
    """fn(arg, **kwargs), or the exception it raised (for the caller to re-raise or map)."""
    try:
        return fn(arg, **kwargs)
    except Exception as e:
        return e
