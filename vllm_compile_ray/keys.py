"""Every hash the package computes: cache keys, config hashes, plan ids. Canonical JSON in, hex out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from .config import CompilationConfig
from .specs import InputSpec

KEY_VERSION = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def config_hash(config: CompilationConfig) -> str:
    """Hash of what changes compiled code; leaves out where the cache lives and runtime policies."""
    return digest(config.hashed_fields())


def fingerprint_hash(fingerprint: dict[str, str]) -> str:
    return digest(fingerprint)[:16]


def piece_key(code: str, input_specs: Sequence[InputSpec], shape: int | str, config_digest: str,
              compiler_hash: str, fingerprint: dict[str, str], pass_uuids: Sequence[str]) -> str:
    """The cache key of one (piece, shape). Never includes the size seen at trace time."""
    if not (shape == "dynamic" or (isinstance(shape, int) and shape > 0)):
        raise ValueError(f"shape must be 'dynamic' or a positive int, got {shape!r}")
    return digest({
        "v": KEY_VERSION,
        "code": code,
        "inputs": [spec.to_dict() for spec in input_specs],
        "shape": shape,
        "config": config_digest,
        "compiler": compiler_hash,
        "env": fingerprint,
        "passes": list(pass_uuids),
    })


def code_id(code: str) -> str:
    """Short id naming a canonical piece in logs, task names and manifests."""
    return hashlib.sha256(code.encode()).hexdigest()[:10]


class KeyContext:
    """Everything besides the piece and shape that a key covers, computed once per plan."""

    def __init__(self, config: CompilationConfig, compiler_hash: str, fingerprint: dict[str, str],
                 pass_uuids: Sequence[str] = ()):
        self.config_digest = config_hash(config)
        self.compiler_hash = compiler_hash
        self.fingerprint = dict(fingerprint)
        self.fingerprint_id = fingerprint_hash(fingerprint)
        self.pass_uuids = tuple(pass_uuids)

    def key(self, code: str, input_specs: Sequence[InputSpec], shape: int | str) -> str:
        return piece_key(code, input_specs, shape, self.config_digest, self.compiler_hash,
                         self.fingerprint, self.pass_uuids)
