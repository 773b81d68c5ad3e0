"""Structured config: the single source of truth, registered with Hydra.

Every section is a dataclass; Hydra validates the YAML and the command line against
them, so an unknown key or a wrong type fails at start, before any actor exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from mmagent_rl.algos.axpo import AXPOConfig
from mmagent_rl.algos.grpo import GRPOConfig
from mmagent_rl.algos.mapo import MAPOConfig
from mmagent_rl.algos.papo import PAPOConfig
from mmagent_rl.data.demos import DemoConfig
from mmagent_rl.data.synthetic import SyntheticConfig
from mmagent_rl.rollout.agent_loop import AgentConfig
from mmagent_rl.rollout.engine import EngineConfig

ALGORITHMS = ("grpo", "mapo", "papo", "axpo")


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A local folder (or hub name on machines with a hub). None = build the tiny model.
    path: Optional[str] = None
    tiny_seed: int = 0
    tiny_family: str = "qwen2_5_vl"  # or qwen3_vl
    dtype: str = "float32"
    system_prompt: Optional[str] = None  # None = the default tool prompt


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | file
    path: Optional[str] = None  # jsonl or parquet, for kind=file
    eval_path: Optional[str] = None
    seed: int = 0
    train_size: int = 100_000
    eval_size: int = 64
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class RolloutConfig:
    num_workers: int = 1
    num_cpus: float = 0.5  # fractional: 2-core machines must fit everything
    num_gpus: float = 0.0
    n: int = 4  # samples per prompt (group size G)
    engine: EngineConfig = field(default_factory=EngineConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)


@dataclass
class ClipConfig:
    arch: str = "embedded"  # the shipped tiny CLIP; or ViT-B-32, ViT-L-14, ... (open_clip)
    checkpoint: Optional[str] = None  # local weights for a named architecture
    device: str = "cpu"
    batch_size: int = 64


@dataclass
class RewardConfig:
    fn: str = "mmagent_rl.reward.task:default_reward"
    match_mode: str = "exact"
    format_weight: float = 0.0
    clip: ClipConfig = field(default_factory=ClipConfig)
    num_cpus: float = 0.25
    num_gpus: float = 0.0


@dataclass
class LearnerConfig:
    num_workers: int = 2
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    torch_threads: int = 1
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class AlgoConfig:
    name: str = ""  # no default: chosen with +algo=grpo (launch refuses to start without)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # every algorithm is GRPO + one change
    mapo: MAPOConfig = field(default_factory=MAPOConfig)
    papo: PAPOConfig = field(default_factory=PAPOConfig)
    axpo: AXPOConfig = field(default_factory=AXPOConfig)


@dataclass
class SyncConfig:
    backend: str = "object_store"


@dataclass
class TrainerConfig:
    total_steps: int = 20
    prompts_per_step: int = 4  # B; a step trains on B * n trajectories
    seed: int = 0
    save_final: bool = True
    progress: bool = True
    ray_address: Optional[str] = None  # None = start a local Ray
    ray_num_cpus: Optional[float] = None
    step_timeout_s: float = 1800.0
    max_refill_rounds: int = 3  # dynamic sampling (algo.grpo.dynamic_sampling)


@dataclass
class SFTConfig:
    data_path: Optional[str] = None  # jsonl of demonstration rows; None = generated demos
    steps: int = 200
    batch_size: int = 16  # demonstrations per optimizer step (global)
    lr: float = 2e-3
    seed: int = 0
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None  # None = the model the config names
    n_samples: int = 4  # per example
    k: int = 4  # pass@k
    temperature: float = 1.0
    max_examples: Optional[int] = None  # None = data.eval_size
    seed: int = 1234
    torch_threads: int = 2


@dataclass
class LoggerConfig:
    jsonl: bool = True
    wandb: bool = False
    project: str = "mmagent_rl"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def system_prompt(cfg: Config) -> Optional[str]:
    """The configured prompt; for MAPO "post" mode, one that asks for <description>."""
    if cfg.model.system_prompt is None and cfg.algo.name == "mapo" \
            and cfg.algo.mapo.description == "post":
        from mmagent_rl.rollout.chat import MAPO_POST_SYSTEM_PROMPT

        return MAPO_POST_SYSTEM_PROMPT
    return cfg.model.system_prompt


def _choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; valid choices: {list(valid)}")


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express; fails before any actor starts."""
    _choice("algo.name", cfg.algo.name, ALGORITHMS)
    validate_common(cfg)


def validate_common(cfg: Config) -> None:
    """What every entry point (RL, SFT, eval) needs to hold."""
    choice = _choice
    choice("data.kind", cfg.data.kind, ("synthetic", "file"))
    choice("learner.zero_stage", cfg.learner.zero_stage, (0, 1, 2, 3))
    choice("learner.lr_schedule", cfg.learner.lr_schedule, ("constant", "cosine"))
    from mmagent_rl.learner.sync import check_backend

    check_backend(cfg.sync.backend)
    for key, v in (("rollout.n", cfg.rollout.n), ("rollout.num_workers", cfg.rollout.num_workers),
                   ("learner.num_workers", cfg.learner.num_workers),
                   ("learner.micro_batch_size", cfg.learner.micro_batch_size),
                   ("trainer.prompts_per_step", cfg.trainer.prompts_per_step)):
        if v < 1:
            raise ValueError(f"{key} must be >= 1, got {v}")
    if cfg.data.kind == "file" and not cfg.data.path:
        raise ValueError("data.kind=file needs data.path (a .jsonl or .parquet file)")
    agent = cfg.rollout.agent
    if agent.max_turns + 1 > cfg.rollout.engine.max_images_per_prompt:
        raise ValueError(
            f"rollout.agent.max_turns={agent.max_turns} needs "
            f"rollout.engine.max_images_per_prompt >= {agent.max_turns + 1}")
    if agent.max_total_tokens > cfg.rollout.engine.max_model_len:
        raise ValueError("rollout.agent.max_total_tokens must be <= rollout.engine.max_model_len")
