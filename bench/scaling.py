"""How step time grows when group size, turns per trajectory and image resolution double.

    python bench/scaling.py [--steps 2] [--prompts 2] [--tokens 32] [--quick]

One real trainer (Ray, vLLM, DeepSpeed, 1 learner, GRPO) on a tiny random Qwen2.5-VL
whose processor keeps up to 896x896 px (``TinySpec(max_pixels=896*896)``), so image
tokens grow with the input image. Between measurements only the varied knob changes,
in the same run:
- group size: ``rollout.n`` = 2, 4, 8, 16 (turns 1, 224 px);
- turns per trajectory: 1, 2, 4, 8 sampled turns (n = 4, 224 px). A random model rarely
  calls the tool, so inside the rollout actor every sampled turn but the last is
  followed by a scripted zoom call (loss mask 0): the tool runs, its crop is appended,
  and the next turn is sampled on the longer context (``rollout.agent.max_turns`` =
  2 x turns);
- image resolution: the dataset's images resized to 112, 224, 448, 896 px a side
  (n = 4, turns 1): 16, 64, 256, 1024 image tokens.
The ten configurations (one base, three more points per knob) are measured
round-robin, ``--steps`` rounds, and each point is the median of its steps. For each
knob the bench prints every doubling's step-time ratio (2.0 = linear) and the slope of
log(step time) against log(knob) fitted over the four points (1.0 = linear). Last line:
one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics

CALL = ('<tool_call>{"name": "image_zoom_in_tool", "arguments": '
        '{"bbox_2d": [40, 40, 200, 200], "label": "a region"}}</tool_call>')


def force_turns(worker, turns: int, call_text: str):
    """Runs inside the rollout actor: every sampled turn before the ``turns``-th is
    followed by a scripted tool call (mask 0), so each trajectory samples ``turns``
    turns (fewer only if it reaches max_total_tokens)."""
    from mmagent_rl.rollout.engine import Generation

    loop = worker.loop
    if not hasattr(loop, "_bench_orig_advance"):
        loop._bench_orig_advance = loop._advance
    orig = loop._bench_orig_advance
    chat = loop.chat
    ids = chat.encode(call_text)

    def _advance(s, g, sampled=True):
        orig(s, g, sampled)
        if not sampled:
            return
        s.bench_sampled = getattr(s, "bench_sampled", 0) + 1
        if s.done and s.bench_sampled < turns:
            s.done, s.finish = False, ""
            orig(s, Generation(ids, [0.0] * len(ids), "stop", chat.tool_call_close_id),
                 sampled=False)

    loop._advance = _advance
    loop.cfg.max_turns = 2 * turns
    return True


class Resized:
    """The dataset with every image resized to side x side (boxes scaled)."""

    def __init__(self, ds, side: int):
        self.ds, self.side = ds, side

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        ex = self.ds[i]
        w, h = ex.image.size
        box = ex.target_box
        if box is not None:
            box = tuple(int(v * self.side / w) for v in box)
        return dataclasses.replace(ex, image=ex.image.resize((self.side, self.side)),
                                   target_box=box)


KNOBS = {"n": [2, 4, 8, 16], "turns": [1, 2, 4, 8], "side": [112, 224, 448, 896]}
BASE = {"n": 4, "turns": 1, "side": 224}


def sampled_runs(mask) -> int:
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="rounds: steps per point (median)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:  # one round of the smallest workload: figures meaningless
        a.steps, a.prompts, a.tokens = 1, 1, 8

    import ray

    from common import run_steps, stop
    from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model

    path = str(ensure_tiny_model(TinySpec(max_pixels=896 * 896)))
    _, tr = run_steps("grpo", steps=0, warmup=1, prompts=a.prompts, n=4, tokens=a.tokens,
                      run_dir="/tmp/mmagent_bench_scaling",
                      overrides={"model.path": path,
                                 "rollout.engine.max_images_per_prompt": 17,
                                 "rollout.agent.max_turns": 16})
    base_ds = tr.dataset

    def setup(n, turns, side):
        tr.cfg.rollout.n = n
        tr.dataset = Resized(base_ds, side)
        ray.get([w.__ray_call__.remote(force_turns, turns, CALL) for w in tr.rollouts])

    def record(rows, knobs) -> dict:
        med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
        t = [x for r in rows for x in r["trajs"]]
        return {**knobs, "step_s": med("time/step"), "generate_s": med("time/generate"),
                "learn_s": med("time/learn"),
                "turns_mean": statistics.mean(sampled_runs(x.loss_mask) for x in t),
                "tokens_mean": statistics.mean(len(x.token_ids) for x in t),
                "samples": len(rows[0]["trajs"])}

    # Every configuration once per round, rounds repeated: a slow spell on this shared
    # machine then hits all of them alike.
    configs = {"base": BASE, **{f"{knob}{x}": {**BASE, knob: x}
                                for knob, xs in KNOBS.items() for x in xs if x != BASE[knob]}}
    rows: dict = {k: [] for k in configs}
    setup(**BASE)
    tr.train_step()  # warm-up at the forced-turn settings
    for _ in range(a.steps):
        for name, knobs in configs.items():
            setup(**knobs)
            m = tr.train_step()
            m["trajs"] = tr.last_trajectories
            rows[name].append(m)
    stop(tr)
    pts = {name: record(rows[name], knobs) for name, knobs in configs.items()}

    slopes, doublings, results = {}, {}, {}
    for knob, xs in KNOBS.items():
        results[knob] = [pts["base" if x == BASE[knob] else f"{knob}{x}"] for x in xs]
        pk = results[knob]
        slopes[knob] = {part: round(slope(xs, [p[part] for p in pk]), 3)
                        for part in ("step_s", "generate_s", "learn_s")}
        doublings[knob] = [round(q["step_s"] / p["step_s"], 3) for p, q in zip(pk, pk[1:])]
        print(f"\n{knob}:")
        print(f"  {knob:>6} {'step s':>8} {'x prev':>7} {'gen s':>8} {'learn s':>8} "
              f"{'tokens':>7} {'turns':>6} {'samples':>7}")
        for i, (x, p) in enumerate(zip(xs, pk)):
            ratio = f"{doublings[knob][i - 1]:>7.2f}" if i else f"{'':>7}"
            print(f"  {x:>6} {p['step_s']:>8.3f} {ratio} {p['generate_s']:>8.3f} "
                  f"{p['learn_s']:>8.3f} {p['tokens_mean']:>7.0f} {p['turns_mean']:>6.2f} "
                  f"{p['samples']:>7}")
        print(f"  log-log slope over {len(xs)} points: step {slopes[knob]['step_s']}, "
              f"generate {slopes[knob]['generate_s']}, learn {slopes[knob]['learn_s']}")
    print(json.dumps({
        "workload": {"prompts": a.prompts, "max_new_tokens": a.tokens, "steps": a.steps},
        "slope_group_size": slopes["n"]["step_s"], "slope_turns": slopes["turns"]["step_s"],
        "slope_resolution": slopes["side"]["step_s"],
        "slope_resolution_per_pixel_count": round(slopes["side"]["step_s"] / 2, 3),
        "doubling_ratios": doublings, "slopes_by_phase": slopes, "points": results,
    }))


if __name__ == "__main__":
    main()
