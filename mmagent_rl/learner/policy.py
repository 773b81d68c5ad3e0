"""The HF policy model and the log-probs of multi-turn multimodal sequences."""
from __future__ import annotations

import torch

from mmagent_rl.algos.grpo import entropy_from_logits
from mmagent_rl.learner.batch import Batch
from mmagent_rl.chat import BANNED_LOGIT_BIAS


def load_policy(model_path: str, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """The HF model class named in the checkpoint's config (Qwen2.5-VL, Qwen3-VL, ...)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, config=cfg, dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation,
    )
    model.config.use_cache = False
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (less memory, ~30% more compute);
    non-reentrant, so it works with inputs that need no grad and under DeepSpeed."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _hidden_states(model, batch: Batch):
    """The LM's last hidden states, positions passed explicitly (``batch.position_ids``,
    computed as the engine does) so the model never falls back to 1-D positions. A
    repeated image (the samples of a group share their prompt's) goes through the vision
    tower once: its features are reused in every slot (the gradient then sums over the
    slots, as it would over copies). Models whose image features are more than one
    tensor per image (Qwen3-VL's deepstack) encode every slot, as before."""
    inner = model.model
    kwargs = dict(pixel_values=batch.pixel_values)
    vision = getattr(inner.config, "vision_config", None)
    if (batch.distinct_images is not None and hasattr(inner, "get_image_features")
            and not getattr(vision, "deepstack_visual_indexes", None)):
        pv, grid, index = batch.distinct_images
        feats = inner.get_image_features(pv, grid, return_dict=True)
        feats.pooler_output = tuple(feats.pooler_output[i] for i in index)
        kwargs = dict(pixel_values=None, mm_encoder_outputs={"image": feats})
    return inner(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        position_ids=batch.position_ids, image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids, use_cache=False, **kwargs,
    ).last_hidden_state


def token_logprobs(model, batch: Batch, *, temperature: float = 1.0,
                   banned_ids: list[int] | None = None, with_entropy: bool = False,
                   chunk: int = 1024):
    """log pi(target_t) at every trained position (``batch.loss_mask`` > 0), and
    optionally the per-token entropy there: [B, T-1] tensors, 0 elsewhere.

    Positions are passed explicitly (``batch.position_ids``, computed like the engine
    does) so the model never falls back to 1-D positions. The vocabulary projection runs
    on the trained positions only: the prompt, its image tokens and the tool
    observations are most of a sequence, never in a loss, and the LM head over them was
    most of a 100M model's learner step. It runs in chunks of ``chunk`` x B positions to
    bound the [N, V] logits memory."""
    keep = batch.loss_mask > 0
    hidden = _hidden_states(model, batch)[:, :-1][keep]
    targets = batch.targets[keep]
    step = chunk * max(1, keep.shape[0])
    lps, ents = [], []
    for s in range(0, hidden.shape[0], step):
        logits = model.lm_head(hidden[s:s + step]).float()
        if banned_ids:  # the same logit bias the engine sampled with
            logits[..., banned_ids] += BANNED_LOGIT_BIAS
        if temperature != 1.0:
            logits = logits / temperature
        lp = torch.log_softmax(logits, dim=-1)
        lps.append(lp.gather(-1, targets[s:s + step, None]).squeeze(-1))
        if with_entropy:
            ents.append(entropy_from_logits(logits))

    def spread(parts):  # back to [B, T-1], row-major like the boolean index
        flat = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
        return flat.new_zeros(keep.shape).masked_scatter(keep.to(flat.device), flat)

    return spread(lps), (spread(ents) if with_entropy else None)


def trained_position_logits(model, batch: Batch, *, banned_ids: list[int] | None = None):
    """The logits at the positions whose target is trained (``batch.loss_mask`` > 0), in
    row-major order, and those targets: [N, V], [N]. The LM head runs on these positions
    only (for SFT; it is ~30% of a tiny model's compute over the whole sequence)."""
    keep = batch.loss_mask > 0
    logits = model.lm_head(_hidden_states(model, batch)[:, :-1][keep]).float()
    if banned_ids:  # the same logit bias as the engine and token_logprobs
        logits[:, banned_ids] += BANNED_LOGIT_BIAS
    return logits, batch.targets[keep]
