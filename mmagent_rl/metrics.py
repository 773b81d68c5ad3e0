"""Per-step rollout metrics and the local JSONL log that plots are drawn from."""
from __future__ import annotations

import json
import logging
import math
import os
from statistics import mean

from mmagent_rl.trajectory import Trajectory, group_by_prompt

log = logging.getLogger(__name__)


def rollout_metrics(trajs: list[Trajectory],
                    tool_names: tuple[str, ...] | list[str] = ()) -> dict[str, float]:
    """Rewards, accuracy and tool use of one step's trajectories.

    ``tool/all_wrong_rate`` is the share of groups (prompts) whose tool-using rollouts
    are non-empty and all wrong: AXPO's trigger rate, over all groups of the step.
    Per tool: :func:`tool_metrics` (``tool_names``: the run's tools, reported even
    when not called)."""
    if not trajs:
        return {}
    groups = group_by_prompt(trajs)
    all_wrong = 0
    for g in groups.values():
        used = [t for t in g if t.used_tool]
        if used and not any(t.correct for t in used):
            all_wrong += 1
    calls = [c for t in trajs for c in t.tool_calls]
    with_tool = [t for t in trajs if t.used_tool]
    without = [t for t in trajs if not t.used_tool]
    m = {
        "reward/mean": mean(t.reward or 0.0 for t in trajs),
        "reward/std": _std([t.reward or 0.0 for t in trajs]),
        "acc/mean": mean(float(t.correct) for t in trajs),
        "acc/with_tool": mean(float(t.correct) for t in with_tool) if with_tool else 0.0,
        "acc/without_tool": mean(float(t.correct) for t in without) if without else 0.0,
        "format/answer_rate": mean(t.reward_info.get("has_answer", 0.0) for t in trajs),
        "tool/use_rate": len(with_tool) / len(trajs),
        "tool/all_wrong_rate": all_wrong / len(groups),
        "tool/calls_per_traj": len(calls) / len(trajs),
        "tool/error_rate": (sum(not c.ok for c in calls) / len(calls)) if calls else 0.0,
        "response/gen_tokens_mean": mean(t.num_generated for t in trajs),
        "response/len_mean": mean(len(t.token_ids) for t in trajs),
        "response/turns_mean": mean(t.turns for t in trajs),
        "response/max_tokens_rate": mean(float(t.finish_reason == "max_tokens") for t in trajs),
        "response/max_turns_rate": mean(float(t.finish_reason == "max_turns") for t in trajs),
    }
    m.update(tool_metrics(calls, tool_names))
    m.update(reward_error_metrics(trajs))
    return m


def tool_metrics(calls, tool_names=()) -> dict[str, float]:
    """Per tool named in a call (and per name of ``tool_names``): ``tool/<name>/calls``
    and ``tool/<name>/errors`` (counts over the step: bad arguments, failures and
    timeouts are errors) and ``tool/<name>/latency_s`` (mean wall time of the tool's runs;
    0 when it never ran). Calls whose name did not parse count only in tool/error_rate."""
    per: dict[str, list] = {n: [] for n in tool_names}
    for c in calls:
        if c.name is not None:
            per.setdefault(c.name, []).append(c)
    m = {}
    for name, cs in per.items():
        lat = [c.latency_s for c in cs if c.latency_s is not None]
        m[f"tool/{name}/calls"] = float(len(cs))
        m[f"tool/{name}/errors"] = float(sum(not c.ok for c in cs))
        m[f"tool/{name}/latency_s"] = mean(lat) if lat else 0.0
    return m


def reward_error_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """With a model-judged reward (reward/judge.py): ``reward/judge_errors``, the count
    of judge calls that failed (those trajectories were scored by the fallback), and
    ``reward/judge_latency_s``, the mean request latency. ``reward/errors``: the count
    of reward plugin calls that raised (scored 0), when there are any."""
    infos = [t.reward_info for t in trajs]
    m = {}
    if any("judge_ok" in i for i in infos):
        m["reward/judge_errors"] = float(sum(i.get("judge_error", 0.0) for i in infos))
        lat = [i["judge_latency_s"] for i in infos if "judge_latency_s" in i]
        m["reward/judge_latency_s"] = mean(lat) if lat else 0.0
    if any(i.get("reward_error") for i in infos):
        m["reward/errors"] = float(sum(i.get("reward_error", 0.0) for i in infos))
    return m


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


class JsonlLogger:
    """Appends one JSON object per line and flushes it, so a crash loses nothing."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                 for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_jsonl(path: str, max_step: int) -> int:
    """Drop the records of steps after ``max_step`` (a resumed run writes them again);
    lines that do not parse are kept. Atomic (temp file + rename). Returns the number
    of records dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                step = None
            if isinstance(step, (int, float)) and step > max_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def resolve_wandb_mode(mode: str, env=None) -> str:
    """``logger.wandb_mode``: auto = the WANDB_MODE variable if set, else online when
    WANDB_API_KEY is set, else offline. Other values are used as they are."""
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


