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
    (conf / "model" / "typo.yaml").write_text("name: x\nmax_pixelz: 1000\n")
    assert "max_pixelz" in _error(["+algo=grpo", "model=typo"], conf)


def test_unknown_cluster_lists_the_choices():
    msg = _error(["+algo=grpo", "+cluster=8node"])
    assert all(name in msg for name in CLUSTERS), msg
    assert os.path.isdir(CONF / "cluster")


@pytest.mark.parametrize("override, key", [
    ("trainer.total_steps=abc", "trainer.total_steps"),
    ("learner.num_gpus=many", "learner.num_gpus"),
    ("logger.wandb=maybe", "logger.wandb"),
    ("model.max_pixels=big", "model.max_pixels"),
])
def test_wrong_type_fails_naming_the_key(override, key):
    msg = _error(["+algo=grpo", override])
    assert key.split(".")[-1] in msg and override.split("=")[1] in msg, msg


def _invalid(overrides: list[str], resources: dict | None = None) -> str:
    """The message of the ValueError that validation (or the cluster check) raises."""
    c = _compose(["+algo=grpo", *overrides])
    with pytest.raises(ValueError) as e:
        C.validate(c)
        if resources is not None:
            C.check_resources(c, resources)
    return str(e.value)


GPU = ["model=qwen2_5_vl_7b", "+cluster=1node_8gpu"]


@pytest.mark.parametrize("overrides, resources, expected", [
    # GPU requests beyond the cluster's (known once Ray is up, before any actor starts)
    (GPU, {"CPU": 64.0, "GPU": 4.0},
     ["7.7 GPUs", "4 x 0.9 (rollout.num_workers x rollout.num_gpus)",
      "4 x 1 (learner.num_workers x learner.num_gpus)", "0.1 (reward.num_gpus)", "has 4"]),
    ([], {"CPU": 2.0}, None),  # the default CPU placement fits 2 cores
    (["rollout.num_gpus=0.5"], {"CPU": 2.0}, ["0.5 GPUs", "has 0"]),  # no GPU at all
    (["learner.num_workers=4"], {"CPU": 2.0}, ["2.75 CPUs", "learner.num_workers", "has 2"]),
    # static checks
    (["trainer.ray_num_cpus=1"], None, ["1.75 CPUs", "trainer.ray_num_cpus has 1"]),
    (GPU + ["rollout.num_gpus=1.5"], None, ["rollout.num_gpus=1.5", "whole number"]),
    (GPU + ["rollout.engine.tensor_parallel_size=2", "rollout.num_gpus=3"], None,
     ["rollout.engine.tensor_parallel_size=2", "rollout.num_gpus=3", "[1, 3]"]),
    (GPU + ["rollout.engine.tensor_parallel_size=2"], None,  # 0.9 of one GPU
     ["rollout.engine.tensor_parallel_size=2", "rollout.num_gpus=0.9", "[1]"]),
    (["rollout.engine.tensor_parallel_size=0"], None, ["tensor_parallel_size=0", ">= 1"]),
    (["learner.num_workers=0"], None, ["learner.num_workers", ">= 1", "got 0"]),
    (["learner.num_cpus=-1"], None, ["learner.num_cpus=-1", ">= 0"]),
    (["learner.micro_batch_size=9"], None,
     ["learner.micro_batch_size=9", "trainer.prompts_per_step=4", "rollout.n=4",
      "learner.num_workers=2", "<= 8"]),
    (["model.min_pixels=5000", "model.max_pixels=4000"], None,
     ["model.min_pixels=5000", "model.max_pixels=4000"]),
    (["model.max_pixels=4000", "rollout.engine.max_pixels=8000"], None,
     ["rollout.engine.max_pixels=8000", "model.max_pixels=4000"]),
    (["model.attn_implementation=fast"], None, ["model.attn_implementation", "sdpa", "eager"]),
    (["logger.wandb_mode=cloud"], None, ["logger.wandb_mode", "offline", "disabled"]),
    (["trainer.save_every=-1"], None, ["trainer.save_every=-1", ">= 0"]),
    (["trainer.keep_checkpoints=0"], None, ["trainer.keep_checkpoints=0", ">= 1"]),
    (["trainer.max_actor_restarts=-1"], None, ["trainer.max_actor_restarts=-1", ">= 0"]),
])
def test_impossible_placement_and_bad_values_fail_at_start(overrides, resources, expected):
    c = _compose(["+algo=grpo", *overrides])
    if expected is None:
        C.validate(c)
        C.check_resources(c, resources)
        return
    msg = _invalid(overrides, resources)
    assert all(e in msg for e in expected), (expected, msg)


def test_every_shipped_cluster_fits_its_own_node_shape():
    for cluster in CLUSTERS:
        nodes, gpus, cpus = NODES[cluster]
        c = _compose(["+algo=grpo", f"+cluster={cluster}"]
                     + (["model=qwen2_5_vl_7b"] if gpus else []))
        C.check_resources(c, {"CPU": float(nodes * cpus), "GPU": float(nodes * gpus)})


# ---- model knobs reach the learner's processor/model and vLLM --------------------------
PIX = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}


