"""The real vLLM engine and the learner's HF forward on the same trajectories."""
from __future__ import annotations

import json

import pytest
import torch

from mmagent_rl.learner.batch import collate, mrope_positions
from mmagent_rl.learner.policy import load_policy, token_logprobs
from mmagent_rl.learner.sync import export_hf_state
from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop
from mmagent_rl.chat import collapse_image_runs
from mmagent_rl.rollout.engine import WeightPushError

VALID_CALL = ('I need a closer look.<tool_call>{"name": "image_zoom_in_tool", "arguments": '
              '{"bbox_2d": [%d, %d, %d, %d], "label": "a small square"}}</tool_call>')


@pytest.fixture(scope="module")
def policy(tiny_model_path):
    return load_policy(tiny_model_path).eval()


def _learner_logprobs(policy, chat, trajs):
    batch = collate(trajs, chat.image_processor, chat.image_token_id, chat.pad_id)
    with torch.no_grad():
        lp, _ = token_logprobs(policy, batch, banned_ids=chat.banned_ids)
    return batch, lp


def test_engine_and_learner_logprobs_agree_on_multiturn_with_crop(engine, chat, policy,
                                                                  examples):
    loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=24, max_turns=3))
    ex = examples[0]
    trajs = loop.run([ex, examples[1]], n=2, seed=3,
                     scripted_turns=[VALID_CALL % ex.target_box])
    forced = [t for t in trajs if t.example_id == ex.id]
    # the scripted call really ran: an observation with the crop, then sampled tokens
    assert all(len(t.images) == 2 and t.tool_calls[0].ok for t in forced)
    assert all(t.num_generated > 0 for t in trajs)
    batch, lp = _learner_logprobs(policy, chat, trajs)
    diff = ((lp - batch.old_logprobs).abs() * batch.loss_mask).max().item()
    assert batch.num_tokens > 40
    assert diff < 1e-4, diff


def _qwen3_rollout_logprob_gap(example) -> tuple[int, float]:
    """In a fresh process: vLLM keeps one engine's parallel state per process."""
    torch.set_num_threads(1)
    from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model
    from mmagent_rl.chat import ChatFormat
    from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine

    path = str(ensure_tiny_model(TinySpec(family="qwen3_vl")))
    eng = VLLMEngine(path, EngineConfig(max_model_len=2048))
    chat3 = ChatFormat.from_pretrained(path)
    loop = AgentLoop(eng, chat3, AgentConfig(max_new_tokens=16, max_turns=3))
    trajs = loop.run([example], n=2, seed=1,
                     scripted_turns=[VALID_CALL % example.target_box])
    batch, lp = _learner_logprobs(load_policy(path).eval(), chat3, trajs)
    gap = ((lp - batch.old_logprobs).abs() * batch.loss_mask).max().item()
    return min(len(t.images) for t in trajs), gap


