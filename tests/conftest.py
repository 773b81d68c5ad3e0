"""Shared fixtures: the tiny model is built once per machine (cached) and reused."""
from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))  # tests use bench/chaos.py's helpers


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from mmagent_rl.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def chat(tiny_model_path):
    from mmagent_rl.rollout.chat import ChatFormat

    return ChatFormat.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def engine(tiny_model_path):
    """One real in-process vLLM engine (eager, fp32) for the whole session."""
    from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine

    return VLLMEngine(tiny_model_path, EngineConfig(max_model_len=2048, seed=0))


@pytest.fixture(scope="session")
def examples():
    from mmagent_rl.data.synthetic import SyntheticConfig, SyntheticDataset

    ds = SyntheticDataset(SyntheticConfig(), seed=0, size=8, split="train")
    return [ds[i] for i in range(8)]


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for the tests that start learner actors themselves (4 logical CPUs
    so two learners fit); shut down after the module."""
    import ray

    from mmagent_rl.config import Config
    from mmagent_rl.trainer import start_ray

    cfg = Config()
    cfg.trainer.ray_num_cpus = 4
    start_ray(cfg)
    yield
    ray.shutdown()


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the 200-step soak test (tests/test_soak.py; not in CI)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with pytest --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
