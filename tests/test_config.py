"""CompilationConfig: validation with clear errors, round trips, the cache-independent hash."""

import pytest

from vllm_compile_ray import CacheConfig, CompilationConfig, ConfigError
from vllm_compile_ray.keys import config_hash


def test_defaults_and_shapes() -> None:
    cfg = CompilationConfig(compile_sizes=[8, 1, 4, 4])
    assert cfg.compile_sizes == (1, 4, 8)
    assert cfg.shapes == ("dynamic", 1, 4, 8)
    assert cfg.backend == "inductor" and cfg.use_inductor
    assert CompilationConfig(use_inductor=False).backend == "eager"
    assert CompilationConfig(compile_sizes=[2], compile_dynamic=False).shapes == (2,)


@pytest.mark.parametrize("field,value,needle", [
    ("compilation_level", "fast", "'piecewise', 'dynamo_once'"),
    ("backend", "tvm", "'inductor', 'eager'"),
    ("compile_sizes", [0, 2], "positive int"),
    ("compile_sizes", "1,2", "list of positive ints"),
    ("compile_sizes", [1.5], "positive int"),
    ("compile_sizes", [True], "positive int"),
    ("splitting_ops", ["attention"], "namespace::op"),
    ("splitting_ops", "vcr::attention", "list of strings"),
    ("custom_ops", ["rms_norm"], "'+name' or '-name'"),
    ("max_compile_time", 0, "> 0"),
    ("max_compile_time", "10", "> 0"),
    ("fallback", "cpu", "'eager', 'compile'"),
    ("on_miss", "ignore", "'error', 'compile', 'compile_and_publish', 'eager'"),
    ("inductor_compile_config", {"x": object()}, "JSON"),
    ("inductor_compile_config", [("max_autotune", True)], "dict"),
    ("use_inductor", "yes", "True or False"),
    ("debug_compile", 1, "True or False"),
    ("cache", "s3://b/p", "must be a CacheConfig"),
])
def test_bad_values_name_the_field_and_allowed_values(field, value, needle) -> None:
    with pytest.raises(ConfigError) as info:
        CompilationConfig(**{field: value})
    assert f"CompilationConfig.{field}=" in str(info.value)
    assert needle in str(info.value)


def test_contradictory_backend_and_use_inductor() -> None:
    with pytest.raises(ConfigError, match="contradicts use_inductor"):
        CompilationConfig(backend="eager", use_inductor=True)


def test_nothing_to_compile_is_an_error() -> None:
    with pytest.raises(ConfigError, match="at least one size"):
        CompilationConfig(compile_dynamic=False)


def test_dict_and_json_round_trip() -> None:
    cfg = CompilationConfig(compile_sizes=[1, 2], inductor_compile_config={"max_autotune": True},
                            compilation_level="dynamo_once", on_miss="error",
                            cache=CacheConfig(cache_dir="s3://b/p", storage_options={"anon": True}))
    assert CompilationConfig.from_dict(cfg.to_dict()) == cfg
    assert CompilationConfig.from_json(cfg.to_json()) == cfg
    assert CompilationConfig(**cfg.to_dict()) == cfg  # `cache` given as a dict
    assert cfg.to_dict()["cache"]["storage_options"] == {"anon": True}


def test_from_dict_rejects_unknown_fields_and_bad_json() -> None:
    with pytest.raises(ConfigError, match=r"no field\(s\) \['sizes'\]"):
        CompilationConfig.from_dict({"sizes": [1]})
    with pytest.raises(ConfigError, match="not valid JSON"):
        CompilationConfig.from_json("{")


def test_hash_leaves_out_where_the_cache_lives() -> None:
    base = CompilationConfig(compile_sizes=[1, 2])
    moved = base.replace(on_miss="error", fallback="compile", max_compile_time=5,
                         compile_sizes=(4,)).with_cache(
        cache_dir="s3://other/prefix", storage_options={"anon": True}, staging_dir="/tmp/x")
    assert config_hash(base) == config_hash(moved)
    assert config_hash(base) != config_hash(base.replace(inductor_compile_config={"max_autotune": True}))
    assert config_hash(base) != config_hash(base.replace(compilation_level="dynamo_once"))
    assert config_hash(base) != config_hash(base.replace(splitting_ops=("vcr::other",)))


def test_fields_that_change_nothing_warn_and_stay_out_of_keys() -> None:
    base = CompilationConfig(compile_sizes=[1, 2])
    with pytest.warns(DeprecationWarning, match="custom_ops has no effect"):
        ops = base.replace(custom_ops=["+rms_norm"])
    with pytest.warns(DeprecationWarning, match="debug_compile has no effect"):
        debug = base.replace(debug_compile=True)
    assert config_hash(base) == config_hash(ops) == config_hash(debug)
    assert "custom_ops" not in base.hashed_fields() and "debug_compile" not in base.hashed_fields()
