"""Inductor's failed GEMM autotune choices are counted, not logged (`inductor_metrics`)."""

from __future__ import annotations


def test_failed_autotune_choices_are_counted_not_logged() -> None:
    """Inductor's `log.exception` per failed choice (a traceback each) is dropped and counted;
    its other records still log. The message is Inductor's: this fails when it moves."""
    import inspect
    import logging

    from torch._inductor import select_algorithm

    from vllm_compile_ray.torch_private import inductor_metrics

    assert f'"{inductor_metrics.AUTOTUNE_FAILURE_MSG}"' in inspect.getsource(select_algorithm)
    assert select_algorithm.log.name == inductor_metrics.AUTOTUNE_FAILURE_LOGGER
    error = RuntimeError("No valid triton configs. OutOfResources: out of resource: shared memory"
                         "\nsecond line")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # torch's loggers do not propagate to pytest's caplog
    select_algorithm.log.addHandler(handler)
    level = select_algorithm.log.level
    select_algorithm.log.setLevel(logging.INFO)
    try:
        with inductor_metrics.autotune_failures() as failed:
            for choice in ("triton_mm_1", "triton_mm_2"):
                select_algorithm.log.exception(inductor_metrics.AUTOTUNE_FAILURE_MSG, error, choice,
                                               exc_info=error)
            select_algorithm.log.info("Precompiling benchmark choice %s took %.02fs", "mm", 0.1)
        with inductor_metrics.autotune_failures() as none:
            pass
    finally:
        select_algorithm.log.removeHandler(handler)
        select_algorithm.log.setLevel(level)
    assert failed == {"autotune_failed": 2, "autotune_error": "No valid triton configs. "
                      "OutOfResources: out of resource: shared memory"}
    assert none == {"autotune_failed": 0}
    assert [r.getMessage() for r in records] == ["Precompiling benchmark choice mm took 0.10s"]
