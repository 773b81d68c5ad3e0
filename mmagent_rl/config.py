"""Structured config: the single source of truth, registered with Hydra.

Every section is a dataclass; Hydra validates the YAML and the command line against
them, so an unknown key or a wrong type fails at start, before any actor exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from mmagent_rl import algos
from mmagent_rl.data.demos import DemoConfig
from mmagent_rl.data.synthetic import SyntheticConfig
from mmagent_rl.rollout.agent_loop import AgentConfig
from mmagent_rl.rollout.engine import EngineConfig



@dataclass
class ModelConfig:
    name: str = "tiny"
    # A local folder (or hub name on machines with a hub). None = build the tiny model.
    path: Optional[str] = None
    tiny_seed: int = 0
    tiny_family: str = "qwen2_5_vl"  # or qwen3_vl
    tiny_variant: str = "plain"  # or agent: the embedded agent's base (models/tiny.py)
    dtype: str = "float32"
    system_prompt: Optional[str] = None  # None = the default tool prompt
    # Image resolution bounds (pixels after resizing) for the learner's processor and
    # vLLM's (mm_processor_kwargs); null = the checkpoint's preprocessor_config.json.
    # rollout.engine.min_pixels/max_pixels follow these (conf/config.yaml).
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    attn_implementation: str = "sdpa"  # the HF learner's attention (eager, sdpa, ...)
    gradient_checkpointing: bool = False  # learner: recompute activations in backward


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | file
    path: Optional[str] = None  # jsonl or parquet, for kind=file
    eval_path: Optional[str] = None
    # kind=file without eval_path: the share of data.path held out for eval, drawn with
    # data.seed (those rows never train). null: an eval needs data.eval_path.
    eval_fraction: Optional[float] = None
    seed: int = 0
    # The held-out split's seed; None = data.seed. The testbed preset (data=synthetic_hard)
    # ties data.seed to the run's seed (the data order varies across seeds) and keeps
    # this fixed, so every run of a sweep is evaluated on the same examples.
    eval_seed: Optional[int] = None
    train_size: int = 100_000
    # 256 x eval.n_samples 4: two 128-example sets of the testbed started 8 points apart
    eval_size: int = 256
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # kind=file: rows whose image is larger are skipped (decompression bombs)
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 256 * 2**20
    # kind=file: the file's format, auto (told from the path) | rows | verl | hf | tsv |
    # vstar (docs/data_formats.md)
    format: str = "auto"
    # keep: a row's own system prompt (verl prompts) replaces the configured one;
    # config: rows' system prompts are ignored
    system_prompt: str = "config"
    # format=hf: the DatasetDict split to read; null: train for training, test (else
    # validation, else the only split) for eval
    split: Optional[str] = None
    # Where relative image paths start; null: the data file's folder
    image_root: Optional[str] = None
    # hf (and rows' optional columns): role -> column name, e.g. {question: prompt_text}
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class RolloutConfig:
    num_workers: int = 1
    num_cpus: float = 0.5  # fractional: 2-core machines must fit everything
    num_gpus: float = 0.0
    # Spread the rollout workers over the cluster's nodes (Ray's SPREAD strategy), so
    # one lost node takes few engines with it; false = Ray's default placement.
    spread_nodes: bool = False
    n: int = 4  # samples per prompt (group size G)
    engine: EngineConfig = field(default_factory=EngineConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    # The tools the agent can call, by import path "package.module:attribute"
    # (docs/tools.md); built in: mmagent_rl.tools.zoom:image_zoom_in_tool and
    # mmagent_rl.tools.rotate:image_rotate_tool. Loaded at start; a bad entry fails there.
    tools: list = field(default_factory=lambda: ["mmagent_rl.tools.zoom:image_zoom_in_tool"])
    # A tool call running longer becomes "Error: tool X timed out after N s" (tools that
    # set their own timeout_s keep it; the built-in ones run inline, without one).
    tool_timeout_s: float = 30.0
    # The tools' schemas in the system prompt (Qwen's "# Tools" section): auto = only
    # when rollout.tools is not the default zoom alone (the default prompts and the
    # shipped embedded agent's describe the zoom call themselves); true; false.
    tools_in_prompt: str = "auto"


@dataclass
class ClipConfig:
    arch: str = "embedded"  # the shipped tiny CLIP; or ViT-B-32, ViT-L-14, ... (open_clip)
    checkpoint: Optional[str] = None  # local weights for a named architecture
    device: str = "cpu"
    batch_size: int = 64


@dataclass
class JudgeConfig:
    """A model judge (reward.fn=mmagent_rl.reward.judge:judge_reward; docs/rewards.md):
    an OpenAI-compatible chat server says yes/no to each extracted <answer>."""
    url: str = "http://127.0.0.1:8000/v1"  # base URL; /chat/completions is appended
    model: str = "judge"  # the served model name
    api_key: Optional[str] = None  # sent as a Bearer token; None: none sent
    # Fields: {question} {answer} {ground_truth}. None: judge.DEFAULT_PROMPT.
    prompt_template: Optional[str] = None
    # true: the server constrains the reply to "yes"/"no" (vLLM's structured_outputs
    # choice); false: any OpenAI-compatible server, the reply is parsed (yes/no or JSON)
    structured_output: bool = True
    extra_body: dict = field(default_factory=dict)  # merged into every request body
    concurrency: int = 8  # requests in flight per scoring batch
    timeout_s: float = 30.0  # per attempt
    retries: int = 2  # more attempts after a timeout, a refused connection, 429 or 5xx
    backoff_s: float = 0.5  # wait before retry k: backoff_s * 2**k
    # A judge that fails (no verdict after the retries) is counted (info judge_error,
    # metric reward/judge_errors) and the trajectory scored by: rule = the rule-based
    # match of reward.match_mode; zero = counted wrong.
    fallback: str = "rule"
    max_tokens: int = 16
    temperature: float = 0.0


@dataclass
class RewardConfig:
    fn: str = "mmagent_rl.reward.task:default_reward"  # or an async def (reward/judge.py)
    # exact | choice | number | auto (each example's answer_type; synthetic: exact)
    match_mode: str = "auto"
    format_weight: float = 0.0
    judge: JudgeConfig = field(default_factory=JudgeConfig)
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
    # trainer.off_policy_steps > 0: a token of a rollout sampled by older weights is
    # weighted by min(pi / mu, cap) (algos/offpolicy.py; verl's rollout_is_threshold
    # plays this part, 2.0 by default there too)
    off_policy_is_cap: float = 2.0


# name (no default: chosen with +algo=grpo; launch refuses to start without) and one
# section per registered algorithm with settings: grpo (shared by all), mapo, papo, ...
AlgoConfig = algos.config_class()


@dataclass
class SyncConfig:
    # object_store: Ray's shared store (mmagent_rl/learner/sync.py); transfer: vLLM's
    # weight-transfer protocol (mmagent_rl/transfer.py: gloo on CPU, NCCL / CUDA IPC on GPU)
    backend: str = "object_store"
    # > 0: send the weights as objects (object_store) or packed buffers (transfer) of at
    # most this many MB: less extra memory on learner and engine; 0: one object / buffer
    bucket_mb: float = 0.0
    # transfer: how long an engine waits for the sender's data before it gives up on a
    # push (and keeps its weights); also the control calls' timeout
    timeout_s: float = 120.0


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
    # A step whose loss or gradients are NaN/inf is skipped (no update); after this many
    # in a row the run stops cleanly (metrics and a checkpoint saved). 0 = never stop.
    max_nonfinite_steps: int = 3
    # Every N steps a full checkpoint in <run dir>/checkpoints/step_<N>/ (0 = off):
    # weights, optimizer, LR schedule, data position, RNG states (mmagent_rl/checkpoint.py)
    save_every: int = 0
    keep_checkpoints: int = 2  # the newest N step_<N> checkpoints are kept
    # none | auto (the latest complete checkpoint under the run dir, if any) | a path
    resume: str = "none"
    # A rollout or reward actor that dies is restarted by Ray this many times (each),
    # and its share of the step retried (mmagent_rl/faults.py); a learner that dies
    # stops the run (exit status 4), to be resumed with trainer.resume=auto.
    max_actor_restarts: int = 3
    actor_restart_timeout_s: float = 900.0  # for a restarted actor to answer again
    # Held-out evaluation inside training (mmagent_rl/eval.py, the eval.* keys): before
    # the first step, every N steps and after the last; 0 = none. The eval sampling has
    # its own per-request seeds (eval.seed), so the training rollouts are the same with
    # and without it.
    eval_every: int = 0
    # tool/use_rate below this warns once and sets tool/collapse_alarm (0 = no watch)
    tool_collapse_floor: float = 0.2
    # K > 0: the rollouts of the next steps are generated while this one trains, by
    # weights at most K versions old, reweighted by learner.off_policy_is_cap
    # (mmagent_rl/ahead.py, algos/offpolicy.py); 0 = the synchronous loop
    off_policy_steps: int = 0


@dataclass
class SFTStage:
    """One stage of an SFT curriculum (mmagent_rl/sft/curriculum.py): each step trains
    one batch of one sample kind, drawn from ``mix``; the stage ends after ``steps`` or
    once the mean of ``advance_metric`` over its last ``advance_window`` reports reaches
    ``advance_at`` (a skill gate, measured on fresh examples)."""
    name: str = "stage"
    steps: int = 100
    # sample kind -> share of steps (crop, locate, dialogue); given whole: a default
    # here would be merged into every stage's mix
    mix: dict[str, float] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=lambda: {"crop": 32, "locate": 8,
                                                             "dialogue": 8})
    easy_fraction: float = 0.1  # share of large targets (answered without a tool)
    crop_scale: Optional[list[float]] = None  # crop samples: box of [lo, hi] x the square
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticConfig overrides
    blob: float = 0.0  # > 0: a filled disc of this many ring radii over the ring
    blob_color: bool = False  # the disc in the answer's colour instead of black
    think: Optional[str] = None  # thinking before the tool call ({color}: the answer)
    think_prob: float = 1.0  # share of locate samples that use ``think``
    advance_metric: Optional[str] = None  # e.g. locate/near_xy1 (sft/probes.py)
    advance_at: float = 0.0
    advance_window: int = 20


@dataclass
class SFTConfig:
    data_path: Optional[str] = None  # jsonl of demonstration rows; None = generated demos
    steps: int = 200  # with stages: a cap on the curriculum's total steps
    batch_size: int = 16  # demonstrations per optimizer step (global; without stages)
    lr: float = 2e-3
    seed: int = 0
    demo: DemoConfig = field(default_factory=DemoConfig)
    # A curriculum on the synthetic task (conf/sft/embedded_agent.yaml); empty = plain SFT
    # of whole demonstrations with the learner's LR schedule. With stages the driver sets
    # the LR: linear warm-up, constant, cosine to min_lr_ratio over the last stage only.
    stages: list[SFTStage] = field(default_factory=list)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None  # None = the model the config names
    n_samples: int = 4  # per example
    k: int = 4  # pass@k
    temperature: float = 1.0
    max_examples: Optional[int] = None  # None = data.eval_size
    seed: int = 1234
    torch_threads: int = 2
    # A control: every tool crop is replaced by a blank image of the same size, so an
    # agent whose answers come from the zoom falls to about chance.
    blank_tool_images: bool = False


@dataclass
class LoggerConfig:
    jsonl: bool = True
    wandb: bool = False
    project: str = "mmagent_rl"
    # auto = online if WANDB_API_KEY is set, else offline (a WANDB_MODE variable wins).
    # A wandb failure warns and falls back (online -> offline -> disabled).
    wandb_mode: str = "auto"
    wandb_init_timeout_s: float = 30.0  # an online init that has not connected by then falls back
    tensorboard: bool = False  # scalars in <run dir>/tensorboard (torch.utils.tensorboard)


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
    # the run's seed; conf/config.yaml makes trainer.seed follow it, so a sweep can say
    # `seed=0,1` (trainer.seed=... still overrides it alone)
    seed: int = 0


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def system_prompt(cfg: Config) -> Optional[str]:
    """The configured prompt, or the one the algorithm asks for (MAPO "post" mode:
    a prompt that asks for a <description> after each crop)."""
    if not cfg.algo.name:
        return cfg.model.system_prompt
    from mmagent_rl.chat import DEFAULT_SYSTEM_PROMPT

    return algos.build(cfg.algo).system_prompt(cfg.model.system_prompt,
                                               DEFAULT_SYSTEM_PROMPT)


def agent_config(cfg: Config):
    """rollout.agent with what the data section decides: whether an example's own system
    prompt (verl rows) replaces the configured one (data.system_prompt=keep)."""
    import dataclasses

    return dataclasses.replace(cfg.rollout.agent,
                               keep_data_system_prompt=cfg.data.system_prompt == "keep")


def _choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; valid choices: {list(valid)}")


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express; fails before any actor starts."""
    algos.get(cfg.algo.name)  # an unknown name fails listing every registered one
    validate_common(cfg)
    validate_placement(cfg)