def test_tiny_qwen3_vl_variant_runs_on_vllm_and_agrees_with_learner(examples):
    """The same rollout/learner code on the Qwen3-VL architecture (patch 16,
    interleaved mRoPE, deepstack): a real engine, a multi-turn rollout with a crop."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        n_images, gap = pool.submit(_qwen3_rollout_logprob_gap, examples[6]).result(timeout=600)
    assert n_images == 2
    assert gap < 1e-4, gap


def test_mrope_positions_match_hf_rope_index(policy, chat, examples):
    from PIL import Image

    crop = Image.new("RGB", (112, 84), (255, 0, 0))
    ids = chat.prompt_ids(examples[0].image, "q") + chat.encode("look") \
        + chat.observation_ids(crop, None) + chat.encode("ok")
    grids = [chat.image_grid(examples[0].image), chat.image_grid(crop)]
    ours = mrope_positions(ids, grids, chat.image_token_id, chat.merge_size)
    t = torch.tensor([ids])
    hf, _ = policy.model.get_rope_index(
        t, mm_token_type_ids=(t == chat.image_token_id).int(),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.ones_like(t))
    assert torch.equal(ours, hf[:, 0])
    with pytest.raises(ValueError):
        mrope_positions(ids, grids[:1], chat.image_token_id, chat.merge_size)


def test_collapse_image_runs_keeps_one_pad_per_image(chat, examples):
    ids = chat.prompt_ids(examples[0].image, "q")
    short = collapse_image_runs(ids, chat.image_token_id)
    assert short.count(chat.image_token_id) == 1
    assert len(ids) - len(short) == chat.num_image_tokens(examples[0].image) - 1


@pytest.mark.parametrize("bad_call, expect", [
    ("<tool_call>{not json}</tool_call>", "Error"),
    ('<tool_call>{"name": "rotate", "arguments": {"bbox_2d": [0, 0, 9, 9]}}</tool_call>',
     "Error"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
     '[2000, 2000, 3000, 3000]}}</tool_call>', "outside"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
     '[500, 500, 100, 100]}}</tool_call>', "Error"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
     '[100, 100, 100, 300]}}</tool_call>', "Error"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
     '["a", 1, 2, 3]}}</tool_call>', "Error"),
])
def test_bad_tool_calls_become_error_observations_and_the_loop_goes_on(
        engine, chat, examples, bad_call, expect):
    loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=8, max_turns=3))
    (t,) = loop.run([examples[2]], n=1, seed=0, scripted_turns=["hmm" + bad_call])
    call = t.tool_calls[0]
    assert not call.ok and expect in call.error
    assert len(t.images) == 1  # no crop was added
    obs_text = chat.decode(t.token_ids[t.prompt_len:])
    assert call.error in obs_text  # the model sees the error
    assert t.turns >= 2 and t.num_generated > 0  # and generation continued


def test_trajectories_are_capped_by_max_turns_and_tokens(engine, chat, examples):
    ex = examples[3]
    call = VALID_CALL % ex.target_box
    loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=8, max_turns=2))
    (t,) = loop.run([ex], n=1, seed=0, scripted_turns=[call, call])
    assert t.finish_reason == "max_turns" and t.turns == 2 and t.num_generated == 0
    loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=64, max_total_tokens=260))
    (t,) = loop.run([ex], n=1, seed=0)
    assert len(t.token_ids) <= 260 and t.finish_reason in ("max_tokens", "eos")


def _greedy(engine, chat, ex):
    ids = collapse_image_runs(chat.prompt_ids(ex.image, ex.question), chat.image_token_id)
    (g,) = engine.generate([(ids, [ex.image])], max_tokens=[12], temperature=0.0)
    return g.token_ids


def test_weight_sync_changes_what_the_engine_serves_and_restores(engine, chat, policy,
                                                                 examples):
    ex = examples[4]
    before = _greedy(engine, chat, ex)
    original = export_hf_state(policy)
    changed = [(k, v + 0.05 * torch.randn_like(v) if v.ndim == 2 else v)
               for k, v in original]
    assert engine.mm_cache_items() > 0  # the image went through the processor cache
    engine.load_weights(changed)
    assert engine.mm_cache_items() == 0  # emptied on every push: it cannot grow all run
    after = _greedy(engine, chat, ex)
    assert after != before
    engine.load_weights(original)
    assert _greedy(engine, chat, ex) == before


def test_pushed_weights_serve_the_learners_logprobs_tied_head_included(
        engine, chat, policy, examples, tiny_model_path):
    """Every weight moved, the tied embedding too: vLLM's reload reports the tied LM
    head as "Failed to load weights" and keeps its tensor, which must then be the
    new embedding (else the engine samples from a stale head: off-policy)."""
    original = export_hf_state(policy)
    moved = load_policy(tiny_model_path).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():  # tied: the embedding moves the head with it
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    changed = export_hf_state(moved)
    assert policy.config.tie_word_embeddings and any("embed_tokens" in k for k, _ in changed)
    try:
        engine.load_weights(changed)
        loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=24, max_turns=2))
        trajs = loop.run(examples[:2], n=2, seed=5)
        batch, lp = _learner_logprobs(moved, chat, trajs)
        diff = ((lp - batch.old_logprobs).abs() * batch.loss_mask).max().item()
        assert diff < 1e-4, diff
        _, lp_old = _learner_logprobs(policy, chat, trajs)  # and the old weights do not
        assert ((lp_old - batch.old_logprobs).abs() * batch.loss_mask).max().item() > 1e-2
    finally:
        engine.load_weights(original)


def test_bad_weight_push_is_refused_before_touching_the_engine(engine, chat, policy,
                                                               examples):
    ex = examples[5]
    before = _greedy(engine, chat, ex)
    named = export_hf_state(policy)
    wrong_shape = [(k, v[:-1] if i == 0 else v) for i, (k, v) in enumerate(named)]
    with pytest.raises(WeightPushError, match="shape"):
        engine.load_weights(wrong_shape)
    with pytest.raises(WeightPushError, match="unknown"):
        engine.load_weights(named + [("model.not_a_param", torch.zeros(1))])
    nan = [(k, torch.full_like(v, float("nan")) if i == 1 else v)
           for i, (k, v) in enumerate(named)]
    with pytest.raises(WeightPushError, match="non-finite"):
        engine.load_weights(nan)
    # An incomplete full push: every tensor it holds is fine, one parameter is left out
    # (it would silently keep its old value).
    with pytest.raises(WeightPushError, match="1 parameters missing from a full push"):
        engine.load_weights(named[:3] + named[4:])
    with pytest.raises(WeightPushError, match="pushed twice"):
        engine.load_weights(named + named[:1])
    # Bucketed: each bucket is a legitimate subset, but together they must cover every
    # parameter; refused before the first bucket is loaded.
    from mmagent_rl.wire import make_buckets, to_wire

    buckets = [to_wire(b) for b in make_buckets(named[:-1], 0.05)]
    assert len(buckets) > 3
    with pytest.raises(WeightPushError, match="missing from a full push: " + named[-1][0]):
        engine.load_weights_bucketed(lambda i: buckets[i], len(buckets))
    assert _greedy(engine, chat, ex) == before  # the engine still serves, unchanged


def test_tiny_model_is_reproducible_and_loads_everywhere(tmp_path, tiny_model_path):
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from mmagent_rl.models.tiny import TinySpec, build_tiny_model

    a = build_tiny_model(tmp_path / "a", TinySpec(seed=0))
    b = build_tiny_model(tmp_path / "b", TinySpec(seed=0))
    c = build_tiny_model(tmp_path / "c", TinySpec(seed=1))
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    proc = AutoProcessor.from_pretrained(a)
    for tok in ("<tool_call>", "</tool_call>", "<|image_pad|>", "<|im_end|>"):
        assert len(proc.tokenizer.encode(tok, add_special_tokens=False)) == 1
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 256 and cfg["vision_config"]["depth"] == 2


def test_continue_from_keeps_the_prefix_and_forces_a_tool_call(engine, chat, policy,
                                                              examples):
    """AXPO's resampling: K continuations after an opening <tool_call>."""
    from mmagent_rl.trajectory import Trajectory

    ex = examples[7]
    partial = "I need to look closer.<tool_call>"
    ids = chat.prompt_ids(ex.image, ex.question) + chat.encode(partial)
    prefix = Trajectory(prompt_id=ex.id, sample_idx=3, token_ids=ids,
                        loss_mask=[0] * len(ids), logprobs=[0.0] * len(ids),
                        images=[ex.image], prompt_len=len(ids), response_text=partial,
                        turns=0, partial_text=partial)
    loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=20, max_turns=3))
    conts = loop.continue_from([prefix], [ex], k=3, seed=5)
    assert len(conts) == 3 and {c.prompt_id for c in conts} == {f"{ex.id}/cont3"}
    for c in conts:
        assert c.token_ids[:len(ids)] == ids  # the prefix is kept token for token
        assert sum(c.loss_mask[:len(ids)]) == 0 and c.num_generated > 0
        assert c.tool_calls and c.tool_calls[0].turn == 0  # the first turn is a call
        assert c.response_text.startswith(partial)
    assert len({tuple(c.token_ids) for c in conts}) > 1  # K different samples
    batch, lp = _learner_logprobs(policy, chat, conts)
    assert ((lp - batch.old_logprobs).abs() * batch.loss_mask).max().item() < 1e-4


