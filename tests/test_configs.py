"""Every model x cluster config composes, validates, and its placement fits its nodes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from mmagent_rl import config as C

CONF = Path(REPO) / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (CONF / "cluster").glob("*.yaml"))
REAL_MODELS = {"qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct",
               "qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct",
               "qwen3_vl_8b": "Qwen/Qwen3-VL-8B-Instruct"}
# The node shape each cluster file is written for (see the comment at its top):
# (nodes, GPUs per node, CPUs per node).
NODES = {"local_cpu": (1, 0, 2), "1node_8gpu": (1, 8, 32), "multinode": (2, 8, 32)}


def _compose(overrides: list[str], conf_dir: Path = CONF) -> C.Config:
    C.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def _actors(c: C.Config) -> list[tuple[str, float, float]]:
    """(name, CPUs, GPUs) of every actor the trainer starts."""
    return ([("rollout", c.rollout.num_cpus, c.rollout.num_gpus)] * c.rollout.num_workers
            + [("learner", c.learner.num_cpus, c.learner.num_gpus)] * c.learner.num_workers
            + [("reward", c.reward.num_cpus, c.reward.num_gpus)])


def _place(actors, nodes: int, gpus: int, cpus: int) -> list[int]:
    """Ray's accounting: a fractional GPU request must fit in what is left of one GPU,
    a whole one takes free GPUs, all on one node. First fit, largest first; returns the
    node of each actor (in decreasing-size order), or fails the test."""
    free_cpu = [float(cpus)] * nodes
    free_gpu = [[1.0] * gpus for _ in range(nodes)]
    placed = []
    for name, cpu, gpu in sorted(actors, key=lambda a: (-a[2], -a[1])):
        for n in range(nodes):
            if free_cpu[n] + 1e-9 < cpu:
                continue
            if gpu >= 1:
                assert gpu == int(gpu), f"{name}: more than one GPU must be whole GPUs"
                whole = [i for i, f in enumerate(free_gpu[n]) if f == 1.0]
                if len(whole) < gpu:
                    continue
                for i in whole[:int(gpu)]:
                    free_gpu[n][i] = 0.0
            elif gpu > 0:
                fits = [i for i, f in enumerate(free_gpu[n]) if f + 1e-9 >= gpu]
                if not fits:
                    continue
                i = min(fits, key=lambda i: free_gpu[n][i])  # best fit: share a GPU
                free_gpu[n][i] -= gpu
            free_cpu[n] -= cpu
            placed.append(n)
            break
        else:
            pytest.fail(f"{name} (cpu={cpu}, gpu={gpu}) does not fit on {nodes} x "
                        f"({gpus} GPUs, {cpus} CPUs)")
    return placed


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("model", MODELS)
def test_model_x_cluster_composes_and_fits(model, cluster):
    c = _compose(["+algo=grpo", f"model={model}", f"+cluster={cluster}"])
    C.validate(c)
    assert c.model.name == model
    if model in REAL_MODELS:
        assert c.model.path == REAL_MODELS[model] and c.model.dtype == "bfloat16"
    nodes, gpus, cpus = NODES[cluster]
    actors = _actors(c)
    assert sum(a[2] for a in actors) <= nodes * gpus
    assert sum(a[1] for a in actors) <= nodes * cpus
    _place(actors, nodes, gpus, cpus)
    tp = c.rollout.engine.tensor_parallel_size
    if gpus:
        assert c.model.dtype == c.rollout.engine.dtype == "bfloat16"
        assert c.rollout.num_gpus > 0 and c.learner.num_gpus >= 1
        # vLLM needs one GPU per tensor-parallel rank, inside one actor's allocation.
        if tp > 1:
            assert c.rollout.num_gpus == tp
        else:
            assert 0 < c.rollout.num_gpus <= 1
        assert 0 < c.reward.num_gpus < 1 and c.reward.clip.device == "cuda"
        assert c.learner.zero_stage in (2, 3)
    else:
        assert tp == 1 and c.rollout.num_gpus == c.learner.num_gpus == c.reward.num_gpus == 0
        assert c.rollout.engine.dtype == c.model.dtype  # engine and learner agree
    if nodes > 1:
        assert c.trainer.ray_address == "auto"  # submitted to a running cluster
        placed = _place(actors, nodes, gpus, cpus)
        assert len(set(placed)) == nodes  # it needs every node


def test_local_cpu_is_the_default_placement():
    assert _compose(["+algo=grpo", "+cluster=local_cpu"]) == _compose(["+algo=grpo"])


def test_command_line_overrides_the_cluster_file():
    c = _compose(["+algo=grpo", "model=qwen2_5_vl_3b", "+cluster=1node_8gpu",
                  "learner.zero_stage=2", "learner.num_workers=3"])
    assert (c.learner.zero_stage, c.learner.num_workers) == (2, 3)


def _error(overrides: list[str], conf_dir: Path = CONF) -> str:
    with pytest.raises(Exception) as e:
        _compose(overrides, conf_dir)
    return str(e.value)


def test_unknown_key_fails_naming_it(tmp_path):
    msg = _error(["+algo=grpo", "model=qwen2_5_vl_7b", "+cluster=1node_8gpu",
                  "rollout.num_gpuz=1"])
    assert "num_gpuz" in msg
    # A typo inside a cluster or model file fails the same way.
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "cluster" / "typo.yaml").write_text(
        "# @package _global_\nlearner:\n  num_gpu: 1\n")
    assert "num_gpu" in _error(["+algo=grpo", "+cluster=typo"], conf)
    (conf / "model" / "typo.yaml").write_text("name: x\nmax_pixels: 1000\n")
    assert "max_pixels" in _error(["+algo=grpo", "model=typo"], conf)


def test_unknown_cluster_lists_the_choices():
    msg = _error(["+algo=grpo", "+cluster=8node"])
    assert all(name in msg for name in CLUSTERS), msg
    assert os.path.isdir(CONF / "cluster")
