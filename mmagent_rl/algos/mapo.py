"""MAPO: GRPO plus a semantic-alignment term per tool call (docs/algorithms.md, "MAPO").

``scores[i][k]`` scores tool call k of rollout i: the CLIP cosine in [-1, 1] between its
description and its crop, or None (description missing / too long, call or scoring
failed). Rescaling happens *here*: ``effective_scores`` maps s -> (s+1)/2 iff
``cfg.rescale`` and every invalid score to exactly 0 (never (0+1)/2). ``ClipScorer.score``
already returns (cos+1)/2 with 0.0 for invalid items: feed it with ``rescale=False``.
Couplings: "turn" puts ``beta * norm_g(G_ik)`` on the tokens of turn k; "trajectory"
adds ``beta * S_i`` to the reward before GRPO. No tool call -> no semantic term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mmagent_rl.algos.grpo import GRPO, GRPOConfig, _group_index, group_advantages
from mmagent_rl.algos.registry import register
from mmagent_rl.trajectory import Trajectory

DESCRIPTION_MODES = ("label", "post")
COUPLINGS = ("turn", "trajectory")

Scores = Sequence[Sequence["float | None"]]

# "post" mode: the description the CLIP verifier scores is written right after each
# crop, so the prompt asks for it. ("label" needs nothing: the tool schema has the label.)
POST_INSTRUCTION = (" After each zoomed image, first describe what it shows in at most "
                    "16 words as <description>...</description>.")


@dataclass
class MAPOConfig:
    description: str = "post"  # "post" (<description> after the crop) | "label" (tool-call argument)
    max_words: int = 16  # longer descriptions score 0 (limits reward hacking by verbosity)
    coupling: str = "turn"  # "turn" | "trajectory"
    lam: float = 0.95  # discount over later turns
    beta: float = 0.4  # weight of the semantic term
    rescale: bool = True  # raw cosine s -> (s+1)/2 here; False if scores are already in [0, 1]
    norm_eps: float = 1e-6  # in norm_g's denominator

    def __post_init__(self):
        if self.description not in DESCRIPTION_MODES:
            raise ValueError(f"unknown mapo description {self.description!r}; "
                             f"valid: {', '.join(DESCRIPTION_MODES)}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"unknown mapo coupling {self.coupling!r}; valid: {', '.join(COUPLINGS)}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.beta < 0 or self.max_words < 1 or self.norm_eps <= 0:
            raise ValueError(f"need beta >= 0, max_words >= 1, norm_eps > 0; got "
                             f"{self.beta}, {self.max_words}, {self.norm_eps}")


def check_description(desc: str | None, max_words: int) -> str:
    """"ok" | "missing" (None, not a string, blank) | "too_long" (> max_words words)."""
    if not isinstance(desc, str) or not desc.strip():
        return "missing"
    return "too_long" if len(desc.split()) > max_words else "ok"


def effective_scores(scores: Scores, cfg: MAPOConfig,
                     statuses: Sequence[Sequence[str]] | None = None) -> list[list[float]]:
    """s_ik as the algorithm uses them: None, non-finite or status != "ok" -> exactly 0;
    otherwise ``(s+1)/2`` clamped to [0, 1] iff ``cfg.rescale``, else s unchanged."""
    out = []
    for i, row in enumerate(scores):
        st = statuses[i] if statuses is not None else ["ok"] * len(row)
        if len(st) != len(row):
            raise ValueError(f"rollout {i}: {len(row)} scores but {len(st)} statuses")
        out.append([0.0 if s is None or not math.isfinite(s) or x != "ok"
                    else (min(1.0, max(0.0, (s + 1.0) / 2.0)) if cfg.rescale else float(s))
                    for s, x in zip(row, st)])
    return out


def turn_returns(scores_i: Sequence[float], lam: float) -> list[float]:
    """G_ik = sum_{j>=k} lam^(j-k) s_ij, by the backward recursion G_k = s_k + lam*G_{k+1}."""
    out, g = [], 0.0
    for s in reversed(scores_i):
        g = s + lam * g
        out.append(g)
    return out[::-1]


def trajectory_score(scores_i: Sequence[float], lam: float) -> float:
    """S_i = sum_k lam^k s_ik / sum_k lam^k (k = 0 first call); 0 without calls.
    = G_i0 over its weight sum: the turn coupling's discount, kept in [0, 1] so that
    more calls do not mean more reward."""
    if not scores_i:
        return 0.0
    w = [lam ** k for k in range(len(scores_i))]  # 0**0 == 1: lam=0 keeps the first call
    return sum(wk * s for wk, s in zip(w, scores_i)) / sum(w)


def _checked(trajs, scores: Scores, cfg: MAPOConfig, statuses) -> list[list[float]]:
    if len(scores) != len(trajs):
        raise ValueError(f"{len(trajs)} trajectories but {len(scores)} score lists")
    for i, (t, row) in enumerate(zip(trajs, scores)):
        if len(row) != len(t.tool_calls):
            raise ValueError(f"rollout {i}: {len(t.tool_calls)} tool calls but {len(row)} scores")
    return effective_scores(scores, cfg, statuses)


def mapo_turn_advantages(trajs: list[Trajectory], scores: Scores, task_adv: Tensor,
                         cfg: MAPOConfig, statuses=None) -> None:
    """Set ``t.advantages`` per token (turn coupling); ``scores`` raw as in the module doc.

    Tokens of "turn k" = positions p in ``tool_calls[k].span`` ([start, end) of the
    assistant turn that made call k) with ``loss_mask[p] == 1``: they get
    ``A_task_i + beta * norm_g(G_ik)``. Every other generated token -- in particular the
    final answer turn after the last call -- gets ``A_task_i`` only: it fetched no crop,
    and G of the last call already credits that call. Masked tokens get 0.
    norm_g: (G - mean) / (std + eps) over the pooled G_ik of all calls of all rollouts
    sharing a prompt_id (unbiased std); fewer than 2 values or all equal -> 0.
    """
    eff = _checked(trajs, scores, cfg, statuses)
    returns = [turn_returns(row, cfg.lam) for row in eff]
    norm = [[0.0] * len(g) for g in returns]
    for idx in _group_index([t.prompt_id for t in trajs]):
        pos = [(i, k) for i in idx for k in range(len(returns[i]))]
        g = torch.tensor([returns[i][k] for i, k in pos], dtype=torch.float64)
        # Exact zero for equal values: rounding residue / eps would otherwise blow up.
        if g.numel() < 2 or bool((g == g[0]).all()):
            continue
        z = (g - g.mean()) / (g.std(unbiased=True) + cfg.norm_eps)
        for (i, k), v in zip(pos, z.tolist()):
            norm[i][k] = v
    for i, (t, a) in enumerate(zip(trajs, task_adv.tolist())):
        adv = [a if m else 0.0 for m in t.loss_mask]
        for k, call in enumerate(t.tool_calls):
            if call.span is None:
                raise ValueError(f"rollout {i}, tool call {k}: no token span")
            for p in range(*call.span):
                if t.loss_mask[p]:
                    adv[p] = a + cfg.beta * norm[i][k]
        t.advantages = adv


def mapo_trajectory_rewards(trajs: list[Trajectory], scores: Scores, cfg: MAPOConfig,
                            statuses=None) -> Tensor:
    """R_i = r_i + beta * S_i (float64 [N]); S_i from ``trajectory_score``, 0 without calls."""
    eff = _checked(trajs, scores, cfg, statuses)
    return torch.tensor([(t.reward or 0.0) + cfg.beta * trajectory_score(row, cfg.lam)
                         for t, row in zip(trajs, eff)], dtype=torch.float64)


def compute_mapo_advantages(trajs: list[Trajectory], scores: Scores, cfg: MAPOConfig,
                            grpo_cfg: GRPOConfig | None = None, statuses=None) -> Tensor:
    """Set every ``t.advantages`` and return the per-rollout scalar advantage [N] (float32).

    "turn": returns A_task = GRPO advantage of the task rewards r_i (the semantic term is
    per token only). "trajectory": returns the GRPO advantage of R_i, which is also what
    every generated token gets.
    """
    grpo_cfg = grpo_cfg or GRPOConfig()
    coupled = cfg.coupling == "trajectory"
    rewards = (mapo_trajectory_rewards(trajs, scores, cfg, statuses) if coupled else
               torch.tensor([t.reward or 0.0 for t in trajs], dtype=torch.float64))
    adv = group_advantages(rewards, [t.prompt_id for t in trajs],
                           norm_by_std=grpo_cfg.norm_by_std, eps=grpo_cfg.eps).float()
    if coupled:  # the same scalar on every generated token, as in plain GRPO
        for t, a in zip(trajs, adv.tolist()):
            t.advantages = [a if m else 0.0 for m in t.loss_mask]
    else:
        mapo_turn_advantages(trajs, scores, adv, cfg, statuses)
    return adv


def _pearson(x: list[float], y: list[float]) -> float:
    # Undefined (fewer than 2 points or a constant side) -> 0.0; checked exactly, since
    # a constant list's float mean leaves ~1e-17 residues that would give a random +-1.
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def alignment_metrics(scores: Scores, statuses: Sequence[Sequence[str]],
                      rewards: Sequence[float]) -> dict[str, float]:
    """Scores already rescaled (``effective_scores`` or ``ClipScorer.score``).

    alignment: mean over calls with status "ok" (and a score); missing_description_rate:
    share of calls with status != "ok"; alignment_reward_corr: Pearson over rollouts with
    >= 1 call between the rollout's mean score (invalid calls count 0, as in the reward)
    and its task reward.
    """
    valid, n_calls, n_bad, xs, ys = [], 0, 0, [], []
    for row, st, r in zip(scores, statuses, [float(r) for r in rewards]):
        if len(row) != len(st):
            raise ValueError(f"{len(row)} scores but {len(st)} statuses")
        n_calls += len(row)
        n_bad += sum(x != "ok" for x in st)
        eff = [float(s) if x == "ok" and s is not None else 0.0 for s, x in zip(row, st)]
        valid += [float(s) for s, x in zip(row, st) if x == "ok" and s is not None]
        if row:
            xs.append(sum(eff) / len(eff))
            ys.append(r)
    return {
        "mapo/alignment": sum(valid) / len(valid) if valid else 0.0,
        "mapo/missing_description_rate": n_bad / n_calls if n_calls else 0.0,
        "mapo/alignment_reward_corr": _pearson(xs, ys),
    }


@register
class MAPO(GRPO):
    """GRPO whose advantage couples the task reward with the reward actor's CLIP
    alignment score of each tool call (``t.align_scores`` / ``t.align_statuses``)."""
    name = "mapo"
    config = MAPOConfig

    def alignment(self) -> MAPOConfig:
        return self.cfg.mapo

    def system_prompt(self, configured, default):
        if configured is None and self.cfg.mapo.description == "post":
            return default + POST_INSTRUCTION
        return configured

    def advantages(self, trajs):
        from dataclasses import replace

        m = self.cfg.mapo
        statuses = [list(t.align_statuses or []) for t in trajs]
        stored = [list(t.align_scores or []) for t in trajs]
        # The scorer returns (cos + 1) / 2 already; rescale=false asks for raw cosines.
        scores = stored if m.rescale else [
            [2 * s - 1 if st == "ok" else None for s, st in zip(sc, sts)]
            for sc, sts in zip(stored, statuses)]
        adv = compute_mapo_advantages(trajs, scores, replace(m, rescale=False),
                                      self.cfg.grpo, statuses)
        rescaled = [[s if st == "ok" else 0.0 for s, st in zip(sc, sts)]
                    for sc, sts in zip(stored, statuses)]
        return adv, alignment_metrics(rescaled, statuses, [t.reward or 0.0 for t in trajs])

    def after_learn(self, metrics, step):
        # the reward actor's additive figures for the step (every score call summed)
        if metrics.get("mapo/align_time_s"):
            return {"mapo/align_pairs_per_s": metrics.get("mapo/align_pairs", 0.0)
                    / metrics["mapo/align_time_s"]}
        return {}