def test_many_concurrent_multimodal_rollouts_do_not_crash_the_engine(engine, chat, examples):
    """40 rollouts at once: prefills get chunked; unseeded requests stay safe on CPU."""
    loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=8, max_turns=2))
    trajs = loop.run(examples, n=5, seed=0)
    assert len(trajs) == 40 and all(t.num_generated > 0 for t in trajs)


def test_a_repeated_image_is_encoded_once_with_the_same_logprobs_and_gradient(
        engine, chat, policy, examples):
    """The samples of a group share their prompt's image: the vision tower sees it once
    (learner/policy._hidden_states); log-probs and gradients equal encoding every copy."""
    import dataclasses

    loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=12, max_turns=2))
    trajs = loop.run(examples[:2], n=3, seed=9)
    batch = collate(trajs, chat.image_processor, chat.image_token_id, chat.pad_id)
    assert batch.distinct_images is not None and len(batch.distinct_images[2]) >= 6
    every = dataclasses.replace(batch, distinct_images=None)
    patches = []
    hook = policy.model.visual.register_forward_hook(
        lambda m, args, out: patches.append(args[0].shape[0]))
    try:
        grads = []
        for b in (batch, every):
            policy.zero_grad(set_to_none=True)
            lp, _ = token_logprobs(policy, b, banned_ids=chat.banned_ids)
            (lp * b.loss_mask).sum().backward()
            grads.append({n: p.grad.clone() for n, p in policy.named_parameters()
                          if p.grad is not None and "visual" in n})
            grads[-1]["lp"] = lp.detach()
    finally:
        hook.remove()
        policy.zero_grad(set_to_none=True)
    assert patches[0] == batch.distinct_images[0].shape[0] < patches[1] == \
        batch.pixel_values.shape[0]
    assert (grads[0]["lp"] - grads[1]["lp"]).abs().max() < 1e-5
    for n, g in grads[1].items():
        if n != "lp":
            assert torch.allclose(grads[0][n], g, atol=1e-5, rtol=1e-4), n
