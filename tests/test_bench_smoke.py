"""Bucketed weight sync (sync.bucket_mb) and the sync wire format, on the real engine."""
from __future__ import annotations

import pytest
import torch

from mmagent_rl.learner.policy import load_policy
from mmagent_rl.learner.sync import export_buckets, export_hf_state
from mmagent_rl.wire import from_wire, load_buckets, make_buckets, to_wire
from mmagent_rl.rollout.engine import WeightPushError, validate_push


def _engine_params(engine) -> dict[str, torch.Tensor]:
    """The in-process engine's own parameters (after vLLM's fusing/processing)."""
    return engine.llm.collective_rpc(
        lambda w: {n: p.detach().clone() for n, p in w.model_runner.model.named_parameters()}
    )[0]


def _perturbed(named, seed):
    g = torch.Generator().manual_seed(seed)
    return [(k, v + 0.05 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v.clone())
            for k, v in named]


def test_wire_format_round_trip_is_exact_and_zero_copy():
    named = [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)),
             ("c", torch.randn(2, 2).half())]
    wire = to_wire(named)
    back = from_wire(wire)
    for (n0, t0), (n1, t1) in zip(named, back):
        assert n0 == n1 and t1.dtype == t0.dtype and torch.equal(t0, t1)
    assert wire[0][1].__array_interface__["data"][0] == named[0][1].data_ptr()
    assert from_wire(named)[0][1] is named[0][1]  # plain pairs pass through


def test_buckets_keep_order_whole_tensors_and_size_limit():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 300_000, 5, 70_000, 1])]
    buckets = make_buckets(named, bucket_mb=0.5)  # 131072 floats
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    assert [[n for n, _ in b] for b in buckets] == [["t0"], ["t1"], ["t2", "t3", "t4"]]


def test_finite_check_is_exact_when_the_sum_overflows():
    big = torch.full((4,), 3e38)  # finite values whose float32 sum is inf
    validate_push([("w", big)], {"w": (4,)})
    with pytest.raises(WeightPushError, match="non-finite"):
        validate_push([("w", torch.tensor([1.0, float("inf"), -float("inf")]))], {"w": (3,)})


def test_bucketed_sync_loads_the_same_engine_weights_as_one_object(engine, tiny_model_path):
    import ray

    policy = load_policy(tiny_model_path).eval()
    original = export_hf_state(policy)
    before = _engine_params(engine)
    changed = _perturbed(original, seed=1)
    try:
        engine.load_weights(to_wire(changed))  # the one-object path
        whole = _engine_params(engine)
        assert any(not torch.equal(whole[k], before[k]) for k in before)

        engine.load_weights(original)
        assert all(torch.equal(v, before[k]) for k, v in _engine_params(engine).items())

        # The bucketed path, through the functions the actors run, with buckets small
        # enough (0.05 MB) that fused layers (qkv, gate/up) are split across buckets.
        ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
        # load the perturbed weights into the policy itself, so export_buckets sends them
        policy_changed = dict(changed)
        with torch.no_grad():
            for name, v in export_hf_state(policy, clone=False):
                v.copy_(policy_changed[name])
        refs = export_buckets(policy, 0.05, gather_zero3=False, rank=0)
        assert len(refs) > 3
        assert export_buckets(policy, 0.05, gather_zero3=False, rank=1) == []
        load_buckets(engine, refs)
        bucketed = _engine_params(engine)
        for k, v in whole.items():
            assert torch.equal(bucketed[k], v), k

        # A bad bucket (the last one) is refused before anything is loaded.
        nan = [(k, torch.full_like(v, float("nan")) if i == len(changed) - 1 else v)
               for i, (k, v) in enumerate(original)]
        buckets = [to_wire(b) for b in make_buckets(nan, 0.05)]
        with pytest.raises(WeightPushError, match="non-finite"):
            engine.load_weights_bucketed(lambda i: buckets[i], len(buckets))
        assert all(torch.equal(v, bucketed[k]) for k, v in _engine_params(engine).items())
    finally:
        engine.load_weights(original)  # the session engine serves the tiny model again
        if ray.is_initialized():
            ray.shutdown()


def test_collate_processes_each_shared_image_once_with_identical_tensors(chat, examples):
    from mmagent_rl.learner.batch import preprocess_images

    a, b = examples[0].image, examples[1].image
    crop = b.crop((0, 0, 300, 200))
    images = [a, a, b, a, crop, b]  # shared objects, as a group's rollouts hold them
    calls = []

    class Counting:
        merge_size = chat.image_processor.merge_size

        def __call__(self, images, **kw):
            calls.append(len(images))
            return chat.image_processor(images=images, **kw)

    pv, grid = preprocess_images(images, Counting())
    ref = chat.image_processor(images=images, return_tensors="pt")
    assert calls == [3]
    assert torch.equal(pv, ref["pixel_values"]) and torch.equal(grid, ref["image_grid_thw"])
