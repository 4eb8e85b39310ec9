"""warm's option dataclasses: validated at construction (ConfigError naming the field and what is
allowed), built the same way by the CLI, and the keyword arguments of the last release mapped
onto them with a DeprecationWarning."""

from __future__ import annotations

import warnings

import pytest

from vllm_compile_ray import ComputeOptions, RetryOptions
from vllm_compile_ray.cli.options import make_compute
from vllm_compile_ray.errors import ConfigError
from vllm_compile_ray.orchestration.options import from_keywords


@pytest.mark.parametrize("kwargs,needle", [
    ({"device_type": "tpu"}, "device_type='tpu' is invalid: allowed 'cuda', 'cpu'"),
    ({"gpus_per_compile": -1}, "ComputeOptions.gpus_per_compile=-1 is invalid: must be a number >= 0"),
    ({"cpus_per_compile": "1"}, "ComputeOptions.cpus_per_compile='1' is invalid"),
    ({"resources": {"H200": "a lot"}}, "ComputeOptions.resources=.* must map Ray resource names"),
    ({"max_in_flight": 0}, "max_in_flight=0 is invalid: must be >= 1"),
    ({"pool": "yes"}, "ComputeOptions.pool='yes' is invalid: must be True or False"),
    ({"pool_idle_timeout_s": 0}, "pool_idle_timeout_s=0 is invalid: must be a number of seconds"),
    ({"device_type": "cpu", "gpu_sharing": "mps"}, "gpu_sharing='mps' shares CUDA GPUs"),
    ({"gpu_sharing": "mig"}, "gpu_sharing='mig' is invalid: allowed 'time-slice', 'mps'"),
])
def test_compute_options_name_the_bad_field(kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        ComputeOptions(**kwargs)


def test_retry_options_and_frozen() -> None:
    with pytest.raises(ConfigError, match="RetryOptions.max_retries=-1 is invalid: must be an int >= 0"):
        RetryOptions(max_retries=-1)
    options = ComputeOptions(device_type="cpu", gpus_per_compile=1, resources={"a": 1})
    assert options.gpus_per_compile == 1.0 and isinstance(options.gpus_per_compile, float)
    with pytest.raises(AttributeError):
        options.pool = True  # type: ignore[misc]


def test_old_keywords_still_work_for_a_release_with_a_warning() -> None:
    base = ComputeOptions(device_type="cpu", cpus_per_compile=0.5)
    with pytest.warns(DeprecationWarning, match=r"warm\(max_in_flight=, max_retries=\) is "
                      r"deprecated.*max_in_flight= -> compute, max_retries= -> retry"):
        compute, retry = from_keywords(base, None, {"max_in_flight": 2, "max_retries": 0})
    assert compute == base.replace(max_in_flight=2) and retry == RetryOptions(max_retries=0)
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="max_in_flight=0"):
        from_keywords(None, None, {"max_in_flight": 0})  # validated like the new form
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['tune_gemms'\]"):
        from_keywords(None, None, {"tune_gemms": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_keywords(None, None, {}) == (ComputeOptions(), RetryOptions())


def test_the_cli_builds_the_same_options() -> None:
    opts = {"device": "cpu", "gpus_per_compile": None, "cpus_per_compile": 2.0, "resources": {},
            "max_in_flight": 4, "address": None, "pool": True, "pool_idle_timeout": 60.0,
            "gpu_sharing": "time-slice"}
    assert make_compute(opts) == ComputeOptions(device_type="cpu", cpus_per_compile=2.0,
                                                max_in_flight=4, pool=True,
                                                pool_idle_timeout_s=60.0)
