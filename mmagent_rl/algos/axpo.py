"""AXPO: resample wrong tool-using rollouts from the opening <tool_call> of their first
real call (docs/algorithms.md, "AXPO"). Pure python/torch; token ids are ints.

Step: ordinary rollouts -> ``grpo_advantages`` (caller) -> ``select_prefixes`` ->
``make_prefix`` -> ``AgentLoop.continue_from(prefixes, examples, cfg.k)`` ->
``group_continuations`` -> reward -> ``axpo_advantages`` -> learner.

Documented choices (our reading of the spec):
- Fork call = the first ToolCall whose JSON parsed and named the known tool
  (``name is not None``), even if its arguments were bad or the tool failed: the
  prefix is the decision to call, the call itself is what is resampled.
- Confidence = mean exp(logprob) over the generated tokens in [fork, end of that
  call's turn), i.e. the call's JSON and </tool_call>; 1.0 if there are none.
- Prefix credit: all selected sources of a group get their replaced reward at once
  and the group is renormalised once; only the source's generated tokens before the
  fork get that advantage, its tokens after the fork keep the original one. The other
  rollouts of the group keep their advantages.
- Weights: continuations are extra rollouts of their prompt with the same per-rollout
  weight as ordinary ones; the normaliser stays the ordinary batch, so adding them never
  shrinks an ordinary rollout's weight (1/G per rollout, mean over prompts): the
  trainer gives the learners the ordinary batch's token and sequence counts as the
  loss's normaliser. ``axpo_advantages`` reports the resulting ``loss_weight`` = total
  / ordinary (generated tokens for token-mean, sequences for seq-mean-*), the factor
  by which the batch's loss exceeds a plain mean over it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

from mmagent_rl.algos.grpo import GRPO, GRPOConfig, group_advantages
from mmagent_rl.algos.registry import StepContext, register
from mmagent_rl.tools.parse import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from mmagent_rl.trajectory import Trajectory, group_by_prompt

SELECTIONS = ("least_confident", "random")
RECOVERY_REWARDS = ("any_correct", "mean_correct")
Key = tuple[str, int]  # (prompt_id, sample_idx) of the source rollout


@dataclass
class AXPOConfig:
    budget_ratio: float = 0.25  # r: extra continuations = r * B * G
    k: int = 4  # continuations per selected prefix
    selection: str = "least_confident"  # | "random" (ablation)
    recovery_reward: str = "any_correct"  # 1[any cont. correct] | "mean_correct": share
    keep_ordinary_weight: bool = True  # False: loss_weight 1.0, plain batch token-mean

    def __post_init__(self):
        if not (math.isfinite(self.budget_ratio) and self.budget_ratio >= 0):
            raise ValueError(f"budget_ratio must be finite and >= 0, got {self.budget_ratio}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; "
                             f"valid: {', '.join(SELECTIONS)}")
        if self.recovery_reward not in RECOVERY_REWARDS:
            raise ValueError(f"unknown recovery_reward {self.recovery_reward!r}; "
                             f"valid: {', '.join(RECOVERY_REWARDS)}")


@dataclass
class Selection:
    traj: Trajectory  # the source (ordinary) rollout
    fork: int  # prefix = traj.token_ids[:fork]
    confidence: float

    @property
    def key(self) -> Key:
        return (self.traj.prompt_id, self.traj.sample_idx)


def triggered_groups(trajs: list[Trajectory]) -> list[str]:
    """prompt_ids (first-seen order) whose tool-using rollouts exist and are all wrong."""
    out = []
    for pid, group in group_by_prompt(trajs).items():
        tool = [t for t in group if t.used_tool]
        if tool and not any(t.correct for t in tool):
            out.append(pid)
    return out


def _fork_and_end(traj: Trajectory, open_id: int) -> tuple[int, int] | None:
    """(fork, end of the call's turn) for the first named call whose opening tag is found."""
    for call in traj.tool_calls:
        if call.name is None or call.span is None:
            continue
        start, end = call.span
        # The LAST generated <tool_call> of the turn is the real opening: the turn ends
        # at </tool_call>, so any earlier one is a literal inside the thinking.
        for i in range(min(end, len(traj.token_ids)) - 1, start - 1, -1):
            if traj.token_ids[i] == open_id and traj.loss_mask[i]:
                return i + 1, end
    return None


def fork_point(traj: Trajectory, tool_call_open_id: int) -> int | None:
    """Index just after the opening <tool_call> of the first real call (None if none)."""
    fe = _fork_and_end(traj, tool_call_open_id)
    return None if fe is None else fe[0]


def call_confidence(traj: Trajectory, fork: int, end: int) -> float:
    """Mean probability exp(logprob) of the generated tokens in [fork, end)."""
    ps = [math.exp(traj.logprobs[i]) for i in range(fork, min(end, len(traj.token_ids)))
          if traj.loss_mask[i]]
    return sum(ps) / len(ps) if ps else 1.0


def select_prefixes(trajs: list[Trajectory], cfg: AXPOConfig, tool_call_open_id: int,
                    batch_prompts: int, group_size: int,
                    rng: random.Random | None = None) -> list[Selection]:
    """floor(r*B*G/K) prefixes, breadth-first (one per prompt per round) over triggered
    prompts, least confident first. ``rng`` only for selection="random" (pass one seeded
    per step; None -> Random(0))."""
    budget = int(math.floor(cfg.budget_ratio * batch_prompts * group_size / cfg.k + 1e-9))
    groups = group_by_prompt(trajs)
    per_prompt: list[list[Selection]] = []
    for pid in triggered_groups(trajs):
        cands = []
        for t in groups[pid]:
            fe = _fork_and_end(t, tool_call_open_id) if t.used_tool and not t.correct else None
            if fe is not None:
                cands.append(Selection(t, fe[0], call_confidence(t, *fe)))
        if cands:
            per_prompt.append(cands)
    if cfg.selection == "random":
        rng = rng or random.Random(0)
        for c in per_prompt:
            rng.shuffle(c)
        rng.shuffle(per_prompt)
    else:  # stable sorts: ties keep rollout / first-seen prompt order
        for c in per_prompt:
            c.sort(key=lambda s: s.confidence)
        per_prompt.sort(key=lambda c: c[0].confidence)
    out: list[Selection] = []
    for rnd in range(max((len(c) for c in per_prompt), default=0)):
        this_round = [c[rnd] for c in per_prompt if rnd < len(c)]
        if cfg.selection != "random":
            # each round by the prefix's own confidence: when the budget ends mid-round
            # the least confident of the round win, not those of the least confident prompts
            this_round.sort(key=lambda s: s.confidence)
        for sel in this_round:
            if len(out) >= budget:
                return out
            out.append(sel)
    return out


def _prefix_text(traj: Trajectory, n_done: int) -> tuple[str, str] | None:
    """(text of the first n_done turns, fork turn's text up to its last <tool_call>).

    ``response_text`` is the turns' decoded texts joined; every call turn ends at its
    </tool_call> (the stop token), so splitting after each one recovers the turns."""
    done, rest = "", traj.response_text
    for _ in range(n_done):
        j = rest.find(TOOL_CALL_CLOSE)
        if j < 0:
            return None
        j += len(TOOL_CALL_CLOSE)
        done, rest = done + rest[:j], rest[j:]
    j = rest.find(TOOL_CALL_CLOSE)
    cur = rest if j < 0 else rest[:j]
    k = cur.rfind(TOOL_CALL_OPEN)
    return None if k < 0 else (done, cur[: k + len(TOOL_CALL_OPEN)])


def make_prefix(traj: Trajectory, fork: int) -> Trajectory:
    """A copy of ``traj`` cut to ``token_ids[:fork]``, ready for ``continue_from``.

    Keeps the calls completed before the fork and the images present before it (the
    originals plus their crops); ``turns`` = completed assistant turns (every turn but
    the last is a call turn, so = completed calls). ``response_text`` = the text before
    the fork, recovered from the turn texts ("" if that fails, flagged by
    ``meta["axpo_prefix_text_ok"]``); ``partial_text`` is the fork turn's own text so
    far (the agent loop needs it to parse the first continued call)."""
    done = [c for c in traj.tool_calls if c.span is not None and c.span[1] <= fork]
    crops = {c.image_index for c in traj.tool_calls if c.image_index is not None}
    kept = {c.image_index for c in done if c.image_index is not None}
    images = [im for i, im in enumerate(traj.images) if i not in crops or i in kept]
    text = _prefix_text(traj, len(done))
    fork_call = next((c for c in traj.tool_calls if c.span and c.span[0] < fork <= c.span[1]), None)
    meta = dict(traj.meta, axpo_fork=fork, axpo_source=(traj.prompt_id, traj.sample_idx),
                axpo_prefix_text_ok=text is not None,
                axpo_fork_turn_start=fork_call.span[0] if fork_call else fork)
    return replace(
        traj, token_ids=traj.token_ids[:fork], loss_mask=traj.loss_mask[:fork],
        logprobs=traj.logprobs[:fork], images=images,
        response_text="".join(text) if text else "",
        tool_calls=[replace(c) for c in done], finish_reason="prefix", reward=None,
        reward_info={}, meta=meta, turns=len(done), partial_text=text[1] if text else "",
        advantages=None if traj.advantages is None else traj.advantages[:fork])


def group_continuations(selections: list[Selection],
                        continuations: list[Trajectory]) -> dict[Key, list[Trajectory]]:
    """Map ``continue_from`` output to its source: prompt_id "{pid}/cont{sample_idx}"."""
    by_pid = {f"{s.traj.prompt_id}/cont{s.traj.sample_idx}": s.key for s in selections}
    out: dict[Key, list[Trajectory]] = {s.key: [] for s in selections}
    for c in continuations:
        if c.prompt_id in by_pid:
            out[by_pid[c.prompt_id]].append(c)
    return out


def _recovery(conts: list[Trajectory], how: str) -> float:
    if how == "any_correct":
        return float(any(c.correct for c in conts))
    return sum(c.correct for c in conts) / len(conts)


def axpo_advantages(ordinary: list[Trajectory],
                    continuations_by_prefix: dict[Key, list[Trajectory]],
                    selections: list[Selection], grpo_cfg: GRPOConfig,
                    cfg: AXPOConfig | None = None) -> dict:
    """Set ``advantages`` on continuations and on the sources' prefix tokens (in place).

    Ordinary rollouts must already hold their GRPO advantages. A selection with no
    continuations (none generated) gets no prefix credit. Returns ``loss_weight`` (see
    the module docstring), ``prefix_advantage`` and
    ``recovery`` per source key."""
    cfg = cfg or AXPOConfig()
    if any(t.advantages is None for t in ordinary):
        raise ValueError("ordinary rollouts need their GRPO advantages first (grpo_advantages)")
    conts_all: list[Trajectory] = []
    recovery: dict[Key, float] = {}
    for sel in selections:
        conts = continuations_by_prefix.get(sel.key) or []
        if not conts:
            continue
        # Continuations of one prefix are their own group; their prefix tokens are mask 0.
        r = torch.tensor([c.reward or 0.0 for c in conts], dtype=torch.float64)
        adv = group_advantages(r, [0] * len(conts), norm_by_std=grpo_cfg.norm_by_std,
                               eps=grpo_cfg.eps).tolist()
        for c, a in zip(conts, adv):
            c.advantages = [a if m else 0.0 for m in c.loss_mask]
            c.meta["axpo_role"] = "continuation"
        conts_all += conts
        recovery[sel.key] = _recovery(conts, cfg.recovery_reward)

    # Prefix credit: one renormalisation per original group with every selected
    # source's reward replaced at once.
    prefix_adv: dict[Key, float] = {}
    forks = {s.key: s.fork for s in selections if s.key in recovery}
    for pid, group in group_by_prompt(ordinary).items():
        keys = [(t.prompt_id, t.sample_idx) for t in group]
        if not any(k in forks for k in keys):
            continue
        r = torch.tensor([recovery[k] if k in forks else (t.reward or 0.0)
                          for k, t in zip(keys, group)], dtype=torch.float64)
        adv = group_advantages(r, [0] * len(group), norm_by_std=grpo_cfg.norm_by_std,
                               eps=grpo_cfg.eps).tolist()
        for k, t, a in zip(keys, group, adv):
            if k in forks:
                prefix_adv[k] = a
                t.advantages = [a if (m and i < forks[k]) else old
                                for i, (m, old) in enumerate(zip(t.loss_mask, t.advantages))]

    weight = 1.0
    if cfg.keep_ordinary_weight and conts_all:
        if grpo_cfg.agg == "token-mean":
            n_ord = sum(t.num_generated for t in ordinary)
            weight = (n_ord + sum(c.num_generated for c in conts_all)) / max(n_ord, 1)
        else:
            weight = (len(ordinary) + len(conts_all)) / max(len(ordinary), 1)
    return {"loss_weight": weight, "prefix_advantage": prefix_adv, "recovery": recovery}


def axpo_metrics(trajs: list[Trajectory], selections: list[Selection],
                 continuations: dict[Key, list[Trajectory]] | list[Trajectory]) -> dict[str, float]:
    """The AXPO counters plus the paper's two diagnostics (tool-use share, trigger share)."""
    if not isinstance(continuations, dict):
        continuations = group_continuations(selections, continuations)
    conts = [c for cs in continuations.values() for c in cs]
    n_prompts = len(group_by_prompt(trajs))
    trig = len(triggered_groups(trajs))
    recovered = sum(any(c.correct for c in continuations.get(s.key, [])) for s in selections)
    n_ord = sum(t.num_generated for t in trajs)
    return {
        "axpo/triggered_prompts": float(trig),
        "axpo/resampled_prefixes": float(len(selections)),
        "axpo/recovery_rate": recovered / len(selections) if selections else 0.0,
        "axpo/extra_token_share": sum(c.num_generated for c in conts) / n_ord if n_ord else 0.0,
        "axpo/tool_use_share": sum(t.used_tool for t in trajs) / len(trajs) if trajs else 0.0,
        "axpo/triggered_share": trig / n_prompts if n_prompts else 0.0,
    }


@register
class AXPO(GRPO):
    """GRPO plus extra rollouts: for prompts whose tool-using rollouts are all wrong,
    the least confident thinking prefixes are continued ``k`` times from the opening
    <tool_call>, and credit flows back to the prefixes."""
    name = "axpo"
    config = AXPOConfig

    def extra_rollouts(self, trajs: list[Trajectory], ctx: StepContext):
        import time

        t0 = time.perf_counter()
        cfg = self.cfg.axpo
        sel = select_prefixes(trajs, cfg, ctx.tool_call_open_id, ctx.prompts_per_step,
                              ctx.group_size, rng=random.Random(ctx.seed * 7 + ctx.step))
        conts = (ctx.continue_from([make_prefix(s.traj, s.fork) for s in sel], cfg.k,
                                   ctx.step * 31) if sel else [])
        grouped = group_continuations(sel, conts)
        axpo_advantages(trajs, grouped, sel, self.cfg.grpo, cfg)
        metrics = axpo_metrics(trajs, sel, grouped)
        metrics["time/axpo"] = time.perf_counter() - t0
        return trajs + conts, metrics
