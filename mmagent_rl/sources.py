"""What a run trains and is evaluated on: the model folder and the data splits."""
from __future__ import annotations

import logging

from mmagent_rl.config import Config

log = logging.getLogger(__name__)


def resolve_model_path(cfg: Config) -> str:
    if cfg.model.path:
        return cfg.model.path
    if cfg.model.name == "embedded":  # the shipped SFT agent (mmagent_rl/models/embedded.py)
        from mmagent_rl.models.embedded import embedded_path

        return embedded_path()
    from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model

    return str(ensure_tiny_model(TinySpec(family=cfg.model.tiny_family,
                                         seed=cfg.model.tiny_seed,
                                         variant=cfg.model.tiny_variant)))


def make_dataset(cfg: Config, split: str = "train", skipped: dict | None = None):
    """The examples of ``split``. For file data, ``skipped`` (if given) receives the
    number of bad rows skipped per reason."""
    if cfg.data.kind == "synthetic":
        from mmagent_rl.data.synthetic import SyntheticDataset

        if split == "train":
            return SyntheticDataset(cfg.data.synthetic, seed=cfg.data.seed,
                                    size=cfg.data.train_size, split="train")
        eval_seed = cfg.data.seed if cfg.data.eval_seed is None else cfg.data.eval_seed
        return SyntheticDataset(cfg.data.synthetic, seed=eval_seed,
                                size=cfg.data.eval_size, split="test")  # held out
    from mmagent_rl.data.datasets import load_examples

    path = cfg.data.path if split == "train" else (cfg.data.eval_path or cfg.data.path)
    result = load_examples(path, max_image_pixels=cfg.data.max_image_pixels,
                           max_image_bytes=cfg.data.max_image_bytes)
    if result.skipped:
        log.warning("data: skipped %d rows: %s", sum(result.skipped.values()),
                    dict(result.skipped))
    if skipped is not None:
        skipped.update(result.skipped)
    return result.examples


def data_metrics(skipped: dict, usable: int) -> dict:
    """``data/skipped_<reason>`` counts, their total and the usable rows, for
    metrics.jsonl (file data)."""
    out = {f"data/skipped_{reason}": float(n) for reason, n in sorted(skipped.items())}
    out["data/skipped_total"] = float(sum(skipped.values()))
    out["data/usable_rows"] = float(usable)
    return out
