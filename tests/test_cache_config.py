"""`CacheConfig`: where the artifacts live and signing, apart from what is compiled."""

from __future__ import annotations

import dataclasses

import pytest

import vllm_compile_ray as vcr
from vllm_compile_ray.errors import ConfigError


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


def test_compilation_config_has_every_cache_field_with_the_same_default() -> None:
    assert vcr.CompilationConfig().cache == vcr.CacheConfig()
    names = {f.name for f in dataclasses.fields(vcr.CompilationConfig)}
    assert set(vcr.config.CACHE_FIELDS) <= names


def test_a_compilation_s_cache_is_not_key_material(tmp_path) -> None:
    config = vcr.CompilationConfig(compile_sizes=[4], cache_dir=str(tmp_path / "a"),
                                   store_timeout_s=5)
    assert config.cache == vcr.CacheConfig(cache_dir=str(tmp_path / "a"), store_timeout_s=5.0)
    moved = config.with_cache(vcr.CacheConfig(cache_dir=str(tmp_path / "b"),
                                              signing_scheme="hmac-sha256",
                                              signing_key_env="VCR_TEST_KEY"))
    assert moved.cache_dir == str(tmp_path / "b") and moved.compile_sizes == (4,)
    assert moved.hashed_fields() == config.hashed_fields()  # the same keys in any cache


def test_a_store_opens_from_a_cache_config_alone(tmp_path) -> None:
    store = vcr.open_store(vcr.CacheConfig(cache_dir=str(tmp_path / "c"),
                                           staging_dir=str(tmp_path / "s")))
    key = "cd" * 32
    assert store.publish(key, b"payload", {"kind": "test"})
    same = vcr.open_store(vcr.CompilationConfig(cache_dir=str(tmp_path / "c"),
                                                staging_dir=str(tmp_path / "s")))
    assert same.fetch(key).payload == b"payload"
