"""Real Inductor on transformers models (one MoE, its FP8 checkpoint, one sliding-window, GPT-2):
process A compiles and publishes every unique piece; a fresh process B loads them with zero
compiles; both match transformers' own output. B shares A's Inductor cache directory: on CPU a loaded artifact
rebuilds its C++ kernels (NOTES.md), which the directory saves; the compiles counted here are
this package's, and B makes none."""

import json
import pickle
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vllm_compile_ray as vcr

pytestmark = pytest.mark.inductor
SCRIPT = Path(__file__).parent / "scripts" / "run_hf_model.py"
ARCHS = ("qwen3_moe", "qwen3_moe_fp8", "mistral", "gpt2")


def run(config: vcr.CompilationConfig, out: Path, env: dict) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), config.to_json(), str(out), ",".join(ARCHS),
                    "5,9"], check=True, env=env, timeout=900)
    return json.loads(out.read_text())


def test_transformers_models_compile_once_and_load_in_a_fresh_process(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    config = vcr.CompilationConfig(cache=vcr.CacheConfig(cache_dir=str(tmp_path / "cache"),
                                                         staging_dir=str(tmp_path / "a")))
    a = run(config, tmp_path / "a.json", env)
    b = run(config.replace(on_miss="error").with_cache(staging_dir=str(tmp_path / "b")),
            tmp_path / "b.json", env)
    for arch in ARCHS:
        assert a[arch]["counter"]["num_inductor_compiles"] == a[arch]["unique"] == 3, arch
        assert b[arch]["keys"] == a[arch]["keys"]
        assert b[arch]["counter"]["num_backend_compilations"] == 0, arch
        assert b[arch]["counter"]["num_artifacts_loaded"] == 3, arch
        for run_ in (a, b):
            assert max(run_[arch]["max_abs_diff"].values()) < 1e-4, (arch, run_[arch])


class WithConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * self.scale


def test_a_piece_holding_a_tensor_constant_compiles_and_loads() -> None:
    """A graph attribute (get_attr) becomes a trailing input of the canonical piece: Inductor
    compiles it under fake tensors, static and dynamic, and the loaded artifact gets it too."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from vllm_compile_ray.torch_private import inductor
    from vllm_compile_ray.planning.canonical import canonicalize

    gm = torch.fx.symbolic_trace(WithConstant())
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env):
        size = shape_env.create_symintnode(shape_env.create_symbol(
            8, source=ConstantSource("n"), dynamic_dim=DimDynamic.DYNAMIC), hint=8)
        fake = torch.empty(size, 4)
    next(n for n in gm.graph.nodes if n.op == "placeholder").meta["example_value"] = fake
    piece = pickle.loads(pickle.dumps(canonicalize(gm, "cpu")))
    assert [s.shape for s in piece.input_specs] == [("s0", 4), (4,)]
    x = torch.randn(6, 4)
    want = WithConstant()(x)
    _, data, _ = inductor.compile_dynamic(piece.graph, piece.input_specs, "cpu", {})
    static, _ = inductor.compile_static(piece.graph, [x, *piece.constants], {}, save=False)
    for fn in (inductor.load_artifact(data), static):
        assert torch.equal(fn(x, *piece.constants)[0], want)
