"""What a run trains and is evaluated on: the model folder and the data splits."""
from __future__ import annotations

import logging

from mmagent_rl.config import Config

log = logging.getLogger(__name__)


def resolve_model_path(cfg: Config) -> str:
    """A local folder for the model the config names: model.path as a folder, or as a
    hub name ("Qwen/Qwen2.5-VL-7B-Instruct") resolved through the Hugging Face cache;
    else the embedded agent or a built tiny model. Fails here, at start, when it cannot."""
    if cfg.model.path:
        return resolve_checkpoint(cfg.model.path)
    if cfg.model.name == "embedded":  # the shipped SFT agent (mmagent_rl/models/embedded.py)
        from mmagent_rl.models.embedded import embedded_path

        return embedded_path()
    from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model

    return str(ensure_tiny_model(TinySpec(family=cfg.model.tiny_family,
                                         seed=cfg.model.tiny_seed,
                                         variant=cfg.model.tiny_variant)))


# What a policy checkpoint needs on disk: weights, config, tokenizer and processor files.
CHECKPOINT_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


def resolve_checkpoint(name_or_path: str) -> str:
    """``name_or_path`` if it is a folder holding safetensors weights; else a hub name
    looked up in the HF cache (HF_HOME / HF_HUB_CACHE), downloaded into it when the hub
    is reachable (not with HF_HUB_OFFLINE=1). The folder is resolved on the driver: on a
    cluster the cache (or the folder) must be on storage every node sees."""
    from pathlib import Path

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not any(local.glob("*.safetensors")):
            raise ValueError(f"model.path={name_or_path}: the folder has no *.safetensors "
                             "weights (the engine and the weight push need them)")
        return str(local)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ValueError(f"model.path={name_or_path}: no such folder, and not a hub name "
                         "of the form org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:  # the cache first: no network needed when the model is there
        folder = snapshot_download(name_or_path, allow_patterns=CHECKPOINT_PATTERNS,
                                   local_files_only=True)
    except Exception as cached_exc:
        try:
            folder = snapshot_download(name_or_path, allow_patterns=CHECKPOINT_PATTERNS)
        except Exception as exc:
            raise ValueError(
                f"model.path={name_or_path}: not a local folder, not in the Hugging Face "
                f"cache ({HF_HUB_CACHE}: {type(cached_exc).__name__}) and not downloadable "
                f"({type(exc).__name__}: {str(exc)[:200]}); download it where the hub is "
                f"reachable (`hf download {name_or_path}`) into a cache this machine "
                "reads (HF_HOME), or give a local folder") from None
    if not any(Path(folder).glob("*.safetensors")):
        raise ValueError(f"model.path={name_or_path}: the cached snapshot {folder} has no "
                         "*.safetensors weights")
    return folder


def make_dataset(cfg: Config, split: str = "train", skipped: dict | None = None):
    """The examples of ``split`` ("train" or "eval"). For file data, ``skipped`` (if
    given) receives the number of bad rows skipped per reason.

    The eval split is never the training data by accident: ``data.eval_path`` if set
    (whatever data.kind is, so a benchmark file can be evaluated alone), else the
    synthetic held-out split, else (data.kind=file) the ``data.eval_fraction`` of
    data.path drawn with data.seed, which the train split then leaves out; with none of
    these an eval of file data is an error naming the keys."""
    d = cfg.data
    if split == "eval" and d.eval_path:
        return _load(cfg, d.eval_path, skipped, purpose="eval")
    if d.kind == "synthetic":
        from mmagent_rl.data.synthetic import SyntheticDataset

        if split == "train":
            return SyntheticDataset(d.synthetic, seed=d.seed, size=d.train_size, split="train")
        eval_seed = d.seed if d.eval_seed is None else d.eval_seed
        return SyntheticDataset(d.synthetic, seed=eval_seed, size=d.eval_size,
                                split="test")  # held out
    if split == "eval" and not d.eval_fraction:
        raise ValueError(
            f"no held-out data for an eval of data.path={d.path}: set data.eval_path (a "
            "held-out file) or data.eval_fraction (a seeded share of data.path that "
            "training then leaves out); an eval on the training file is never implicit")
    examples = _load(cfg, d.path, skipped)
    if d.eval_fraction and not d.eval_path:
        train, held_out = split_held_out(examples, d.eval_fraction, d.seed)
        return train if split == "train" else held_out
    return examples


def split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): round(fraction * N) examples, at least one, drawn with
    ``seed``; both keep the file's order. The same file and seed give the same split in
    every process."""
    import random

    n_out = max(1, round(fraction * len(examples)))
    if n_out >= len(examples):
        raise ValueError(f"data.eval_fraction={fraction} holds out {n_out} of "
                         f"{len(examples)} usable rows: nothing would be left to train on")
    out = set(random.Random(seed).sample(range(len(examples)), n_out))
    return ([ex for i, ex in enumerate(examples) if i not in out],
            [ex for i, ex in enumerate(examples) if i in out])


def _load(cfg: Config, path: str, skipped: dict | None, purpose: str = "train"):
    from mmagent_rl.data.datasets import load_examples

    d = cfg.data  # an hf DatasetDict's default split follows the purpose (eval_path: test)
    result = load_examples(path, d.format, max_image_pixels=d.max_image_pixels,
                           max_image_bytes=d.max_image_bytes, split=d.split,
                           purpose=purpose,
                           image_root=d.image_root, columns=dict(d.columns or {}))
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
