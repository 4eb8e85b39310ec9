"""`sizing.size_compiles`: compile slots from the GPU nodes' CPUs, GPUs and memory and the task
count. Pure: no Ray."""

from __future__ import annotations

import pytest

from vllm_compile_ray.orchestration.sizing import NodeResources, fits, gpu_fraction, size_compiles

GiB = 2**30
H200_HOST = NodeResources(cpus=16, gpus=1, memory=90 * GiB)  # the measured 1xH200 host


def test_three_compiles_per_four_cores_on_the_measured_host() -> None:
    sizing = size_compiles([H200_HOST], tasks=33)
    assert (sizing.slots, sizing.per_gpu, sizing.gpus_per_compile) == (12, 12, 0.0833)
    assert sizing.cpus_per_compile == 1.0
    assert sizing.describe() == ("sizing: 12 compile slots on 1 GPU node(s): 16 CPUs, 1 GPU -> "
                                 "1/12 GPU and 1 CPU each")


def test_no_more_slots_than_tasks_spread_over_nodes_and_gpus() -> None:
    node = NodeResources(cpus=128, gpus=8, memory=800 * GiB)
    one = size_compiles([node], tasks=33)
    assert (one.slots, one.per_gpu) == (33, 5)  # 5 per GPU, not 16 on two GPUs and 1 on a third
    two = size_compiles([node, node], tasks=33)
    assert (two.slots, two.per_gpu) == (33, 3)  # 17 per node -> 3 per GPU
    few = size_compiles([node], tasks=3)
    assert (few.slots, few.per_gpu, few.gpus_per_compile) == (3, 1, 1.0)
    assert few.describe().startswith("sizing: 3 compile slots for 3 tasks on 1 GPU node(s)")
    assert size_compiles([node]).slots == 96  # no task count: what the nodes hold (3/4 of 128)


def test_memory_caps_the_compiles_of_a_node() -> None:
    sizing = size_compiles([NodeResources(cpus=16, gpus=1, memory=22 * GiB)], tasks=33)
    assert (sizing.slots, sizing.per_gpu) == (5, 5)  # 22 GiB / 4 GiB
    tight = size_compiles([NodeResources(cpus=64, gpus=4, memory=10 * GiB)])
    assert tight.per_gpu == 1  # at least one compile per GPU
    unknown = size_compiles([NodeResources(cpus=16, gpus=1)])  # memory not reported: CPUs only
    assert unknown.slots == 12


def test_fractions_pack_as_ray_counts() -> None:
    """Ray counts 1/10000 units and fits fractions within one GPU: 1/7 = 0.1429 fits only 6."""
    assert fits(1, round(1 / 7, 4), "GPU") == 6
    for k in range(1, 65):
        assert fits(1, gpu_fraction(k), "GPU") >= k, k
    assert fits(4, gpu_fraction(8), "GPU") == 32
    with pytest.raises(ValueError, match="per_gpu"):
        gpu_fraction(0)
    sizing = size_compiles([NodeResources(cpus=10, gpus=1, memory=100 * GiB)])  # 7 of 10
    assert (sizing.slots, sizing.per_gpu, sizing.gpus_per_compile) == (7, 7, 0.1428)


def test_uneven_nodes_take_the_smallest_share_per_gpu() -> None:
    """One fraction for all: the node with the fewest compiles per GPU sets it; Ray's CPU
    request caps a node with more GPU slots than CPUs."""
    nodes = [NodeResources(cpus=16, gpus=1, memory=100 * GiB),
             NodeResources(cpus=16, gpus=3, memory=100 * GiB),  # 12 compiles: 4 per GPU
             NodeResources(cpus=64, gpus=0, memory=100 * GiB)]  # the CPU head: not a GPU node
    sizing = size_compiles(nodes)
    assert (sizing.nodes, sizing.per_gpu, sizing.slots) == (2, 4, 4 + 12)
    assert size_compiles([NodeResources(cpus=24, gpus=3, memory=100 * GiB)]).slots == 18  # 6/GPU


def test_cpu_requests_and_bad_arguments() -> None:
    sizing = size_compiles([H200_HOST], cpus_per_compile=2)
    assert (sizing.slots, sizing.per_gpu) == (6, 6)  # 12 of 16 cores, 2 each
    free = size_compiles([NodeResources(cpus=16, gpus=2, memory=40 * GiB)], cpus_per_compile=0)
    assert (free.slots, free.per_gpu) == (10, 5)  # no CPU request: memory bounds it
    assert size_compiles([NodeResources(cpus=64, gpus=0)]) is None
    assert size_compiles([]) is None
    with pytest.raises(ValueError, match="tasks=0"):
        size_compiles([H200_HOST], tasks=0)
    with pytest.raises(ValueError, match="cpus_per_compile=-1"):
        size_compiles([H200_HOST], cpus_per_compile=-1)


def test_cluster_sizing_reads_ray_nodes_and_names_what_is_missing() -> None:
    from vllm_compile_ray.errors import ClusterResourceError
    from vllm_compile_ray.orchestration.warm import _Request, cluster_sizing

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0, "memory": 90.0 * GiB}},
             {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0, "memory": 90.0 * GiB,
                                           "H200": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "H200": 1.0}}]
    assert cluster_sizing(_Request(0.0, 1.0, {}), tasks=40, nodes=nodes).slots == 24
    assert cluster_sizing(_Request(0.0, 1.0, {"H200": 0.01}), nodes=nodes).nodes == 1
    with pytest.raises(ClusterResourceError, match="has a GPU and {'H100': 0.01}"):
        cluster_sizing(_Request(0.0, 1.0, {"H100": 0.01}), nodes=nodes)
