"""InductorPass hashing and the PostGradPassManager."""

import pytest
import torch.fx as fx

import vllm_compile_ray as vcr
from vllm_compile_ray.compiling.passes import CallableInductorPass, InductorPass, PostGradPassManager
from test_keys import CFG, cpu_fingerprint
from vllm_compile_ray.runtime.api import example_args, plan_model


class CountNodes(InductorPass):
    seen: list[int] = []

    def __call__(self, graph: fx.Graph) -> None:
        self.seen.append(len(graph.nodes))


class Noop(InductorPass):
    def __call__(self, graph: fx.Graph) -> None:
        pass


def test_hash_source_is_cached_and_instances_hash_as_their_class() -> None:
    InductorPass.hash_source.cache_clear()
    a, b = CountNodes(), CountNodes()
    assert a.uuid() == b.uuid()
    assert InductorPass.hash_source.cache_info().hits >= 1
    assert a.uuid() == InductorPass.hash_source(CountNodes)
    assert a.uuid() != Noop().uuid()


def test_manager_applies_in_order_with_timings_and_uuid() -> None:
    order = []

    def first(graph):
        order.append("first")

    def second(graph):
        order.append("second")

    manager = PostGradPassManager()
    manager.add(first)
    manager.add(CallableInductorPass(second))
    manager(fx.Graph())
    assert order == ["first", "second"]
    assert set(manager.timings) == {"first", "second"}
    uuid = manager.uuid()
    manager.add(Noop())
    assert manager.uuid() != uuid and len(manager.uuids()) == 3


def test_registered_passes_are_part_of_the_key() -> None:
    model = vcr.models.build("llama-tiny", device="meta", num_layers=2)
    plain = plan_model(model, CFG, device_type="cpu", fingerprint=cpu_fingerprint(), args=example_args())
    manager = PostGradPassManager()
    manager.add(Noop())
    with_pass = plan_model(model, CFG, device_type="cpu", fingerprint=cpu_fingerprint(),
                           args=example_args(), pass_manager=manager)
    assert set(plain.keys).isdisjoint(with_pass.keys)


@pytest.mark.inductor
def test_post_grad_passes_run_inside_a_real_inductor_compile(tmp_path, monkeypatch) -> None:
    """The manager is installed as Inductor's post-grad pass, next to user Inductor options."""
    import torch

    # A fresh Inductor cache: an FX-graph cache hit from an earlier run would skip the passes.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    graphs = []
    manager = PostGradPassManager()
    manager.add(lambda graph: graphs.append(len(graph.nodes)))
    cfg = vcr.CompilationConfig(inductor_compile_config={"max_autotune": False, "epilogue_fusion": True},
                                cache=vcr.CacheConfig(cache_dir=str(tmp_path)))
    model = vcr.models.build("llama-tiny", num_layers=1)
    compiled = vcr.compile(model, cfg, pass_manager=manager)
    ids, pos = torch.randint(0, 512, (3,)), torch.arange(3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    assert compiled.counter.num_inductor_compiles == 2 and len(graphs) == 2
    assert list(manager.timings) == ["<lambda>"] and len(manager.timings["<lambda>"]) == 2
