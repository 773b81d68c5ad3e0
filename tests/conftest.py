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
    from mmagent_rl.chat import ChatFormat

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
    from mmagent_rl.cluster import start_ray

    cfg = Config()
    cfg.trainer.ray_num_cpus = 4
    start_ray(cfg)
    yield
    ray.shutdown()


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the 200-step soak test (tests/test_soak.py; not in CI)")


# Test tiers, applied at collection (a test's own unit/integration/e2e marker wins):
#   e2e          whole runs: marked slow or soak, or a module that launches training
#   integration  a real component through a fixture (engine, model, Ray) or a module
#                that starts one itself
#   unit         the rest: pure python/torch, each under UNIT_TIMEOUT_S (so a
#                misfiled heavy test fails `make test-fast` instead of slowing it)
TIERS = ("unit", "integration", "e2e")
E2E_MODULES = {"test_launch", "test_resume", "test_faults", "test_restarts", "test_node_loss",
               "test_cluster", "test_learning", "test_soak", "test_zero3", "test_guards",
               "test_logging", "test_sft", "test_embedded", "test_axpo_e2e",
               "test_algos_e2e", "test_papo_step", "test_docker"}
INTEGRATION_MODULES = {"test_engine_learner", "test_bench_smoke", "test_clip_model", "test_transfer",
                       "test_report", "test_configs", "test_fuzz"}
HEAVY_FIXTURES = {"engine", "tiny_model_path", "chat", "ray_session", "embedded_path"}
UNIT_TIMEOUT_S = 30


def tier_of(item) -> str:
    own = [t for t in TIERS if item.get_closest_marker(t)]
    if own:
        return own[0]
    module = item.module.__name__.rsplit(".", 1)[-1]
    if item.get_closest_marker("slow") or item.get_closest_marker("soak") \
            or module in E2E_MODULES:
        return "e2e"
    if module in INTEGRATION_MODULES or HEAVY_FIXTURES & set(item.fixturenames):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "unit" and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with pytest --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
