"""Numerical guards and bad data in the driver.

- A NaN/inf loss or gradient skips the optimizer step on *every* learner rank (real
  DeepSpeed learners as Ray actors, a poisoned batch on one rank only), and the step's
  metrics say so (``train/skipped_nonfinite``).
- The trainer stops cleanly after ``trainer.max_nonfinite_steps`` skipped steps in a row,
  and ``python -m mmagent_rl.launch`` then exits with status 3.
- Bad data rows are counted in metrics.jsonl as ``data/skipped_<reason>``.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from mmagent_rl.config import Config
from mmagent_rl.guards import NonfiniteGuard
from mmagent_rl.sources import data_metrics, make_dataset
from mmagent_rl.trainer import Trainer
from test_datasets import noisy_png_bytes, png_with_header


def nan_reward(response_text: str, ground_truth: str, **_):
    """Reward plugin for the end-to-end run: every advantage becomes NaN."""
    return float("nan"), {"correct": 0.0, "has_answer": 0.0}


# ---- the trainer's counter -----------------------------------------------------------

def test_nonfinite_guard_counts_skips_in_a_row():
    g = NonfiniteGuard(3)
    seen = []
    for skipped in [1, 1, 0, 1, 1, 1]:
        seen.append((g.update({"train/skipped_nonfinite": float(skipped)}), g.should_stop))
    assert seen == [(1, False), (2, False), (0, False), (1, False), (2, False), (3, True)]
    assert g.total == 5
    assert g.update({}) == 0 and not g.should_stop  # a record without the key: not skipped
    never = NonfiniteGuard(0)
    for _ in range(10):
        never.update({"train/skipped_nonfinite": 1.0})
    assert not never.should_stop


def _bare_trainer(tmp_path, skips: list[int], limit: int = 3, total: int = 10):
    """A Trainer without actors: train_step replays ``skips`` (1 = skipped step)."""
    cfg = Config()
    cfg.trainer.total_steps, cfg.trainer.max_nonfinite_steps = total, limit
    cfg.trainer.progress = False
    t = object.__new__(Trainer)
    t.cfg, t.run_dir, t.step, t.stop_reason, t.exit_status = cfg, str(tmp_path), 0, None, 0
    t.nonfinite = NonfiniteGuard(limit)
    t._init_ahead()
    t.saved = []
    t.save = t.saved.append

    def train_step():
        t.step += 1
        m = {"step": t.step, "loss": 0.0, "reward/mean": 0.0, "tool/use_rate": 0.0,
             "train/skipped_nonfinite": float(skips[t.step - 1])}
        m["train/nonfinite_in_a_row"] = float(t.nonfinite.update(m))
        return m

    t.train_step = train_step
    return t


def test_fit_stops_cleanly_after_max_nonfinite_steps(tmp_path, caplog):
    t = _bare_trainer(tmp_path, [0, 1, 1, 0, 1, 1, 1, 0, 0, 0])
    history = t.fit()
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6, 7]  # stopped after step 7
    assert [m["train/nonfinite_in_a_row"] for m in history] == [0, 1, 2, 0, 1, 2, 3]
    assert t.saved == [os.path.join(str(tmp_path), "checkpoints", "final")]  # still saved
    assert "stopped at step 7" in t.stop_reason and "unchanged since step 4" in t.stop_reason
    assert t.stop_reason in caplog.text and t.exit_status == 3
    # Not three in a row: the run goes to the end.
    t = _bare_trainer(tmp_path, [1, 1, 0] * 4, total=12)
    assert len(t.fit()) == 12 and t.stop_reason is None and t.exit_status == 0


def test_lost_learner_stops_with_status_4_without_saving(tmp_path):
    from mmagent_rl.faults import LearnerLost

    t = _bare_trainer(tmp_path, [0] * 10)
    replay = t.train_step

    def train_step():
        if t.step == 2:
            raise LearnerLost("a learner actor died: ActorDiedError")
        return replay()

    t.train_step = train_step
    assert [m["step"] for m in t.fit()] == [1, 2]
    assert t.exit_status == 4 and t.saved == []  # nothing to save: the learners are gone
    assert "during step 3" in t.stop_reason and "learner actor died" in t.stop_reason
    assert "no complete checkpoint" in t.stop_reason  # and how to make one next time


# ---- bad data rows in the metrics ----------------------------------------------------

def write_bad_data(folder, n_good: int = 4) -> dict:
    """A jsonl with ``n_good`` usable rows and one row for every kind of bad file.
    Returns the expected skip counts."""
    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        (img / f"good{i}.png").write_bytes(noisy_png_bytes((64, 48), seed=i))
        rows.append({"image": f"img/good{i}.png", "question": "What colour is the square?",
                     "answer": "red", "target_box": [1, 1, 30, 30]})
    (img / "empty.png").write_bytes(b"")
    (img / "truncated.png").write_bytes(noisy_png_bytes((64, 48))[:300])
    (img / "bomb.png").write_bytes(png_with_header(200_000, 200_000))  # 4e10 pixels
    (img / "notes.png").write_text("not an image at all\n")
    q = {"question": "q?", "answer": "a"}
    rows += [
        {"image": "img/missing.png", **q},
        {"image": "img/empty.png", **q},
        {"image": "img/truncated.png", **q},
        {"image": "img/bomb.png", **q},
        {"image": "img/notes.png", **q},
        {"image": "img/good0.png", "answer": "a"},  # no question column
        {"image": "img/good0.png", "question": ["q"], "answer": "a"},  # wrong type
    ]
    with open(folder / "data.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return {"image_file_not_found": 1, "image_empty_file": 1, "image_corrupt": 1,
            "image_too_large": 1, "image_not_an_image": 1, "missing_column:question": 1,
            "wrong_type:question": 1}


def test_bad_rows_are_counted_for_the_metrics(tmp_path):
    expected = write_bad_data(tmp_path)
    cfg = Config()
    cfg.data.kind, cfg.data.path = "file", str(tmp_path / "data.jsonl")
    skipped: dict = {}
    examples = make_dataset(cfg, "train", skipped=skipped)
    assert len(examples) == 4 and skipped == expected
    m = data_metrics(skipped, len(examples))
    assert m["data/skipped_image_too_large"] == 1.0 and m["data/skipped_total"] == 7.0
    assert m["data/usable_rows"] == 4.0


# ---- real learners: a poisoned batch is skipped on every rank ------------------------

def _batch(chat, n: int, poison: bool, seed: int):
    from PIL import Image

    from mmagent_rl.trajectory import Trajectory

    rng = random.Random(seed)
    trajs = []
    for i in range(n):
        image = Image.new("RGB", (56, 56), (rng.randrange(256), 0, 0))
        prompt = chat.prompt_ids(image, "What colour?")
        gen = [rng.randrange(300, 400) for _ in range(6)]
        ids = prompt + gen
        t = Trajectory(prompt_id=f"p{seed}", sample_idx=i, token_ids=ids,
                       loss_mask=[0] * len(prompt) + [1] * len(gen),
                       logprobs=[0.0] * len(prompt) + [-6.0] * len(gen), images=[image],
                       prompt_len=len(prompt))
        adv = float("nan") if poison and i == 0 else (1.0 if i % 2 else -1.0)
        t.advantages = [0.0] * len(prompt) + [adv] * len(gen)
        trajs.append(t)
    return trajs


@pytest.mark.parametrize("zero_stage", [2, pytest.param(0, marks=pytest.mark.slow),
                                        pytest.param(3, marks=pytest.mark.slow)])
def test_poisoned_batch_on_one_rank_skips_the_step_on_every_rank(
        ray_session, tiny_model_path, chat, zero_stage):
    import ray

    from mmagent_rl.learner.worker import finalize_metrics
    from mmagent_rl.cluster import start_learners

    cfg = Config()
    cfg.algo.name = "grpo"
    cfg.learner.num_workers, cfg.learner.zero_stage, cfg.learner.lr = 2, zero_stage, 1e-2
    cfg.learner.micro_batch_size = 2
    learners = start_learners(cfg, tiny_model_path, total_steps=10)
    get = lambda refs: ray.get(refs, timeout=600)  # noqa: E731

    def full_checksum(learner) -> float:  # runs inside the actor (every rank at once)
        import deepspeed

        params = list(learner.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=learner.zero_stage == 3):
            return float(sum(p.detach().double().abs().sum() for p in params))

    def checksums():
        return get([lr.__ray_call__.remote(full_checksum) for lr in learners])

    try:
        def step(shards):
            n_tok = sum(t.num_generated for s in shards for t in s)
            n_seq = sum(len(s) for s in shards)
            return get([lr.train_step.remote(s, n_tok, n_seq) for lr, s in zip(learners, shards)])

        before = checksums()
        assert before[0] > 0
        # NaN advantages in one trajectory of rank 0's shard only.
        per_rank = step([_batch(chat, 4, True, 0), _batch(chat, 4, False, 1)])
        assert [r["train/skipped_nonfinite"] for r in per_rank] == [1.0, 1.0]
        m = finalize_metrics(per_rank)
        assert m["train/skipped_nonfinite"] == 1.0 and m["nonfinite_loss"] == 1.0
        assert checksums() == before  # untouched, on every rank
        # The learners are still healthy: a clean batch updates both, the same way.
        per_rank = step([_batch(chat, 4, False, 2), _batch(chat, 4, False, 3)])
        assert [r["train/skipped_nonfinite"] for r in per_rank] == [0.0, 0.0]
        after = checksums()
        assert after[0] != before[0] and after[0] == after[1]
        assert torch.isfinite(torch.tensor(after)).all()
    finally:
        for lr in learners:
            ray.kill(lr)


# ---- end to end: NaN rewards and bad data through `python -m mmagent_rl.launch` ------

@pytest.mark.slow
def test_run_with_nan_rewards_stops_with_status_3_and_reports_bad_rows(tmp_path, tiny_model_path):
    from safetensors.torch import load_file

    from test_launch import launch

    expected = write_bad_data(tmp_path / "data")
    run = tmp_path / "run"
    p = launch(["+algo=grpo", "trainer.total_steps=6", "trainer.max_nonfinite_steps=3",
                f"hydra.run.dir={run}", "data.kind=file",
                f"data.path={tmp_path / 'data' / 'data.jsonl'}",
                "reward.fn=test_guards:nan_reward", "learner.num_workers=2",
                "rollout.n=4", "trainer.prompts_per_step=2",
                "rollout.agent.max_new_tokens=8", "rollout.agent.max_turns=2"])
    # A stopped run is a failed run: exit status 3 and the reason on stderr.
    assert p.returncode == 3, p.stderr[-4000:]
    assert "mmagent_rl: run stopped early: stopped at step 3" in p.stderr, p.stderr[-4000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # stopped after 3 skipped steps of 6
    assert [r["train/skipped_nonfinite"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["train/nonfinite_in_a_row"] for r in rows] == [1.0, 2.0, 3.0]
    for reason, n in expected.items():
        assert rows[0][f"data/skipped_{reason}"] == n
    assert rows[0]["data/usable_rows"] == 4
    assert "stopped at step 3" in p.stdout + p.stderr
    final = load_file(run / "checkpoints" / "final" / "model.safetensors")
    start = load_file(os.path.join(tiny_model_path, "model.safetensors"))
    assert all(torch.equal(final[k], start[k]) for k in start)  # no update was applied