def validate_common(cfg: Config) -> None:
    """What every entry point (RL, SFT, eval) needs to hold."""
    choice = _choice
    choice("data.kind", cfg.data.kind, ("synthetic", "file"))
    from mmagent_rl.reward.task import AUTO_MODE, MATCH_MODES

    choice("reward.match_mode", cfg.reward.match_mode, (*MATCH_MODES, AUTO_MODE))
    choice("data.format", cfg.data.format, ("auto", "rows", "verl", "hf", "tsv", "vstar"))
    choice("data.system_prompt", cfg.data.system_prompt, ("keep", "config"))
    choice("learner.zero_stage", cfg.learner.zero_stage, (0, 1, 2, 3))
    choice("learner.lr_schedule", cfg.learner.lr_schedule, ("constant", "cosine"))
    from mmagent_rl.wire import check_backend

    check_backend(cfg.sync.backend)
    for key, v in (("rollout.n", cfg.rollout.n), ("rollout.num_workers", cfg.rollout.num_workers),
                   ("learner.num_workers", cfg.learner.num_workers),
                   ("learner.micro_batch_size", cfg.learner.micro_batch_size),
                   ("trainer.prompts_per_step", cfg.trainer.prompts_per_step)):
        if v < 1:
            raise ValueError(f"{key} must be >= 1, got {v}")
    if cfg.data.kind == "file" and not cfg.data.path:
        raise ValueError("data.kind=file needs data.path (a file, folder or glob in one of "
                         "the data.format formats: docs/data_formats.md)")
    if cfg.trainer.off_policy_steps < 0:
        raise ValueError(f"trainer.off_policy_steps must be >= 0, got "
                         f"{cfg.trainer.off_policy_steps}")
    if cfg.learner.off_policy_is_cap < 1.0:
        raise ValueError("learner.off_policy_is_cap must be >= 1 (it truncates pi/mu from "
                         f"above), got {cfg.learner.off_policy_is_cap}")
    agent = cfg.rollout.agent
    if agent.max_turns + 1 > cfg.rollout.engine.max_images_per_prompt:
        raise ValueError(
            f"rollout.agent.max_turns={agent.max_turns} needs "
            f"rollout.engine.max_images_per_prompt >= {agent.max_turns + 1}")
    if agent.max_total_tokens > cfg.rollout.engine.max_model_len:
        raise ValueError("rollout.agent.max_total_tokens must be <= rollout.engine.max_model_len")
    _validate_model_and_run(cfg)


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3",
                        "flex_attention")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _validate_model_and_run(cfg: Config) -> None:
    """The model knobs, logging, checkpoint and resume keys."""
    m, eng = cfg.model, cfg.rollout.engine
    _choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)
    _choice("logger.wandb_mode", cfg.logger.wandb_mode, WANDB_MODES)
    for key, v in (("model.min_pixels", m.min_pixels), ("model.max_pixels", m.max_pixels)):
        if v is not None and v < 1:
            raise ValueError(f"{key}={v} must be >= 1 (pixels), or null for the "
                             "checkpoint's own setting")
    if m.min_pixels is not None and m.max_pixels is not None and m.min_pixels > m.max_pixels:
        raise ValueError(f"model.min_pixels={m.min_pixels} must be <= "
                         f"model.max_pixels={m.max_pixels}")
    for name in ("min_pixels", "max_pixels"):
        if getattr(eng, name) != getattr(m, name):
            raise ValueError(
                f"rollout.engine.{name}={getattr(eng, name)} differs from model.{name}="
                f"{getattr(m, name)}: engine and learner must resize images alike (conf/"
                f"config.yaml makes the engine follow model.{name}: set that one)")
    if cfg.trainer.save_every < 0:
        raise ValueError(f"trainer.save_every={cfg.trainer.save_every} must be >= 0 "
                         "(0 = no periodic checkpoints)")
    if cfg.trainer.keep_checkpoints < 1:
        raise ValueError(f"trainer.keep_checkpoints={cfg.trainer.keep_checkpoints} must "
                         "be >= 1")
    if cfg.trainer.eval_every < 0:
        raise ValueError(f"trainer.eval_every={cfg.trainer.eval_every} must be >= 0 "
                         "(0 = no held-out eval during training)")
    frac = cfg.data.eval_fraction
    if frac is not None and not 0 < frac < 1:
        raise ValueError(f"data.eval_fraction={frac} must be in (0, 1), or null")
    if (cfg.trainer.eval_every and cfg.data.kind == "file" and not cfg.data.eval_path
            and not frac):
        raise ValueError("trainer.eval_every with data.kind=file needs data.eval_path (a "
                         "held-out file) or data.eval_fraction (a seeded share of "
                         "data.path held out): never an eval on the training file")
    if cfg.trainer.max_actor_restarts < 0:
        raise ValueError(f"trainer.max_actor_restarts={cfg.trainer.max_actor_restarts} "
                         "must be >= 0 (0 = a dead rollout or reward actor ends the run)")
    if not cfg.trainer.resume:
        raise ValueError("trainer.resume='' is not valid; valid: none, auto or the path "
                         "of a checkpoint folder (checkpoints/step_<N>)")


