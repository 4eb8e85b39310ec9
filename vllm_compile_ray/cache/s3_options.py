"""Validation of s3fs storage options: a typo fails at construction, not at the first request."""

from __future__ import annotations

from ..errors import ConfigError

# Named parameters of s3fs.S3FileSystem, the listing-cache options it forwards to fsspec, and
# `profile` (its other **kwargs go to aiobotocore's AioSession). Anything else fails late, at the
# first request, as a bare TypeError, or is silently ignored: check up front.
S3_OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "anon": bool, "endpoint_url": str, "key": str, "secret": str, "token": str, "use_ssl": bool,
    "client_kwargs": dict, "requester_pays": bool, "default_block_size": int,
    "default_fill_cache": bool, "default_cache_type": str, "version_aware": bool,
    "config_kwargs": dict, "s3_additional_kwargs": dict, "session": object, "username": str,
    "password": str, "cache_regions": bool, "asynchronous": bool, "loop": object,
    "max_concurrency": int, "fixed_upload_size": bool, "local_expiry_check": bool,
    "use_listings_cache": bool, "listings_expiry_time": (int, float),
    "max_paths": int, "skip_instance_cache": bool, "profile": str,
}


def check_s3_options(url: str, options: dict) -> None:
    """ConfigError for storage options s3fs would ignore (typos) or choke on later (types)."""
    unknown = sorted(set(options) - set(S3_OPTION_TYPES))
    if unknown:
        raise ConfigError(f"storage_options for {url!r}: unknown s3 option(s) {unknown}; "
                          f"allowed: {sorted(S3_OPTION_TYPES)}")
    for name, value in options.items():
        want = S3_OPTION_TYPES[name]
        if isinstance(value, bool) and want in (int, (int, float)) or not isinstance(value, want):
            names = want.__name__ if isinstance(want, type) else "/".join(t.__name__ for t in want)
            raise ConfigError(f"storage_options[{name!r}] for {url!r} must be {names}, got "
                              f"{type(value).__name__} {value!r}")
