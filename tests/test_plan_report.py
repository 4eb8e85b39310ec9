"""`plan_report`: the text `vcr plan` prints for people (pure unit tier: meta model, no compile)."""

from __future__ import annotations

from pathlib import Path

from vllm_compile_ray import CompilationConfig, models, plan_model
from vllm_compile_ray.planning.plan_report import plan_report, total_params, warm_command

DATA = Path(__file__).parent / "data" / "configs"


def test_report_names_architecture_sizes_plan_and_warm_command() -> None:
    path = str(DATA / "qwen3-30b-a3b.json")
    module = models.build(path, 8, 0, device="meta", num_layers=4)
    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(1, 8))
    text = plan_report(path, module, plan_model(module, config, device_type="cpu"), tp_size=8,
                       num_layers=4, cache="s3://bucket/vcr")
    head, params, plan, warm = text.splitlines()
    assert head == f"Qwen3MoeForCausalLM ({path}), 4 layers, MoE 128 experts top-8"
    assert params.startswith("parameters: ") and " per rank x tp 8, " in params
    assert "bfloat16" in params
    assert plan == "plan: 5 pieces, 3 unique x 3 shapes (dynamic, 1, 8) = 9 compile tasks"
    assert warm == (f"fill the cache: vcr warm --model {path} --tp 8 --device cuda --sizes 1,8 "
                    "--num-layers 4 --cache s3://bucket/vcr")


def test_total_params_of_a_sharded_model_is_the_whole_model() -> None:
    rank = models.build(DATA / "mixtral-8x7b.json", 8, 3, device="meta")
    assert abs(total_params(rank) - 46.70e9) / 46.70e9 < 0.005
    assert warm_command("m", 1, (4,), device="cpu") == \
        "vcr warm --model m --tp 1 --device cpu --sizes 4 --no-dynamic --cache URL"


def test_report_counts_what_a_size_outside_the_first_graphs_guards_adds() -> None:
    """DeepSeek-V3 (transformers, on meta): its graph excludes 1 token, so the plan holds the
    graph dynamo traces at 1, and the line says what it adds."""
    import hf_models

    module = hf_models.build("deepseek_v3", device="meta")
    config = CompilationConfig(backend="eager", use_inductor=False, compile_sizes=(1, 2))
    plan = plan_model(module, config, device_type="cuda", fingerprint={"device_type": "cuda"})
    _, params, line, _ = plan_report("ds", module, plan, tp_size=1).splitlines()
    assert line == ("plan: 5 pieces, 4 unique x 3 shapes (dynamic, 1, 2) = 12 compile tasks, "
                    "+ 2 for the graph(s) dynamo traces at size 1 (outside the first graph's "
                    "guards) = 14")
    assert plan.graphs == 2 and len(plan.tasks()) == 14
    assert "total unknown" not in params  # a transformers model is whole at tp 1
