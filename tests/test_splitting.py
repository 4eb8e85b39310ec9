"""The splitter is pure: a graph with a toy splitting op in, pieces out."""

import torch
from torch.library import custom_op

from vllm_compile_ray import CacheConfig, CompilationConfig
from vllm_compile_ray.planning.canonical import canonicalize
from vllm_compile_ray.planning.plan import capture
from vllm_compile_ray.planning.splitting import split_graph


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
                            splitting_ops=["vcrtest::mix"],
                            cache=CacheConfig(cache_dir=str(tmp_path)))
    compiled = vcr.compile(model, cfg)
    for n in (1, 4, 6):
        x, s = torch.randn(n, 8), torch.rand(n)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, s), model(x, s))
    assert compiled.counter.num_graphs_seen == 1
    assert compiled.plan.summary()["unique_pieces"] == 3


def split_module_reference(gm, ops, monkeypatch):
    """split_graph through torch's split_module (the splitter's fallback) for comparison."""
    from vllm_compile_ray.planning import splitting

    with monkeypatch.context() as m:
        m.setattr(splitting, "_split_by_structure", lambda *args: None)
        return split_graph(gm, ops)


def test_splitter_matches_split_module_and_shares_identical_layers(monkeypatch) -> None:
    import vllm_compile_ray as vcr
    from vllm_compile_ray.runtime.api import example_args

    for gm in (toy_graph(4)[1],
               capture(vcr.models.build("llama-tiny", device="meta", num_layers=4), example_args())):
        ops = ["vcrtest::mix"] if "vcrtest" in gm.code else ["vcr::attention"]
        ref_gm, ref = split_module_reference(gm, ops, monkeypatch)
        new_gm, new = split_graph(gm, ops)
        assert new_gm.code == ref_gm.code  # the same calls, inputs and outputs at the top level
        assert [(i.submod_name, i.is_splitting_graph) for i in new] == \
            [(i.submod_name, i.is_splitting_graph) for i in ref]
        for a, b in zip(ref, new):
            if not a.is_splitting_graph:
                ca, cb = canonicalize(a.graph, "cpu"), canonicalize(b.graph, "cpu")
                assert (ca.code, ca.input_specs) == (cb.code, cb.input_specs)
        pieces = [i for i in new if not i.is_splitting_graph]
        assert len({id(i.graph) for i in pieces}) == 3  # first, middle (one module), last
        assert len({id(i.graph) for i in ref if not i.is_splitting_graph}) == len(pieces)


def test_split_graph_computes_what_the_graph_computes() -> None:
    """Shared modules for identical layers still run each layer on its own inputs."""
    _, gm = toy_graph(4, tokens=5)
    split_gm, _ = split_graph(gm, ["vcrtest::mix"])
    torch.manual_seed(0)
    args = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = node.meta["example_value"]
            args.append(torch.randn([int(d) for d in value.shape]) if isinstance(value, torch.Tensor)
                        else int(value))
    with torch.no_grad():
        expected, got = gm(*args), split_gm(*args)
    assert torch.equal(expected[0], got[0])


def test_graphs_with_global_state_use_split_module() -> None:
    from vllm_compile_ray.planning.splitting import _split_by_structure

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(torch._C._set_grad_enabled, (False,))
    y = graph.call_function(torch.relu, (x,))
    graph.output(y)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert _split_by_structure(gm, {n: 0 for n in graph.nodes}) is None


class OneTokenBranch(torch.nn.Module):
    """Code that branches on a single token: the graph traced at 8 tokens guards it away."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = torch.ops.vcrtest.mix(self.w(x))
        return y * 2 if x.shape[0] == 1 else y + 1


def test_a_size_outside_the_traced_guards_plans_a_graph_for_that_size_alone(tmp_path) -> None:
    """The plan calls the model as a rank does (8 tokens, then each static size); the call at 1
    token traces a second graph, keyed for size 1 alone, as the rank's backend keys it."""
    import vllm_compile_ray as vcr
    from vllm_compile_ray.runtime.api import plan_model

    config = CompilationConfig(backend="eager", compile_sizes=[1, 4],
                               splitting_ops=("vcrtest::mix",),
                               cache=CacheConfig(cache_dir=str(tmp_path)))
    inputs = lambda n, device: (torch.randn(n, 8, device=device),)  # noqa: E731
    fingerprint = {"device_type": "cpu", "note": "test"}
    plan = plan_model(OneTokenBranch(), config, device_type="cpu", fingerprint=fingerprint,
                      example_inputs=inputs)
    assert plan.graphs == 2 and plan.summary()["graphs"] == 2
    shapes = sorted(str(t.shape) for t in plan.tasks())
    # first graph: 2 pieces x (dynamic, 1, 4); the second: its pieces x (1) (the one around the
    # splitting op is shared with the first)
    assert shapes.count("1") == 3 and shapes.count("4") == 2 and shapes.count("dynamic") == 2

    model = OneTokenBranch()
    compiled = vcr.compile(model, config)
    for n in (8, 1, 4):
        x = torch.randn(n, 8)
        torch.testing.assert_close(compiled(x), model(x))
    assert [p.shapes for p in compiled.backend.plans] == [config.shapes, (1,)]
    assert set(compiled.backend.plans[0].keys) | set(compiled.backend.plans[1].keys) == \
        set(plan.rekeyed(compiled.backend.key_context).keys)