def _actors(cfg: Config) -> list[tuple[str, int, float, float]]:
    """(config section, count, CPUs each, GPUs each) of every actor an RL run starts."""
    return [("rollout", cfg.rollout.num_workers, cfg.rollout.num_cpus, cfg.rollout.num_gpus),
            ("learner", cfg.learner.num_workers, cfg.learner.num_cpus, cfg.learner.num_gpus),
            ("reward", 1, cfg.reward.num_cpus, cfg.reward.num_gpus)]


def validate_placement(cfg: Config) -> None:
    """Placements that can never be scheduled, and batch shapes that cannot work: they
    fail here, before Ray or any actor starts, naming the keys and the limits."""
    for sec, _, cpus, gpus in _actors(cfg):
        if cpus < 0:
            raise ValueError(f"{sec}.num_cpus={cpus} must be >= 0")
        if gpus < 0:
            raise ValueError(f"{sec}.num_gpus={gpus} must be >= 0")
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(
                f"{sec}.num_gpus={gpus}: a request above one GPU must be a whole number "
                f"of GPUs (Ray cannot split it); valid: a fraction <= 1, or "
                f"{int(gpus)} or {int(gpus) + 1}")
    tp, rg = cfg.rollout.engine.tensor_parallel_size, cfg.rollout.num_gpus
    if tp < 1:
        raise ValueError(f"rollout.engine.tensor_parallel_size={tp} must be >= 1")
    if rg > 0 and tp > 1 and (rg != int(rg) or int(rg) % tp):
        valid = [d for d in range(1, int(rg) + 1) if int(rg) % d == 0] if rg >= 1 else [1]
        raise ValueError(
            f"rollout.engine.tensor_parallel_size={tp} does not divide rollout.num_gpus={rg} "
            f"(the GPUs of one rollout worker: vLLM needs one GPU per tensor-parallel "
            f"rank inside it); valid tensor_parallel_size: {valid}, or set "
            f"rollout.num_gpus={tp}")
    L, T = cfg.learner, cfg.trainer
    per_learner = T.prompts_per_step * cfg.rollout.n / L.num_workers
    if L.micro_batch_size > math.ceil(per_learner):
        raise ValueError(
            f"learner.micro_batch_size={L.micro_batch_size} is larger than the per-learner "
            f"batch: trainer.prompts_per_step={T.prompts_per_step} x rollout.n="
            f"{cfg.rollout.n} / learner.num_workers={L.num_workers} = "
            f"{math.ceil(per_learner)} trajectories; valid: learner.micro_batch_size <= "
            f"{math.ceil(per_learner)}")
    if T.ray_num_cpus is not None:
        check_resources(cfg, {"CPU": T.ray_num_cpus}, source="trainer.ray_num_cpus")


