"""`CacheConfig`: where the artifacts live and signing, apart from what is compiled; a
compilation's is `CompilationConfig(cache=...)`. The flat form of earlier releases still works
this release, with a DeprecationWarning."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

import vllm_compile_ray as vcr
from vllm_compile_ray.config import CACHE_FIELDS
from vllm_compile_ray.errors import ConfigError
from vllm_compile_ray.keys import config_hash


@pytest.mark.parametrize("kwargs,needle", [
    ({"store_timeout_s": 0}, "CacheConfig.store_timeout_s=0 is invalid: must be a number of seconds"),
    ({"cache_dir": 3}, "CacheConfig.cache_dir=3 is invalid: must be a string"),
    ({"cache_dir": "S3 ://x"}, "expected an fsspec URL"),
    ({"storage_options": "anon"}, "CacheConfig.storage_options='anon' is invalid"),
    ({"signing_scheme": "rsa"}, "CacheConfig.signing_scheme='rsa' is invalid: allowed"),
    ({"signing_scheme": "hmac-sha256"}, "needs exactly one key source"),
    ({"signing_key_env": "MY KEY", "signing_scheme": "hmac-sha256"}, "environment variable name"),
])
def test_cache_config_names_the_bad_field(kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        vcr.CacheConfig(**kwargs)


def test_a_compilation_holds_one_cache_config() -> None:
    assert vcr.CompilationConfig().cache == vcr.CacheConfig()
    names = {f.name for f in dataclasses.fields(vcr.CompilationConfig)}
    assert "cache" in names and not names & set(CACHE_FIELDS)  # not also flat


def test_a_compilation_s_cache_is_not_key_material(tmp_path) -> None:
    cache = vcr.CacheConfig(cache_dir=str(tmp_path / "a"), store_timeout_s=5)
    config = vcr.CompilationConfig(compile_sizes=[4], cache=cache)
    assert config.cache is cache
    moved = config.with_cache(vcr.CacheConfig(cache_dir=str(tmp_path / "b"),
                                              signing_scheme="hmac-sha256",
                                              signing_key_env="VCR_TEST_KEY"))
    assert moved.cache.cache_dir == str(tmp_path / "b") and moved.compile_sizes == (4,)
    assert config.with_cache(staging_dir="/s").cache == dataclasses.replace(cache, staging_dir="/s")
    for other in (moved, config.with_cache(staging_dir="/s"),
                  vcr.CompilationConfig(compile_sizes=[4])):
        assert other.hashed_fields() == config.hashed_fields()  # the same keys in any cache
        assert config_hash(other) == config_hash(config)
        assert "cache" not in other.hashed_fields()


def test_a_compilation_config_with_its_cache_pickles_and_copies(tmp_path) -> None:
    config = vcr.CompilationConfig(compile_sizes=[2], cache=vcr.CacheConfig(
        cache_dir="s3://b/p", storage_options={"anon": True}, store_timeout_s=3))
    assert pickle.loads(pickle.dumps(config)) == config  # Ray ships it to tasks
    assert dataclasses.replace(config, on_miss="error").cache == config.cache
    assert config.replace(on_miss="error") == dataclasses.replace(config, on_miss="error")
    assert config != config.with_cache(cache_dir="s3://b/q")


def test_a_store_opens_from_a_cache_config_alone(tmp_path) -> None:
    cache = vcr.CacheConfig(cache_dir=str(tmp_path / "c"), staging_dir=str(tmp_path / "s"))
    store = vcr.open_store(cache)
    key = "cd" * 32
    assert store.publish(key, b"payload", {"kind": "test"})
    same = vcr.open_store(vcr.CompilationConfig(cache=cache))
    assert same.fetch(key).payload == b"payload"


def test_the_flat_form_still_works_and_warns(tmp_path) -> None:
    """Deprecated this release: the flat keywords build `cache`; reading them reads `cache`."""
    url = str(tmp_path / "c")
    with pytest.warns(DeprecationWarning, match=r"cache_dir=\.\.\., store_timeout_s=\.\.\. is "
                      r"deprecated.*use CompilationConfig\(cache=CacheConfig\(cache_dir="):
        config = vcr.CompilationConfig(compile_sizes=[4], cache_dir=url, store_timeout_s=5)
    new = vcr.CompilationConfig(compile_sizes=[4],
                                cache=vcr.CacheConfig(cache_dir=url, store_timeout_s=5))
    assert config == new and config_hash(config) == config_hash(vcr.CompilationConfig())
    with pytest.warns(DeprecationWarning, match=r"CompilationConfig.cache_dir is deprecated.*"
                      r"use CompilationConfig.cache.cache_dir"):
        assert config.cache_dir == url
    with pytest.warns(DeprecationWarning, match=r"use config.with_cache\(staging_dir=\.\.\.\)"):
        staged = config.replace(staging_dir="/s", on_miss="error")
    assert staged == new.replace(on_miss="error").with_cache(staging_dir="/s")
    with pytest.warns(DeprecationWarning, match=r"from_dict.*cache_dir=.*is deprecated"):
        assert vcr.CompilationConfig.from_dict({"compile_sizes": [4], "cache_dir": url,
                                                "store_timeout_s": 5}) == new
    with pytest.raises(ConfigError, match=r"CacheConfig.store_timeout_s=0 is invalid"), \
            pytest.warns(DeprecationWarning):
        vcr.CompilationConfig(store_timeout_s=0)


@pytest.mark.parametrize("build", [
    lambda: vcr.CompilationConfig(cache=vcr.CacheConfig(), cache_dir="/x"),
    lambda: vcr.CompilationConfig.from_dict({"cache": {}, "staging_dir": "/x"}),
    lambda: vcr.CompilationConfig().replace(cache=vcr.CacheConfig(), signing_key_env="K"),
    lambda: dataclasses.replace(vcr.CompilationConfig(), cache_dir="/x"),
])
def test_cache_and_a_flat_field_together_is_an_error(build) -> None:
    with pytest.raises(ConfigError, match=r"got cache= and the flat cache field\(s\) \w+=\.\.\.: "
                                          r"give them in cache=CacheConfig\("):
        build()
