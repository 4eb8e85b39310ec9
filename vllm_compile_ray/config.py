"""`CompilationConfig`: what to compile and how; `CacheConfig`: where the artifacts live and
signing (a compilation's is `CompilationConfig.cache`, never key material)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

COMPILATION_LEVELS = ("piecewise", "dynamo_once")
BACKENDS = ("inductor", "eager")
FALLBACKS = ("eager", "compile")
DEFAULT_POOL_IDLE_TIMEOUT_S = 900.0  # a pool compile worker without work this long exits
MISS_POLICIES = ("error", "compile", "compile_and_publish", "eager")
SIGNING_SCHEMES = ("", "hmac-sha256", "ed25519")
DEFAULT_SPLITTING_OPS = ("vcr::attention",)

_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_][A-Za-z0-9_.]*$")
_CUSTOM_OP = re.compile(r"^(all|none|[+-][A-Za-z_][A-Za-z0-9_]*)$")
# Fields that change what is compiled; the rest (where the cache lives, timeouts, policies) do not.
_HASHED_FIELDS = ("compilation_level", "backend", "splitting_ops", "inductor_compile_config")
# vLLM's names that change nothing here: accepted (a warning says so), never part of a key
_NO_EFFECT_FIELDS = {"custom_ops": (), "debug_compile": False}


def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"CompilationConfig.{name}={value!r} is invalid: {allowed}")


def _check_cache_fields(obj: CacheConfig) -> None:
    """ConfigError naming `CacheConfig.field` and what is allowed."""
    def fail(name: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"CacheConfig.{name}={value!r} is invalid: {allowed}")

    value = obj.store_timeout_s
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise fail("store_timeout_s", value, "must be a number of seconds > 0")
    object.__setattr__(obj, "store_timeout_s", float(value))
    for name in ("cache_dir", "staging_dir"):
        if not isinstance(getattr(obj, name), str):
            raise fail(name, getattr(obj, name), "must be a string (a URL or a path)")
    if obj.cache_dir and "://" in obj.cache_dir:
        protocol = obj.cache_dir.split("://", 1)[0]
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*", protocol):
            raise fail("cache_dir", obj.cache_dir, "expected an fsspec URL such as s3://bucket/prefix")
    if not isinstance(obj.storage_options, dict):
        raise fail("storage_options", obj.storage_options, "must be a dict of fsspec options")
    for name in ("signing_scheme", "signing_key_file", "signing_key_env"):
        if not isinstance(getattr(obj, name), str):
            raise fail(name, getattr(obj, name), "must be a string")
    if obj.signing_scheme not in SIGNING_SCHEMES:
        raise fail("signing_scheme", obj.signing_scheme, f"allowed: {SIGNING_SCHEMES}")
    sources = [n for n in ("signing_key_file", "signing_key_env") if getattr(obj, n)]
    if obj.signing_scheme and len(sources) != 1:
        raise fail("signing_scheme", obj.signing_scheme,
                   f"needs exactly one key source, signing_key_file or signing_key_env "
                   f"(got {sources or 'neither'})")
    if sources and not obj.signing_scheme:
        raise fail(sources[0], getattr(obj, sources[0]),
                   f"a signing key needs signing_scheme (one of {SIGNING_SCHEMES[1:]})")
    if obj.signing_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", obj.signing_key_env):
        raise fail("signing_key_env", obj.signing_key_env,
                   "must be an environment variable name (the key itself never goes in the "
                   "config)")


@dataclass(frozen=True)
class CacheConfig:
    """Where the artifacts live and who may write them: nothing here changes compiled code or
    any key. The store (`runtime.api.open_store`) and the cache commands (`vcr ls`, `stats`,
    `verify`, `gc`) take this alone; `CompilationConfig(cache=...)` is the one of a compilation.

    cache_dir is an fsspec URL (s3://bucket/prefix, gs://, az://, file:///path, /path, memory://x);
    "" means the node-local default `~/.cache/vllm_compile_ray/cache`. staging_dir: the node-local
    verified copies ("" a default per URL). Signing (signing.py): "" off; the key comes from a
    file or an env var, read by `open_store`, at the edge.
    """

    cache_dir: str = ""
    storage_options: dict = field(default_factory=dict)
    staging_dir: str = ""
    store_timeout_s: float = 30.0
    signing_scheme: str = ""
    signing_key_file: str = ""
    signing_key_env: str = ""

    def __post_init__(self) -> None:
        _check_cache_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheConfig:
        return cls(**_known_fields(cls, data))


CACHE_FIELDS = tuple(f.name for f in dataclasses.fields(CacheConfig))


@dataclass(frozen=True)
class CompilationConfig:
    """Compilation settings, named as in vLLM's `CompilationConfig` where the concept is shared.

    `cache`: where the artifacts live and signing (`CacheConfig`), never part of a key:
    `CompilationConfig(compile_sizes=[1, 8], cache=CacheConfig(cache_dir="s3://bucket/vcr"))`.

    Deprecated for this release, removed in the next: the cache's fields flat on this class.
    `CompilationConfig(cache_dir=...)` (and `from_dict` / `replace` with them) builds `cache`;
    reading `config.cache_dir` returns `config.cache.cache_dir`. Both warn
    (DeprecationWarning), reads too, so every use is found before the removal.
    """

    compilation_level: str = "piecewise"
    use_inductor: bool | None = None  # None follows backend (default: inductor)
    backend: str = ""  # "" follows use_inductor: "inductor" unless use_inductor is False
    custom_ops: tuple[str, ...] = ()
    splitting_ops: tuple[str, ...] = DEFAULT_SPLITTING_OPS
    compile_sizes: tuple[int, ...] = ()
    compile_dynamic: bool = True
    inductor_compile_config: dict = field(default_factory=dict)
    disable_compile_cache: bool = False
    max_compile_time: float = 600.0
    debug_compile: bool = False
    fallback: str = "eager"
    on_miss: str = "compile_and_publish"
    # Where the artifacts live and signing; never hashed. A dict of CacheConfig's fields (as
    # `to_dict` writes it) becomes one, so `CompilationConfig(**config.to_dict())` round-trips.
    cache: CacheConfig = field(default_factory=CacheConfig)
    # CUDA: run each fresh Inductor artifact once so Triton's runtime autotune results travel
    # inside it (a loader's first call then does not re-tune). Not hashed: same compiled code.
    ship_autotune: bool = True
    # Argument name -> the dim that is num_tokens (see inputs.py); {} takes the defaults
    # (input_ids/positions/position_ids: last dim). Not hashed: the traced code carries it.
    dynamic_dims: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.compilation_level not in COMPILATION_LEVELS:
            raise _fail("compilation_level", self.compilation_level, f"allowed: {COMPILATION_LEVELS}")
        if self.use_inductor is not None and not isinstance(self.use_inductor, bool):
            raise _fail("use_inductor", self.use_inductor, "must be True or False")
        for name in ("compile_dynamic", "disable_compile_cache", "debug_compile",
                     "ship_autotune"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, getattr(self, name), "must be True or False")
        backend = self.backend or ("eager" if self.use_inductor is False else "inductor")
        if backend not in BACKENDS:
            raise _fail("backend", self.backend, f"allowed: {BACKENDS}")
        if self.backend and self.use_inductor is not None and \
                (backend == "inductor") != self.use_inductor:
            raise _fail("backend", self.backend,
                        f"contradicts use_inductor={self.use_inductor}; set one of them")
        set_("backend", backend)
        set_("use_inductor", backend == "inductor")
        set_("custom_ops", self._str_tuple("custom_ops", self.custom_ops, _CUSTOM_OP,
                                           "each entry is 'all', 'none', '+name' or '-name'"))
        for name, default in _NO_EFFECT_FIELDS.items():
            if getattr(self, name) != default:
                warnings.warn(f"CompilationConfig.{name} has no effect in vllm_compile_ray (kept "
                              "for vLLM's name; it will be removed)", DeprecationWarning,
                              stacklevel=4)  # the caller of `_accept_flat_cache_fields`
        set_("splitting_ops", self._str_tuple("splitting_ops", self.splitting_ops, _OP_NAME,
                                              "each entry is an op name 'namespace::op'"))
        set_("compile_sizes", self._sizes(self.compile_sizes))
        if not self.compile_sizes and not self.compile_dynamic:
            raise _fail("compile_sizes", self.compile_sizes,
                        "must list at least one size when compile_dynamic is False")
        if not isinstance(self.inductor_compile_config, dict):
            raise _fail("inductor_compile_config", self.inductor_compile_config,
                        "must be a dict of Inductor config names to JSON values")
        try:
            json.dumps(self.inductor_compile_config, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise _fail("inductor_compile_config", self.inductor_compile_config,
                        f"values must be JSON-serializable ({exc})") from None
        value = self.max_compile_time
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _fail("max_compile_time", value, "must be a number of seconds > 0")
        set_("max_compile_time", float(value))
        if self.fallback not in FALLBACKS:
            raise _fail("fallback", self.fallback, f"allowed: {FALLBACKS}")
        if self.on_miss not in MISS_POLICIES:
            raise _fail("on_miss", self.on_miss, f"allowed: {MISS_POLICIES}")
        if isinstance(self.cache, dict):
            set_("cache", CacheConfig.from_dict(self.cache))
        if not isinstance(self.cache, CacheConfig):
            raise _fail("cache", self.cache,
                        "must be a CacheConfig, e.g. CacheConfig(cache_dir='s3://bucket/vcr')")
        if not isinstance(self.dynamic_dims, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in self.dynamic_dims.items()):
            raise _fail("dynamic_dims", self.dynamic_dims,
                        "must map argument names to a dim index, e.g. {'input_ids': -1}")

    @staticmethod
    def _str_tuple(name: str, value: Any, pattern: re.Pattern, allowed: str) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _fail(name, value, f"must be a list of strings; {allowed}")
        for item in value:
            if not isinstance(item, str) or not pattern.match(item):
                raise _fail(name, value, f"entry {item!r} is not allowed; {allowed}")
        return tuple(value)

    @staticmethod
    def _sizes(value: Any) -> tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _fail("compile_sizes", value, "must be a list of positive ints")
        for size in value:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise _fail("compile_sizes", value, f"entry {size!r} is not a positive int")
        return tuple(sorted(set(value)))

    @property
    def shapes(self) -> tuple[int | str, ...]:
        """Every runtime shape to compile: "dynamic" first, then the static sizes."""
        return (("dynamic",) if self.compile_dynamic else ()) + self.compile_sizes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("custom_ops", "splitting_ops", "compile_sizes"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompilationConfig:
        """`to_dict`'s inverse: `cache` a dict of CacheConfig's fields (or a CacheConfig)."""
        if not isinstance(data, dict):
            raise ConfigError(f"CompilationConfig.from_dict expects a dict, got {type(data).__name__}")
        data = _fold_flat_cache_fields(dict(data), "CompilationConfig.from_dict({...})", 2)
        data = _known_fields(cls, data)
        for name in ("custom_ops", "splitting_ops", "compile_sizes"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompilationConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"CompilationConfig JSON is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> CompilationConfig:
        """A copy with `changes`; a flat cache field (deprecated) changes only that field of
        `cache`."""
        changes = _fold_flat_cache_fields(changes, "CompilationConfig.replace(...)", stacklevel=2,
                                          base=self.cache)
        return dataclasses.replace(self, **changes)

    def with_cache(self, cache: CacheConfig | None = None, **changes: Any) -> CompilationConfig:
        """This config with another cache: `cache` (default its own) with `changes` to
        CacheConfig's fields, e.g. `config.with_cache(staging_dir=...)` for another node's
        staging. The keys stay the same."""
        return dataclasses.replace(self, cache=dataclasses.replace(cache or self.cache, **changes))

    def hashed_fields(self) -> dict[str, Any]:
        """The fields that change compiled code; `keys.config_hash` hashes these."""
        data = self.to_dict()
        return {name: data[name] for name in _HASHED_FIELDS}


def _known_fields(cls: type, data: Any) -> dict[str, Any]:
    """`data` (a dict) when it names only `cls`'s fields; else ConfigError listing them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; allowed: {sorted(names)}")
    return data


# Deprecated for this release (the flat cache fields), removed in the next: from here to the end.
_FLAT_CACHE_NOTE = "the flat cache fields go in the next release"


def _fold_flat_cache_fields(kwargs: dict[str, Any], call: str, stacklevel: int,
                            base: CacheConfig | None = None) -> dict[str, Any]:
    """`kwargs` with its flat cache fields (`CACHE_FIELDS`) moved into `cache`: a CacheConfig
    of them over `base` (`replace`) or over the defaults. Warns (DeprecationWarning, pointed
    `stacklevel` frames up); ConfigError when `kwargs` has `cache` as well."""
    flat = {name: kwargs.pop(name) for name in CACHE_FIELDS if name in kwargs}
    if not flat:
        return kwargs
    listed = ", ".join(f"{name}=..." for name in flat)
    if "cache" in kwargs:
        raise ConfigError(f"{call} got cache= and the flat cache field(s) {listed}: give them "
                          f"in cache=CacheConfig({listed}) alone (to change a config's cache: "
                          f"config.with_cache({listed}))")
    use = (f"config.with_cache({listed})" if base is not None
           else f"CompilationConfig(cache=CacheConfig({listed}))")
    warnings.warn(f"{call} with {listed} is deprecated ({_FLAT_CACHE_NOTE}): use {use}",
                  DeprecationWarning, stacklevel=stacklevel + 1)
    kwargs["cache"] = dataclasses.replace(base or CacheConfig(), **flat)
    return kwargs


def _accept_flat_cache_fields(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass `__init__`, also taking the flat cache fields (deprecated) into `cache`."""
    @functools.wraps(init)
    def __init__(self: CompilationConfig, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **_fold_flat_cache_fields(kwargs, "CompilationConfig(...)", stacklevel=2))
    return __init__


def _flat_cache_field(name: str) -> property:
    def get(self: CompilationConfig) -> Any:
        warnings.warn(f"CompilationConfig.{name} is deprecated ({_FLAT_CACHE_NOTE}): use "
                      f"CompilationConfig.cache.{name}", DeprecationWarning, stacklevel=2)
        return getattr(self.cache, name)
    return property(get, doc=f"Deprecated: `cache.{name}`.")


CompilationConfig.__init__ = _accept_flat_cache_fields(  # type: ignore[method-assign]
    CompilationConfig.__init__)
for _name in CACHE_FIELDS:
    setattr(CompilationConfig, _name, _flat_cache_field(_name))