def _scalars(record: dict) -> dict:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class WandbLogger:
    """wandb run in ``<run dir>/wandb``. It never fails the run: an init that fails
    warns and falls back (online -> offline -> disabled), and a failing log or finish
    warns once and turns wandb off for the rest of the run."""

    FALLBACK = {"online": ("online", "offline"), "offline": ("offline",), "disabled": ()}

    def __init__(self, run_dir: str, project: str, config: dict, mode: str,
                 run_id: str | None = None, init_timeout: float = 30.0):
        self.run, self.mode = None, "disabled"
        modes = self.FALLBACK.get(resolve_wandb_mode(mode), ())
        if not modes:
            return
        try:
            import wandb
        except Exception as e:  # noqa: BLE001 - never fail the run for logging
            log.warning("logger.wandb=true but wandb cannot be imported (%s); not logging "
                        "to wandb", e)
            return
        for m in modes:
            try:
                self.run = wandb.init(
                    project=project, dir=run_dir, config=config, mode=m, id=run_id,
                    resume="allow" if run_id else None,
                    settings=wandb.Settings(init_timeout=init_timeout, console="off"))
                self.mode = m
                break
            except Exception as e:  # noqa: BLE001
                nxt = "offline" if m == "online" else "disabled (no wandb logging)"
                log.warning("wandb init in %s mode failed (%s: %s); falling back to %s",
                            m, type(e).__name__, str(e)[:300], nxt)
                try:
                    wandb.finish(exit_code=1)
                except Exception:  # noqa: BLE001
                    pass
        if self.run is not None:
            log.info("wandb: %s run %s in %s", self.mode, self.run.id,
                     os.path.join(run_dir, "wandb"))

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log.warning("wandb %s failed (%s: %s); wandb logging is off for the rest of "
                        "the run", what, type(e).__name__, str(e)[:300])
            self.run = None

    def log(self, record: dict) -> None:
        step = record.get("step")
        self._guard("log", lambda: self.run.log(_scalars(record), step=step))

    def summary(self, values: dict) -> None:
        self._guard("summary", lambda: self.run.summary.update(values))

    def close(self) -> None:
        self._guard("finish", lambda: self.run.finish())
        self.run = None


class TensorBoardLogger:
    """Scalars in ``<run dir>/tensorboard`` via torch.utils.tensorboard (needs the
    ``tensorboard`` package; without it: a warning, nothing is written)."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            log.warning("logger.tensorboard=true but the tensorboard package is not "
                        "importable (%s): pip install tensorboard==2.21.0. No TensorBoard "
                        "scalars are written.", e)
            return
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log(self, record: dict) -> None:
        if self.writer is None:
            return
        step = int(record.get("step", 0))
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def summary(self, values: dict) -> None:
        if self.writer is not None:
            for k, v in _scalars(values).items():
                self.writer.add_scalar(k, v, 0)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RunLogger:
    """Every step's metrics to metrics.jsonl (key names unchanged) and, when enabled,
    to wandb (``logger.wandb``) and TensorBoard (``logger.tensorboard``).

    ``resume_step`` (> 0 on a resumed run): TensorBoard drops its events after that
    step, and ``wandb_id`` continues the same wandb run."""

    def __init__(self, cfg, run_dir: str, *, resume_step: int = 0,
                 wandb_id: str | None = None):
        import dataclasses

        lc = cfg.logger
        self.jsonl = JsonlLogger(os.path.join(run_dir, "metrics.jsonl")) if lc.jsonl else None
        self.wandb = None
        if lc.wandb:
            config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
            self.wandb = WandbLogger(run_dir, lc.project, config, lc.wandb_mode,
                                     run_id=wandb_id, init_timeout=lc.wandb_init_timeout_s)
        self.tb = TensorBoardLogger(os.path.join(run_dir, "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None) \
            if lc.tensorboard else None

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.run_id if self.wandb is not None else None

    def _sinks(self):
        return [s for s in (self.jsonl, self.wandb, self.tb) if s is not None]

    def log(self, record: dict) -> None:
        for s in self._sinks():
            s.log(record)

    def summary(self, values: dict) -> None:
        """Final figures (e.g. an evaluation): wandb's run summary, TensorBoard scalars
        at step 0; not written to metrics.jsonl."""
        for s in (self.wandb, self.tb):
            if s is not None:
                s.summary(values)

    def close(self) -> None:
        for s in self._sinks():
            s.close()

    def __bool__(self) -> bool:
        return bool(self._sinks())


def format_eval(m: dict) -> str:
    keys = ("eval/pass@1", "eval/pass@1_se", "eval/pass@k", "eval/tool_call_rate",
            "eval/box_hit_rate", "eval/format_rate", "eval/time_s")
    return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def format_step(m: dict) -> str:
    keys = ("loss", "reward/mean", "acc/mean", "tool/use_rate", "tool/all_wrong_rate",
            "grad_norm", "time/generate", "time/learn", "time/sync", "tokens_per_s")
    return f"step {m['step']}: " + " ".join(
        f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))) + (
        " | held-out " + format_eval(m) if "eval/pass@1" in m else "")
