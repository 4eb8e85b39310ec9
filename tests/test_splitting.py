"""The splitter is pure: a graph with a toy splitting op in, pieces out."""

import torch
from torch.library import custom_op

from vllm_compile_ray import CompilationConfig
from vllm_compile_ray.canonical import canonicalize
from vllm_compile_ray.plan import capture
from vllm_compile_ray.splitting import split_graph


@custom_op("vcrtest::mix", mutates_args=())
def mix(x: torch.Tensor) -> torch.Tensor:
    return x.flip(0).clone()


@mix.register_fake
def _(x):
    return torch.empty_like(x)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.ops.vcrtest.mix(torch.relu(self.a(x)))) + x


class Toy(torch.nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(n))

    def forward(self, x, scale):
        x = x * scale[:, None]
        for block in self.blocks:
            x = block(x)
        return x


def toy_graph(n: int = 3, tokens: int = 5):
    model = Toy(n)
    return model, capture(model, (torch.randn(tokens, 8), torch.rand(tokens)))


def test_split_at_the_splitting_op() -> None:
    model, gm = toy_graph(3)
    split_gm, items = split_graph(gm, ["vcrtest::mix"])
    assert [i.is_splitting_graph for i in items] == [False, True, False, True, False, True, False]
    assert [i.graph_id for i in items] == sorted(i.graph_id for i in items)
    for item in items:
        targets = [str(n.target) for n in item.graph.graph.nodes if n.op == "call_function"]
        assert ("vcrtest.mix" in targets) == item.is_splitting_graph
        if item.is_splitting_graph:
            assert targets == ["vcrtest.mix"]  # splitting ops stay alone, run eagerly
    args = [a for a in gm.graph.nodes if a.op == "placeholder"]
    assert len(args) > 2  # weights are lifted as inputs


def test_no_splitting_ops_gives_one_piece() -> None:
    _, gm = toy_graph(2)
    _, items = split_graph(gm, [])
    assert len(items) == 1 and not items[0].is_splitting_graph


def test_identical_layers_canonicalize_to_identical_code() -> None:
    _, gm = toy_graph(4)
    _, items = split_graph(gm, ["vcrtest::mix"])
    codes = [canonicalize(i.graph, "cpu").code for i in items if not i.is_splitting_graph]
    assert len(codes) == 5
    assert len(set(codes)) == 3  # first, middle (x3), last
    assert codes[1] == codes[2] == codes[3]
    assert "arg0" in codes[1] and "blocks" not in codes[1]


def test_canonical_input_spec_uses_canonical_symbols() -> None:
    _, gm = toy_graph(2, tokens=7)
    _, items = split_graph(gm, ["vcrtest::mix"])
    piece = canonicalize(items[2].graph, "cuda")
    tensors = [s for s in piece.input_specs if s.kind == "tensor"]
    assert tensors[0].shape == ("s0", 8) and tensors[0].stride == (8, 1)
    assert all(s.device_type == "cuda" for s in tensors)
    assert piece.symbols == ("s0",)
    assert "7" not in repr(piece.input_specs)  # the trace-time size never enters the spec
    assert piece.shape_locator() is not None


def test_compiled_toy_matches_eager_with_eager_backend(tmp_path) -> None:
    import vllm_compile_ray as vcr

    model = Toy(3)
    cfg = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=[4],
                            splitting_ops=["vcrtest::mix"], cache_dir=str(tmp_path))
    compiled = vcr.compile(model, cfg)
    for n in (1, 4, 6):
        x, s = torch.randn(n, 8), torch.rand(n)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, s), model(x, s))
    assert compiled.counter.num_graphs_seen == 1
    assert compiled.plan.summary()["unique_pieces"] == 3