def check_resources(cfg: Config, resources: dict, source: str = "the Ray cluster") -> None:
    """The run's total CPU/GPU requests against what a cluster has (``resources`` as
    ``ray.cluster_resources()`` gives it; a resource it does not name is not checked,
    except GPUs: none named means none)."""
    acts = _actors(cfg)

    def detail(i: int) -> str:  # i = 2: CPUs, 3: GPUs
        unit = "cpus" if i == 2 else "gpus"
        return " + ".join(f"{a[i]:g} (reward.num_{unit})" if a[0] == "reward" else
                          f"{a[1]} x {a[i]:g} ({a[0]}.num_workers x {a[0]}.num_{unit})"
                          for a in acts)

    cpus = sum(n * c for _, n, c, _ in acts)
    gpus = sum(n * g for _, n, _, g in acts)
    have_cpu = resources.get("CPU")
    if have_cpu is not None and cpus > have_cpu + 1e-9:
        raise ValueError(f"the actors ask for {cpus:g} CPUs = {detail(2)}, but {source} "
                         f"has {have_cpu:g}; lower the num_cpus keys or num_workers")
    if "GPU" in resources or source == "the Ray cluster":
        have_gpu = resources.get("GPU", 0.0)
        if gpus > have_gpu + 1e-9:
            raise ValueError(f"the actors ask for {gpus:g} GPUs = {detail(3)}, but {source} "
                             f"has {have_gpu:g}; lower the num_gpus keys or num_workers")
