"""The embedded agent: a tiny Qwen3-VL (2.6M parameters) taught by SFT to zoom and answer.

It is shipped in ``mmagent_rl/assets/embedded_agent`` (weights stored as float16, ~5 MB;
loaded as float32) because building it took 75 minutes of one (shared) CPU core, which
``make demo`` cannot afford. The recipe (a perception curriculum, see
``bench/sft_recipe.py`` recipe ``ladder_q3``) is deterministic: one thread, seeded data,
stage changes decided by training metrics, not by the clock. Rebuild it with::

    python -m mmagent_rl.models.embedded build   # ~1 h on one core, then exports

``export`` alone turns a trained model folder into the shipped one and prints the
sha256 of the weights, which ``assets/embedded_agent/SHA256`` records.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded_agent"
REPO = Path(__file__).resolve().parents[2]
# The short system prompt the agent was trained with (a constant prefix for a model
# this small; ~30% shorter sequences than the default tool prompt).
SYSTEM_PROMPT = "Zoom in with image_zoom_in_tool if needed. Answer as <answer>...</answer>."
# The shipped agent stopped at step 3260 (a 75-minute cap, mid-way through the last
# stage's cosine); a step cap reproduces that stop, a clock would not.
BUILD_ARGS = ["train", "--recipe", "ladder_q3", "--max-steps", "3260", "--max-minutes", "1000",
              "--eval-every-min", "1000", "--eval-n", "200"]


def embedded_path() -> str:
    if not (EMBEDDED_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded agent is missing from {EMBEDDED_DIR}; rebuild it with "
            "`python -m mmagent_rl.models.embedded build`")
    return str(EMBEDDED_DIR)


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


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
    b = sub.add_parser("build", help="train with the shipped recipe, then export")
    b.add_argument("--work", default="/tmp/mmagent_rl_embedded_build")
    e = sub.add_parser("export", help="export a trained model folder")
    e.add_argument("src")
    e.add_argument("--out", default=str(EMBEDDED_DIR))
    args = ap.parse_args()
    if args.cmd == "build":
        subprocess.run([sys.executable, str(REPO / "bench" / "sft_recipe.py"), *BUILD_ARGS,
                        "--out", args.work], check=True)
        src, out = Path(args.work) / "model", EMBEDDED_DIR
    else:
        src, out = Path(args.src), Path(args.out)
    digest = export(src, out)
    print(f"exported {src} -> {out}\nsha256 {digest}")


if __name__ == "__main__":
    main()
