"""Exceptions raised by vllm_compile_ray.

Every error a user can cause or meet names what was wrong and what is allowed. The classes also
derive from the builtin a caller would catch (ValueError, FileNotFoundError, ...).
"""

from __future__ import annotations


class VcrError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(VcrError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class UnknownModelError(VcrError, KeyError):
    """A model preset name is not known; the message lists the known presets."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class StoreError(VcrError, OSError):
    """The artifact store failed; the message names the URL and the operation."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store cannot be reached (connection refused, DNS, timeout)."""


class StorePermissionError(StoreError, PermissionError):
    """The store refused the operation (credentials, read-only location)."""


class ArtifactNotFoundError(StoreError, FileNotFoundError):
    """No artifact is stored under the key."""


class StoreConflictError(StoreError, FileExistsError):
    """The object already exists and the write asked not to overwrite it."""


class ArtifactCorruptError(StoreError):
    """A stored artifact failed verification (truncated, bit-flipped, foreign or forged)."""


class ArtifactSignatureError(ArtifactCorruptError):
    """An artifact or manifest row is unsigned or its signature does not verify (forged, altered,
    or signed by another key) while signatures are required; it is never handed to a loader."""


class CompileError(VcrError, RuntimeError):
    """A piece failed to compile."""


class CacheMissError(VcrError, LookupError):
    """Artifacts needed at startup are missing or were rejected and the miss policy is "error".
    `rejected` maps each rejected key to the reason."""

    def __init__(self, message: str, missing_keys: list[str],
                 rejected: dict[str, str] | None = None):
        super().__init__(message)
        self.missing_keys = list(missing_keys)
        self.rejected = dict(rejected or {})


class ClusterResourceError(VcrError, RuntimeError):
    """No node of the Ray cluster has the resources a task asks for; the message names them."""


class UnsupportedModelError(VcrError, ValueError):
    """A model, architecture, config field or attention variant this package cannot serve
    correctly; the message names it and what is supported."""