def test_model_pixels_flow_into_the_engine_config():
    c = _compose(["+algo=grpo", f"model.min_pixels={PIX['min_pixels']}",
                  f"model.max_pixels={PIX['max_pixels']}", "model.attn_implementation=eager",
                  "model.gradient_checkpointing=true"])
    C.validate(c)
    assert (c.rollout.engine.min_pixels, c.rollout.engine.max_pixels) == \
        (PIX["min_pixels"], PIX["max_pixels"])
    assert c.model.attn_implementation == "eager" and c.model.gradient_checkpointing
    d = _compose(["+algo=grpo"])
    assert (d.model.min_pixels, d.rollout.engine.max_pixels, d.model.attn_implementation,
            d.model.gradient_checkpointing) == (None, None, "sdpa", False)


def test_pixels_reach_the_processor_and_the_agent_loop(tiny_model_path):
    from PIL import Image

    from mmagent_rl.chat import load_chat
    from mmagent_rl.rollout.agent_loop import AgentLoop

    img = Image.new("RGB", (448, 448))
    default = load_chat(tiny_model_path)
    small = load_chat(tiny_model_path, None, PIX)
    assert default.image_grid(img) == (1, 16, 16) and small.image_grid(img) == (1, 8, 8)
    assert small.image_processor(images=[img])["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert small.max_pixels == PIX["max_pixels"]

    class Engine:  # what the agent loop reads from a VLLMEngine
        model_path, processor_kwargs = tiny_model_path, PIX

    loop = AgentLoop(Engine(), default)
    assert loop.chat.num_image_tokens(img) == 16 == default.num_image_tokens(img) // 4
    assert loop.chat.system_prompt == default.system_prompt


def test_pixels_reach_vllm_mm_processor_kwargs(tiny_model_path):
    """A real engine, in a subprocess (vLLM caches processors per process: an engine
    with other pixel bounds would change what the session's engine sees): the model's
    min/max_pixels and rollout.engine.extra's own mm_processor_kwargs both reach vLLM's
    multimodal config, and the agent loop counts the image's tokens with them."""
    import json
    import subprocess
    import sys

    code = f"""
import json, torch
torch.set_num_threads(1)
from mmagent_rl.chat import ChatFormat
from mmagent_rl.data.synthetic import SyntheticConfig, SyntheticDataset
from mmagent_rl.rollout.agent_loop import AgentLoop
from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine
PIX = {PIX!r}
eng = VLLMEngine({tiny_model_path!r}, EngineConfig(max_model_len=1024, **PIX,
                 extra={{"mm_processor_kwargs": {{"fps": 1}}}}))
mm = eng.llm.llm_engine.vllm_config.model_config.multimodal_config
chat = ChatFormat.from_pretrained({tiny_model_path!r})
ex = SyntheticDataset(SyntheticConfig(), seed=0, size=1, split="train")[0]
loop = AgentLoop(eng, chat)
(t,) = loop.run([ex], n=1, seed=0)
print(json.dumps({{"vllm": mm.mm_processor_kwargs, "engine": eng.processor_kwargs,
                  "generated": t.num_generated,
                  "prompt_pads": t.token_ids[:t.prompt_len].count(chat.image_token_id),
                  "counted": loop.chat.num_image_tokens(ex.image),
                  "default": chat.num_image_tokens(ex.image)}}))
"""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["vllm"] == {"fps": 1, **PIX} and got["engine"] == {"fps": 1, **PIX}
    assert got["generated"] > 0
    assert got["prompt_pads"] == got["counted"] < got["default"]


def test_learner_gets_attn_checkpointing_and_pixels(tiny_model_path, tmp_path):
    """A real (world size 1) DeepSpeed learner, in a subprocess (it initialises
    torch.distributed)."""
    import subprocess
    import sys

    code = f"""
import json, socket, torch
torch.set_num_threads(1)
from mmagent_rl.algos.grpo import GRPOConfig
from mmagent_rl.config import AlgoConfig, ModelConfig
from mmagent_rl.learner.worker import Learner
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
model = ModelConfig(attn_implementation="eager", gradient_checkpointing=True,
                    min_pixels={PIX['min_pixels']}, max_pixels={PIX['max_pixels']})
lr = Learner({tiny_model_path!r}, algo=AlgoConfig(name="grpo", grpo=GRPOConfig(kl_beta=0.01)),
             model=model, master_port=port)
m = lr.engine.module
lr.save({str(tmp_path / 'out')!r})
print(json.dumps({{"attn": m.config._attn_implementation,
                  "ref_attn": lr.ref.config._attn_implementation,
                  "ckpt": m.is_gradient_checkpointing, "ref_ckpt": lr.ref.is_gradient_checkpointing,
                  "max_pixels": lr.chat.max_pixels, "min_pixels": lr.chat.min_pixels}}))
"""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {"attn": "eager", "ref_attn": "eager", "ckpt": True, "ref_ckpt": False,
                   "max_pixels": PIX["max_pixels"], "min_pixels": PIX["min_pixels"]}
    saved = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    size = saved.get("image_processor", saved).get("size", {})
    assert size.get("longest_edge") == PIX["max_pixels"], saved


def test_top_level_seed_sets_the_trainer_seed_for_sweeps():
    assert _compose(["+algo=grpo", "seed=3"]).trainer.seed == 3
    assert _compose(["+algo=grpo", "seed=3", "trainer.seed=5"]).trainer.seed == 5
    assert _compose(["+algo=grpo"]).trainer.seed == 0
