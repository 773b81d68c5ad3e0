"""Learner: one DeepSpeed data-parallel rank (ZeRO-2 default) applying the RL loss.

``Learner`` is a plain class (tests drive it without Ray, world size 1);
``make_learner_actor`` wraps it as a Ray actor. Ranks meet over torch.distributed:
gloo on CPU, NCCL on GPUs, with the same code.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict

import torch

from mmagent_rl import algos
from mmagent_rl.algos.offpolicy import behaviour_correction
from mmagent_rl.algos.offpolicy import combine as combine_offpolicy
from mmagent_rl.config import LearnerConfig, ModelConfig
from mmagent_rl.learner.batch import collate
from mmagent_rl.learner.grad_probe import GradProbe, grad_variance
from mmagent_rl.learner.policy import (
    enable_gradient_checkpointing, load_policy, token_logprobs, trained_position_logits,
)
from mmagent_rl.learner.sync import export_hf_state
from mmagent_rl.trajectory import Trajectory


def _init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                      backend: str) -> None:
    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - so that sys.modules has it

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
            world_size=world_size)
    if backend == "gloo":
        # DeepSpeed compiles a shared-memory comm op (~85 s) at every init on CPU;
        # gloo does not need it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def lr_lambda_scheduler(optimizer, schedule: str, warmup: int, total: int, min_ratio: float):
    """Linear warm-up, then constant or cosine decay to ``min_ratio`` of the peak."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule={schedule!r}; valid: ['constant', 'cosine']")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Learner:
    """``cfg``: the learner section, ``algo``: the algo section (default: GRPO),
    ``model``: the model section; the rest is this rank's place in the group and what
    the run decides (sampling temperature, seed, schedule length, an LR override)."""

    def __init__(self, model_path: str, cfg: LearnerConfig | None = None, algo=None,
                 model: ModelConfig | None = None, *, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500,
                 temperature: float = 1.0, seed: int = 0, total_steps: int = 0,
                 lr: float | None = None):
        import deepspeed

        from mmagent_rl.chat import load_chat
        from mmagent_rl.chat import pixel_kwargs

        cfg, model_cfg = cfg or LearnerConfig(), model or ModelConfig()
        zero_stage, micro_batch_size = cfg.zero_stage, cfg.micro_batch_size
        lr = cfg.lr if lr is None else lr
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(seed)
        self.rank, self.world_size, self.model_path = rank, world_size, model_path
        self._preflight_shapes = None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        _init_distributed(rank, world_size, master_addr, master_port, backend)
        # The same image resizing as the engine's (model.min_pixels / max_pixels).
        self.processor_kwargs = pixel_kwargs(model_cfg.min_pixels, model_cfg.max_pixels)
        self.chat = load_chat(model_path, model_cfg.system_prompt, self.processor_kwargs)
        # algo: the algo config section (AlgoConfig); None = the baseline with its defaults
        self.algo = algo if algo is not None else algos.baseline_config()
        self.algorithm = algos.build(self.algo)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.zero_stage = zero_stage
        self.is_cap = cfg.off_policy_is_cap
        self._policy_version: int | None = None
        self._offpolicy_sums: list[dict] = []
        model = load_policy(model_path, model_cfg.dtype, model_cfg.attn_implementation)
        if model_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        # no weight decay on vectors (norms, biases), as HF's Trainer and nanoGPT do
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=lr, betas=tuple(cfg.betas))
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,  # we mark the boundary ourselves
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,  # torch AdamW: no 90-s CPUAdam build
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lr_lambda_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps,
                                             total_steps, cfg.min_lr_ratio))
        self.ref = None
        if self.algorithm.needs_reference:
            self.ref = load_policy(model_path, model_cfg.dtype,
                                   model_cfg.attn_implementation).eval().requires_grad_(False)
        self.step_count = 0
        self.samples_trained = 0  # real trajectories (not the zero-mask padding copies)
        self.probe = GradProbe(self.engine.module, seed) if zero_stage < 3 else None

    # ---- training ------------------------------------------------------------------
    def train_step(self, trajs: list[Trajectory], num_tokens: int, num_seqs: int,
                   objective: str = "rl", lr: float | None = None,
                   policy_version: int | None = None) -> dict:
        """One optimizer step over this rank's shard. ``num_tokens``/``num_seqs`` are the
        global batch's counts, so the loss is the global token-mean however it is split.
        Every rank must get the same number of trajectories (pad with zero-mask copies).
        ``objective``: "rl" (the algorithm's loss) or "sft" (NLL of masked tokens; the
        result then has ``predictions``: per trajectory, the argmax token at each trained
        position, for the SFT driver's skill probes). ``lr``: this step's learning rate,
        for schedules the driver decides (the SFT curriculum); None = the scheduler's.
        ``policy_version``: the driver's weights version of this learner; trajectories
        sampled by an older one get the behaviour correction (algos/offpolicy.py)."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        t0 = time.perf_counter()
        eng = self.engine
        mbs = [trajs[i:i + self.micro_batch_size]
               for i in range(0, len(trajs), self.micro_batch_size)]
        sums: dict[str, float] = {}
        probes: list[list[float]] = []
        predictions: list[list[int]] = []
        self._offpolicy_sums: list[dict] = []
        self._policy_version = policy_version
        nonfinite_loss = False
        if lr is not None:
            for group in eng.optimizer.param_groups:
                group["lr"] = lr
        for i, mb in enumerate(mbs):
            eng.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            # The forward below calls the module's parts, not engine.forward(), so do
            # the per-micro-batch bookkeeping engine.forward() would: ZeRO-3 advances its
            # micro-step counter there, and at micro-step 0 a micro-batch's reduced
            # gradient partition *replaces* the accumulated one. Without this, ZeRO-3
            # kept only the last micro-batch's gradient (ZeRO-1/2: it resets hook state).
            if isinstance(eng.optimizer, ZeROOptimizer):
                eng.optimizer.clear_backward_seen_flag()
            batch = collate(mb, self.chat.image_processor, self.chat.image_token_id,
                            self.chat.pad_id)
            if objective == "sft":
                loss, stats, preds = self._sft_loss(batch, num_tokens)
                predictions.extend(preds)
            else:
                loss, stats = self._loss(batch, mb, num_tokens, num_seqs)
            nonfinite_loss |= not bool(torch.isfinite(loss.detach()).all())
            if nonfinite_loss:
                # The gradient is made non-finite too (a NaN loss can come from a
                # detached term), so that the step is skipped: see _step_if_finite.
                # Every later micro-batch as well (not needed now that ZeRO-3
                # accumulates every micro-batch, see above; kept as a second line).
                loss = loss * float("nan")
            # DeepSpeed averages gradients over ranks; the loss is already normalised
            # by global counts, so undo the average.
            eng.backward(loss * self.world_size, scale_wrt_gas=False)
            if self.probe is not None:  # read by a hook during that backward
                g_m = self.probe.take(self.world_size)
                if objective == "rl":
                    probes.append(g_m)
            w = batch.num_tokens
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in stats.items():
                if k not in ("loss", "pg_loss"):
                    sums[k + "@w"] = sums.get(k + "@w", 0.0) + v * w
            sums["pg_loss"] = sums.get("pg_loss", 0.0) + stats.get("pg_loss", 0.0)
            sums["tokens"] = sums.get("tokens", 0.0) + w
        skipped = self._step_if_finite(nonfinite_loss)
        self.step_count += 1
        self.samples_trained += sum(not t.padding for t in trajs)
        gn = eng.get_global_grad_norm()
        sums["grad_norm"] = float(gn) if gn is not None else float("nan")
        sums["train/skipped_nonfinite"] = float(skipped)
        # the override is what this step used; the scheduler's value is the next step's
        sums["lr"] = float(lr) if lr is not None else float(eng.get_lr()[0])
        sums["time/learner_compute"] = time.perf_counter() - t0
        sums["grad_probes"] = probes
        if objective == "sft":
            sums["predictions"] = predictions
        sums["offpolicy"] = self._offpolicy_sums
        # Counters that a checkpoint carries: a step retried or replayed after a fault
        # would show up here (tests check them against the driver's step count).
        sums["learner/steps_total"] = float(self.step_count)
        sums["learner/samples_total"] = float(self.samples_trained)
        return sums

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (all_reduce MAX over the
        learners' group: gloo on CPU)."""
        if self.world_size == 1:
            return flag
        dev = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        t = torch.tensor([float(flag)], device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _step_if_finite(self, nonfinite_loss: bool) -> bool:
        """The optimizer step, skipped on every rank when a loss or a gradient on any rank
        is NaN/inf. Returns True when skipped (weights, optimizer state and LR schedule
        are then unchanged; the gradients are dropped).

        ZeRO 1-3: DeepSpeed's optimizer computes the global gradient norm (all-reduced
        over ranks) and skips the step, on every rank, when it is not finite, also in
        fp32; a non-finite loss was turned into a non-finite gradient by the caller.
        ZeRO 0: DeepSpeed does not check, so the (already all-reduced) gradients are
        checked here. Either way the ranks' verdicts are all-reduced; a step applied
        despite a non-finite verdict is an error (ZeRO partitions would diverge)."""
        eng = self.engine
        if self.zero_stage == 0:
            bad = nonfinite_loss or any(
                p.grad is not None and not bool(torch.isfinite(p.grad).all())
                for p in eng.module.parameters())
            if self._any_rank(bad):
                eng.zero_grad()
                return True
            eng.step()
            return False
        before = eng.skipped_steps
        eng.step()
        skipped = eng.skipped_steps > before
        if self._any_rank(skipped or nonfinite_loss) and not skipped:
            raise RuntimeError(
                f"learner rank {self.rank}: non-finite loss or gradients, but DeepSpeed "
                "applied the step (is its overflow check off, e.g. bf16 with "
                "check_grad_overflow=false?); the weights can no longer be trusted")
        return skipped

    def _logprobs(self, model, batch):
        return token_logprobs(model, batch, temperature=self.temperature,
                              banned_ids=self.chat.banned_ids)[0]

    def _sft_loss(self, batch, num_tokens: int):
        """Token-mean NLL of the trained tokens (global count), the LM head applied to
        those positions only (most of a demonstration is prompt and observation)."""
        logits, targets = trained_position_logits(self.engine.module, batch,
                                                  banned_ids=self.chat.banned_ids)
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / num_tokens
        counts = batch.loss_mask.bool().sum(1).tolist()
        preds = logits.detach().argmax(-1).split(counts)
        return nll, {"pg_loss": 0.0}, [p.tolist() for p in preds]

    def _loss(self, batch, mb: list[Trajectory], num_tokens: int, num_seqs: int):
        lp = self._logprobs(self.engine.module, batch)
        lp_ref = None
        if self.ref is not None:
            with torch.no_grad():
                lp_ref = self._logprobs(self.ref, batch)
        cache: dict = {}

        def logprobs_with_images(images: list[list], grad: bool):
            # the same tokens given other images; collated once per image set
            if cache.get("images") is not images:
                cache["images"], cache["batch"] = images, collate(
                    mb, self.chat.image_processor, self.chat.image_token_id,
                    self.chat.pad_id, images_override=images)
            with torch.set_grad_enabled(grad):
                return self._logprobs(self.engine.module, cache["batch"])

        lp_old, adv = batch.old_logprobs, batch.advantages
        if self._policy_version is not None:  # rollouts by older weights: reweighted
            stale = torch.tensor([t.weights_version < self._policy_version for t in mb])
            lp_old, adv, sums = behaviour_correction(lp, lp_old, adv, batch.loss_mask, stale,
                                                     self.is_cap)
            self._offpolicy_sums.append(sums)
        return self.algorithm.loss(algos.LossInputs(
            lp=lp, lp_old=lp_old, adv=adv, mask=batch.loss_mask,
            lp_ref=lp_ref, num_tokens=num_tokens, num_seqs=num_seqs, step=self.step_count,
            trajs=mb, logprobs_with_images=logprobs_with_images))

    # ---- weights ---------------------------------------------------------------------
    def export_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Rank 0's copy is what the engines load; under ZeRO-3 every rank must call
        this (the gather is a collective) and the others return an empty list."""
        named = export_hf_state(self.engine.module, gather_zero3=self.zero_stage == 3)
        return named if self.rank == 0 else []

    def export_weight_refs(self, bucket_mb: float = 0.0) -> list:
        """The weights as object-store refs, one per bucket (learner/sync.py), what
        ``RolloutWorker.load_weight_refs`` takes. Under ZeRO-3 every rank must call it
        (the gather is a collective); only rank 0's list is non-empty."""
        from mmagent_rl.learner.sync import export_buckets

        return export_buckets(self.engine.module, bucket_mb,
                              gather_zero3=self.zero_stage == 3, rank=self.rank)

    def transfer_connect(self, rollout_handles: list, bucket_mb: float,
                         timeout_s: float, ranks_per_engine: int = 1) -> None:
        """``sync.backend=transfer``: open vLLM's weight-transfer channel from this rank
        (the sender) to those rollout engines (mmagent_rl/transfer.py); a new call
        replaces the previous channel (other members, or after a failed push)."""
        import ray
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        from mmagent_rl import transfer
        from mmagent_rl.learner.sync import export_hf_state
        from mmagent_rl.wire import checkpoint_shapes

        transfer.register()
        self.transfer_close()
        backend = transfer.transfer_backend()
        # vLLM's GPU engines load as they receive: check the push here first (the
        # engine's own shapes are the checkpoint's, as in VLLMEngine.expected_shapes)
        self._preflight_shapes = (checkpoint_shapes(self.model_path)
                                  if transfer.loads_as_received(backend) else None)
        info = transfer.trainer_init_info(
            backend, address=ray.util.get_node_ip_address(), port=transfer.free_port(),
            world_size=1 + ranks_per_engine * len(rollout_handles), bucket_mb=bucket_mb,
            timeout_s=timeout_s)
        source = transfer.NamedSource(
            lambda: export_hf_state(self.engine.module, clone=False))
        self._transfer = WeightTransferTrainerFactory.trainer_init(
            info, client=transfer.RolloutClient(rollout_handles, timeout_s, ranks_per_engine),
            source=source)

    def transfer_send(self, version: int) -> int:
        """Push the current weights through the channel; raises what an engine refused
        (nothing is loaded anywhere then). Under ZeRO-3 every rank calls it."""
        from mmagent_rl.learner.sync import export_hf_state

        from mmagent_rl.transfer import NamedSource, preflight

        named = None
        if self.zero_stage == 3:  # the gather is a collective: every rank joins
            named = export_hf_state(self.engine.module, gather_zero3=True)
        if self.rank != 0:
            return version
        if named is not None:
            self._transfer.source = NamedSource(lambda: named)
        if self._preflight_shapes is not None:
            preflight(list(self._transfer.source), self._preflight_shapes)
        self._transfer.version = str(version)
        self._transfer.send_weights()
        return version

    def transfer_close(self) -> None:
        t = getattr(self, "_transfer", None)
        if t is not None:
            t.shutdown()
        self._transfer = None

    def weights_checksum(self) -> float:
        return float(sum(p.detach().double().abs().sum() for p in self.engine.module.parameters()))

    def save(self, out_dir: str) -> str:
        """HF folder (config, weights, tokenizer, processor): loadable by vLLM and HF."""
        from transformers import AutoProcessor

        model = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                if self.rank == 0:
                    model.save_pretrained(out_dir, safe_serialization=True)
        elif self.rank == 0:
            model.save_pretrained(out_dir, safe_serialization=True)
        if self.rank == 0:
            src = model.config._name_or_path
            AutoProcessor.from_pretrained(src, **self.processor_kwargs).save_pretrained(out_dir)
        return out_dir

    # ---- checkpoints (resume) --------------------------------------------------------
    def save_state(self, out_dir: str) -> dict:
        """This rank's share of a resumable checkpoint: DeepSpeed's checkpoint (module,
        ZeRO-partitioned optimizer and LR-scheduler states, engine step counters) plus
        this process's RNG states and step count. Every rank must call it at once (it
        synchronises); all ranks write into ``out_dir``."""
        from mmagent_rl.checkpoint import DS_TAG, rng_state

        os.makedirs(out_dir, exist_ok=True)
        self.engine.save_checkpoint(out_dir, tag=DS_TAG, save_latest=False,
                                    client_state={"mmagent_step_count": self.step_count,
                                                  "mmagent_samples": self.samples_trained})
        torch.save(rng_state(), os.path.join(out_dir, f"rng_rank{self.rank}.pt"))
        return {"rank": self.rank, "step_count": self.step_count}

    def load_state(self, in_dir: str) -> dict:
        """Inverse of :meth:`save_state` (same world size and ZeRO stage); every rank."""
        from mmagent_rl.checkpoint import DS_TAG, set_rng_state

        path, client = self.engine.load_checkpoint(
            in_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {DS_TAG!r} in {in_dir}")
        self.step_count = int(client["mmagent_step_count"])
        self.samples_trained = int(client.get("mmagent_samples", 0))
        set_rng_state(torch.load(os.path.join(in_dir, f"rng_rank{self.rank}.pt"),
                                 weights_only=False))
        return {"rank": self.rank, "step_count": self.step_count}

    def peak_rss_gib(self) -> float:
        """Peak resident memory of this learner process so far (Linux: KiB units)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def config(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "algo": asdict(self.algo)}


def finalize_metrics(per_rank: list[dict]) -> dict:
    """Combine the ranks' sums: token-weighted means for the stats, sum for the loss."""
    tokens = sum(r["tokens"] for r in per_rank) or 1.0
    out = {"loss": sum(r["loss"] for r in per_rank), "pg_loss": sum(r["pg_loss"] for r in per_rank)}
    for k in per_rank[0]:
        if k.endswith("@w"):
            out[k[:-2]] = sum(r[k] for r in per_rank) / tokens
    out["grad/variance"] = grad_variance([p for r in per_rank for p in r.get("grad_probes", [])])
    out["grad_norm"] = per_rank[0]["grad_norm"]
    out["lr"] = per_rank[0]["lr"]
    out["time/learner_compute"] = max(r["time/learner_compute"] for r in per_rank)
    if "learner/steps_total" in per_rank[0]:
        out["learner/steps_total"] = per_rank[0]["learner/steps_total"]
        out["learner/samples_total"] = sum(r["learner/samples_total"] for r in per_rank)
    out.update(combine_offpolicy([p for r in per_rank for p in r.get("offpolicy", [])]))
    out["train/skipped_nonfinite"] = max(r.get("train/skipped_nonfinite", 0.0)
                                         for r in per_rank)
    if not math.isfinite(out["loss"]):
        out["nonfinite_loss"] = 1.0
    return out


def make_learner_actor(num_cpus: float, num_gpus: float = 0.0):
    import ray

    # Never restarted: a new process would have lost the optimizer state and its place
    # in the collective group (the run stops; see mmagent_rl/faults.py).
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(Learner)
