"""wandb and TensorBoard logging: mode choice, fallbacks that never fail a run, and real
runs whose wandb offline files and TensorBoard events hold the logged metrics."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from mmagent_rl import metrics as M

torch.set_num_threads(1)
# A closed loopback port: "online" wandb has no server to reach, and no traffic leaves
# the machine.
NO_SERVER = "http://127.0.0.1:9"


def read_wandb(run_dir, kind: str = "*run") -> dict:
    """The records of the wandb run under ``run_dir`` (its ``.wandb`` file: a
    LevelDB-style log of 32 KiB blocks holding protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(str(run_dir), "wandb", f"{kind}-*", "run-*.wandb"))
    assert len(files) == 1, files
    raw = open(files[0], "rb").read()
    assert raw[:4] == b":W&B"
    out = {"history": [], "summary": {}, "config": {}}
    pos, buf, block, hdr = 7, b"", 32768, 7
    while pos + hdr <= len(raw):
        if block - pos % block < hdr:  # block trailer padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + hdr])
        data, pos = raw[pos + hdr:pos + hdr + n], pos + hdr + n
        if kind == 0:
            break
        buf = data if kind in (1, 2) else buf + data
        if kind not in (1, 4):  # FIRST / MIDDLE: more to come
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        which = rec.WhichOneof("record_type")

        def items(seq):
            return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in seq}

        if which == "history":
            out["history"].append(items(rec.history.item))
        elif which == "summary":
            out["summary"].update(items(rec.summary.update))
        elif which == "config":
            out["config"].update(items(rec.config.update))
        elif which == "run":  # the run record carries the config given to wandb.init
            out["config"].update(items(rec.run.config.update))
    return out


def test_wandb_mode_auto():
    assert M.resolve_wandb_mode("auto", {}) == "offline"
    assert M.resolve_wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert M.resolve_wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) \
        == "disabled"
    assert M.resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"


def test_online_without_a_key_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", NO_SERVER)
    lg = M.WandbLogger(str(tmp_path), "p", {"a": {"b": 1}}, "online", init_timeout=5)
    assert lg.mode == "offline" and lg.run is not None
    assert "falling back to offline" in caplog.text
    lg.log({"step": 1, "loss": 0.5, "time/step": 2.0, "note": "text"})
    lg.summary({"eval/pass@1": 0.25})
    lg.close()
    rec = read_wandb(tmp_path)
    assert rec["config"]["a"] == {"b": 1}
    (h,) = rec["history"]
    assert (h["_step"], h["loss"], h["time/step"]) == (1, 0.5, 2.0) and "note" not in h
    assert rec["summary"]["eval/pass@1"] == 0.25


def test_wandb_failures_never_raise(tmp_path, monkeypatch, caplog):
    import wandb

    def boom(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    lg = M.WandbLogger(str(tmp_path), "p", {}, "online", init_timeout=1)
    assert lg.run is None and lg.mode == "disabled"
    assert "falling back to offline" in caplog.text and "falling back to disabled" in caplog.text
    lg.log({"step": 1, "loss": 1.0})  # no-ops
    lg.close()

    class Run:
        id = "x"

        def log(self, *a, **k):
            raise OSError("disk full")

    lg.run = Run()
    lg.log({"step": 2, "loss": 1.0})
    assert lg.run is None and "wandb logging is off" in caplog.text


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = M.TensorBoardLogger(str(tmp_path / "tb"))
    for s in (1, 2):
        tb.log({"step": s, "loss": s / 4, "time/learn": 1.0, "flag": True})
    tb.close()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 0.25), (2, 0.5)]
    assert "time/learn" in ea.Tags()["scalars"] and "flag" not in ea.Tags()["scalars"]


def test_all_logging_off_is_falsy(tmp_path):
    from mmagent_rl.config import Config

    c = Config()
    c.logger.jsonl = False
    assert not M.RunLogger(c, str(tmp_path))


def _launch(args, env_extra, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
               **env_extra)
    return subprocess.run([sys.executable, "-m", "mmagent_rl.launch", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


TINY = ["+algo=grpo", "learner.num_workers=1", "rollout.n=2", "trainer.prompts_per_step=2",
        "rollout.agent.max_new_tokens=16", "learner.micro_batch_size=4",
        "reward.fn=reward_plugins:shortness_reward", "trainer.progress=false",
        "trainer.save_final=false", "logger.wandb=true", "logger.tensorboard=true"]


@pytest.mark.slow
def test_online_run_without_network_falls_back_and_logs_config_metrics_and_tensorboard(
        tmp_path):
    """One real run checks both: "online" wandb with no server to reach falls back to
    offline and finishes, and the offline run's file and the TensorBoard events hold the
    config and every step's metrics (the explicit offline mode takes the same path after
    the mode choice, which test_online_without_a_key_falls_back_to_offline covers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    p = _launch(TINY + ["trainer.total_steps=2", "logger.wandb_mode=online",
                        "logger.wandb_init_timeout_s=5", f"hydra.run.dir={run}"],
                {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40,
                 "WANDB_BASE_URL": NO_SERVER})
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout + p.stderr
    assert "wandb init in online mode failed" in out and "falling back to offline" in out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "tool/use_rate" in rows[0]
    # The failed online attempt leaves its own (empty) run folder; the metrics went to
    # the offline run.
    rec = read_wandb(run, "offline-run")
    cfg = rec["config"]
    assert cfg["trainer"]["total_steps"] == 2 and cfg["algo"]["name"] == "grpo"
    hist = {h["_step"]: h for h in rec["history"]}
    assert sorted(hist) == [1, 2]
    for r in rows:
        assert hist[r["step"]]["loss"] == pytest.approx(r["loss"], abs=1e-12)
        assert hist[r["step"]]["time/generate"] == pytest.approx(r["time/generate"])
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("reward/mean")] == [1, 2]
