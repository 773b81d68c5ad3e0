"""The embedded agent: a tiny Qwen3-VL (2.6M parameters) taught by SFT to zoom and answer.

It is shipped in ``mmagent_rl/assets/embedded_agent`` (weights stored as float16, ~5 MB;
loaded as float32) because building it takes longer than ``make demo`` can afford. The
build is the package's own SFT, ``python -m mmagent_rl.sft sft=embedded_agent``: the
curriculum in conf/sft/embedded_agent.yaml on one DeepSpeed learner, from the base
``model=embedded_base`` (models/tiny.py, variant agent). It is deterministic: one
learner thread, data a function of (seed, step, stage), stage changes decided by
training metrics, a step cap rather than a clock. Rebuild it with::

    python -m mmagent_rl.models.embedded build   # trains, exports, prints the sha256

``export`` alone turns a trained model folder into the shipped one and prints the
sha256 of the weights, which ``assets/embedded_agent/SHA256`` records.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded_agent"
REPO = Path(__file__).resolve().parents[2]
# The short system prompt the agent was trained with (a constant prefix for a model
# this small; ~30% shorter sequences than the default tool prompt).
SYSTEM_PROMPT = "Zoom in with image_zoom_in_tool if needed. Answer as <answer>...</answer>."
CONF_DIR = REPO / "conf"


def embedded_path() -> str:
    if not (EMBEDDED_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded agent is missing from {EMBEDDED_DIR}; rebuild it with "
            "`python -m mmagent_rl.models.embedded build`")
    return str(EMBEDDED_DIR)


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def build(work: Path, overrides: list[str] = ()) -> Path:
    """Train the agent with the package's SFT (sft=embedded_agent) into ``work``;
    returns the trained HF folder."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mmagent_rl.config import register
    from mmagent_rl.sft import run_sft

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", ["sft=embedded_agent", *overrides]))
    work.mkdir(parents=True, exist_ok=True)
    run_sft(cfg, str(work))
    final = work / "checkpoints" / "final"
    (final / "system_prompt.txt").write_text(cfg.model.system_prompt)
    (final / "demo_config.json").write_text(json.dumps(dataclasses.asdict(cfg.sft.demo)))
    return final


def export(src: Path, out: Path = EMBEDDED_DIR) -> str:
    """Copy a trained model folder, weights cast to float16 (half the bytes; the
    agent's eval figures in docs/embedded_agent.md are measured on the float16 copy)."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tensors = load_file(str(src / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
            for k, v in sorted(tensors.items())}
    save_file(half, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    digest = weights_sha256(tmp)
    (tmp / "SHA256").write_text(digest + "  model.safetensors\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train with sft=embedded_agent, then export")
    b.add_argument("--work", default="/tmp/mmagent_rl_embedded_build")
    b.add_argument("--out", default=str(EMBEDDED_DIR))
    b.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.progress=false")
    e = sub.add_parser("export", help="export a trained model folder")
    e.add_argument("src")
    e.add_argument("--out", default=str(EMBEDDED_DIR))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    if args.cmd == "build":
        src = build(Path(args.work), args.overrides)
    else:
        src = Path(args.src)
    out = Path(args.out)
    digest = export(src, out)
    print(f"exported {src} -> {out}\nsha256 {digest}")


if __name__ == "__main__":
    main()
