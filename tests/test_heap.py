"""The garbage collector in compile processes (`heap`): freezing and measuring collections."""

import gc

import pytest

from vllm_compile_ray.compiling import heap


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # this test process goes on as Python started it


def _cycles(n: int) -> None:
    for _ in range(n):
        a: list = []
        a.append(a)


def test_freeze_takes_live_objects_out_of_collections(unfrozen):
    kept = [[i] for i in range(50_000)]  # alive at the freeze
    assert gc.get_freeze_count() == 0
    frozen = heap.freeze()
    # frozen objects that die leave the count (another test's thread may free some meanwhile)
    assert frozen >= gc.get_freeze_count() >= len(kept)
    tracked = len(gc.get_objects())
    assert tracked < frozen  # a full collection now walks far fewer objects than before
    _cycles(10)
    assert gc.collect() >= 10  # garbage made after the freeze is still collected


def test_collections_counts_what_runs_inside_the_block_only():
    gc.collect()
    with heap.collections() as outer:
        _cycles(100)
        gc.collect()
        with heap.collections() as inner:
            gc.collect(0)
    gc.collect()
    assert outer["collections"] == [1, 0, 1]
    assert inner["collections"] == [1, 0, 0]
    assert outer["seconds"] >= inner["seconds"] >= 0.0
    assert outer["frozen"] == gc.get_freeze_count()
    assert heap._callback not in gc.callbacks  # removed with the last open block
