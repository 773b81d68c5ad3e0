"""Skill probes for the SFT curriculum: teacher-forced accuracies on the tokens that
carry the task, from the learner's argmax at each trained position.

Every curriculum batch is made of fresh examples, so these are held-out estimates; the
stage gates (``sft.stages[*].advance_metric``) read them, e.g. ``locate/near_xy1``.

  acc_num    box numbers (not the "2" of "bbox_2d", whose previous token is "_")
  acc_xy1    the first two numbers of a sequence: x1, y1 (the ones not copyable)
  near_xy1   x1, y1 within 64 px (one coarse cell: such a box often still contains it)
  acc_box    sequences with a whole box (>= 4 numbers) whose numbers are all right
  acc_color  colour words; acc_color1: the first one of a sequence (read from the image;
             later ones, the answer, can copy it)
"""
from __future__ import annotations

from mmagent_rl.data.synthetic import COLOR_RGB
from mmagent_rl.trajectory import Trajectory

NEAR_PX = 64


class KeyTokens:
    """The vocabulary's number tokens (with their values) and colour-name tokens."""

    def __init__(self, tokenizer):
        self.underscore = tokenizer.convert_tokens_to_ids("_")
        self.value: dict[int, int] = {}
        self.color: set[int] = set()
        for tok, i in tokenizer.get_vocab().items():
            s = tokenizer.convert_tokens_to_string([tok]).strip()
            if s.isdigit():
                self.value[i] = int(s)
            if s in COLOR_RGB:
                self.color.add(i)


def skill_metrics(trajs: list[Trajectory], predictions: list[list[int]],
                  keys: KeyTokens) -> dict[str, float]:
    """Pooled over the batch's trained tokens; a metric with no token is left out."""
    hits: dict[str, list[bool]] = {k: [] for k in
                                   ("acc_num", "acc_xy1", "near_xy1", "acc_box",
                                    "acc_color", "acc_color1")}
    for traj, pred in zip(trajs, predictions):
        ids, mask = traj.token_ids, traj.loss_mask
        trained = [t for t in range(1, len(ids)) if mask[t]]
        if len(pred) != len(trained):
            raise ValueError(f"{traj.prompt_id}: {len(pred)} predictions for "
                             f"{len(trained)} trained tokens")
        target = [ids[t] for t in trained]
        nums = [j for j, t in enumerate(trained)
                if target[j] in keys.value and ids[t - 1] != keys.underscore]
        colors = [j for j in range(len(target)) if target[j] in keys.color]
        hits["acc_num"] += [pred[j] == target[j] for j in nums]
        hits["acc_xy1"] += [pred[j] == target[j] for j in nums[:2]]
        hits["near_xy1"] += [abs(keys.value.get(pred[j], -10**4) - keys.value[target[j]])
                             <= NEAR_PX for j in nums[:2]]
        if len(nums) >= 4:
            hits["acc_box"].append(all(pred[j] == target[j] for j in nums))
        hits["acc_color"] += [pred[j] == target[j] for j in colors]
        hits["acc_color1"] += [pred[j] == target[j] for j in colors[:1]]
    return {k: sum(v) / len(v) for k, v in hits.items() if v}
