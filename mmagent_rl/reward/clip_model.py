"""The CLIP that scores MAPO's zoom labels (the embedded tiny one by default).

MAPO rewards a tool call whose description matches the crop it fetched:
``(cos(text(description), image(crop)) + 1) / 2``. ``ClipScorer`` computes it with any
open_clip model; ``arch="embedded"`` is a 3.4M-parameter CLIP trained on the synthetic
task, so the reward works offline with nothing downloaded. Its architecture is
``assets/mmagent-tiny-clip.json`` (open_clip names a model after its config file), its
fp16 weights ``assets/tiny_clip.safetensors``; how it is built and evaluated:
mmagent_rl/models/tiny_clip.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from PIL import Image


log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MODEL_NAME = "mmagent-tiny-clip"
ARCH_JSON = ASSETS_DIR / f"{MODEL_NAME}.json"
EMBEDDED_WEIGHTS = ASSETS_DIR / "tiny_clip.safetensors"
# Zoom crops are not square (the shorter side follows the box); squashing keeps the
# whole crop, where open_clip's default centre crop could cut the target off.
EMBEDDED_RESIZE_MODE = "squash"
BUILD_COMMAND = "python -m mmagent_rl.models.tiny_clip build"
_META_KEY = "mmagent_build"  # safetensors header entry holding the build's metadata


# --- loading -----------------------------------------------------------------------

def _open_clip():
    # Imported on first use: open_clip (and torchvision) take seconds to import, and
    # most users of the reward package never build a CLIP.
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(ARCH_JSON)
    return open_clip


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Mute open_clip's "initialized randomly" warning when weights are loaded next."""
    previous = logging.root.manager.disable
    if enabled:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def load_clip(arch: str = "embedded", checkpoint: str | os.PathLike | None = None,
              device: str = "cpu"):
    """(model, preprocess, tokenizer), model in eval mode and fp32.

    "embedded" loads the shipped tiny CLIP (or ``checkpoint``, a file written by
    ``build_embedded_clip``). Any other open_clip architecture name is created with
    ``pretrained=None`` (nothing is downloaded) and loads ``checkpoint`` if given;
    without one its weights are random.
    """
    open_clip = _open_clip()
    embedded = arch in ("embedded", MODEL_NAME)
    name = MODEL_NAME if embedded else arch
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {arch!r}; use 'embedded' or an open_clip "
                         f"model name, e.g. ViT-B-32 (see open_clip.list_models())")
    if embedded and checkpoint is None:
        checkpoint = EMBEDDED_WEIGHTS
    if checkpoint is not None and not Path(checkpoint).is_file():
        hint = f" (rebuild it with `{BUILD_COMMAND}`)" if embedded else ""
        raise FileNotFoundError(f"CLIP checkpoint not found: {checkpoint}{hint}")

    kwargs = {"image_resize_mode": EMBEDDED_RESIZE_MODE} if embedded else {}
    with _quiet(checkpoint is not None):
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, device="cpu", **kwargs)
    if embedded:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(checkpoint)).items()}  # fp16 on disk
        model.load_state_dict(state, strict=True)
    elif checkpoint is not None:
        open_clip.load_checkpoint(model, str(checkpoint))
    else:
        log.warning("CLIP %s has random weights: pass a checkpoint for meaningful scores", arch)
    model = model.to(device).eval()
    return model, preprocess, open_clip.get_tokenizer(name)


# --- scoring -----------------------------------------------------------------------

class ScoreStatus:
    OK = "ok"
    MISSING = "missing"  # no label, or an empty one
    TOO_LONG = "too_long"  # more than max_words words
    NO_IMAGE = "no_image"  # the call produced no crop


class ClipScorer:
    """Label/crop agreement ``(cos + 1) / 2`` in [0, 1]; invalid items score exactly 0.0.

    An item's status is the first that applies: "missing" (no label, not a string, or
    blank), "too_long" (more than ``max_words`` words), "no_image", else "ok".
    """

    def __init__(self, arch: str = "embedded", checkpoint: str | None = None,
                 device: str = "cpu", batch_size: int = 64, max_words: int = 16):
        if batch_size < 1 or max_words < 1:
            raise ValueError(f"batch_size and max_words must be >= 1, got {batch_size}, {max_words}")
        self.model, self.preprocess, self.tokenizer = load_clip(arch, checkpoint, device)
        self.device, self.batch_size, self.max_words = device, batch_size, max_words

    def _status(self, description: str | None, image: Image.Image | None) -> str:
        if not isinstance(description, str) or not description.strip():
            return ScoreStatus.MISSING
        if len(description.split()) > self.max_words:
            return ScoreStatus.TOO_LONG
        if image is None:
            return ScoreStatus.NO_IMAGE
        return ScoreStatus.OK

    @torch.inference_mode()
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float())
        return torch.cat(out)

    @torch.inference_mode()
    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB"))
                                  for im in images[i:i + self.batch_size]])
            out.append(self.model.encode_image(pixels.to(self.device), normalize=True).float())
        return torch.cat(out)

    def score_detailed(self, descriptions: list[str | None],
                       images: list[Image.Image | None]) -> tuple[list[float], list[str]]:
        if len(descriptions) != len(images):
            raise ValueError(f"{len(descriptions)} descriptions but {len(images)} images")
        statuses = [self._status(d, im) for d, im in zip(descriptions, images)]
        scores = [0.0] * len(statuses)
        ok = [i for i, s in enumerate(statuses) if s == ScoreStatus.OK]
        if ok:
            # A group's rollouts often repeat a label: encode each distinct text once.
            texts = sorted({descriptions[i].strip() for i in ok})
            text_emb = self._encode_texts(texts)
            row = {t: j for j, t in enumerate(texts)}
            image_emb = self._encode_images([images[i] for i in ok])
            text_rows = text_emb[[row[descriptions[i].strip()] for i in ok]]
            cos = (image_emb * text_rows).sum(-1)
            for i, c in zip(ok, cos.tolist()):
                scores[i] = min(1.0, max(0.0, (c + 1.0) / 2.0))
        return scores, statuses

    def score(self, descriptions: list[str | None], images: list[Image.Image | None]) -> list[float]:
        return self.score_detailed(descriptions, images)[0]
