"""launch/*.sh for real: a 2-node Ray cluster on this one machine (1 CPU per node), a
2-step GRPO run submitted as a Ray job, its actors spread over both nodes.

Teardown stops only this cluster: each `ray start --block` runs in its own process
group and is sent SIGTERM (it then stops the processes it started); whatever of its
process tree is still alive afterwards is killed by pid. `ray stop` is not used: it
kills every Ray process on the machine, other users' clusters included.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from conftest import REPO

LAUNCH = Path(REPO) / "launch"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TRAINER_ACTORS = {"RolloutWorker", "Learner", "RewardScorer"}


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _free_range(n: int, avoid: set[int]) -> tuple[int, int]:
    """n consecutive free ports (Ray's worker processes take them from a range)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        ports = range(base, base + n)
        if avoid.intersection(ports):
            continue
        try:
            with ExitStack() as stack:
                for p in ports:
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", p))
            return base, base + n - 1
        except OSError:
            continue
    raise RuntimeError("no free port range")


def _node_ports(avoid: set[int]) -> tuple[list[str], set[int]]:
    """Every port a Ray node opens, so that two nodes (and other users' Ray) coexist."""
    nm, om, agent, agent_grpc, metrics, env_agent = _free_ports(6)
    lo, hi = _free_range(40, avoid | {nm, om, agent, agent_grpc, metrics, env_agent})
    args = ["--node-manager-port", nm, "--object-manager-port", om,
            "--dashboard-agent-listen-port", agent, "--dashboard-agent-grpc-port", agent_grpc,
            "--metrics-export-port", metrics, "--runtime-env-agent-port", env_agent,
            "--min-worker-port", lo, "--max-worker-port", hi]
    return [str(a) for a in args], {nm, om, agent, agent_grpc, metrics, env_agent,
                                    *range(lo, hi + 1)}


def _wait(cond, timeout: float, what: str, procs=(), logs=()):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if cond():
                return
        except Exception:  # not up yet
            pass
        time.sleep(3)
    tails = "".join(f"\n--- {f}:\n" + Path(f).read_text()[-3000:] for f in logs)
    raise RuntimeError(f"{what}: not ready after {time.monotonic() - t0:.0f} s" + tails)


def _stop(procs: list[subprocess.Popen], graceful: bool = True) -> None:
    """SIGTERM, as a node shutdown (Ray stops its processes: ~30 s); not graceful (the
    fixture's teardown, where nobody watches): SIGKILL to every process at once."""
    tree = []
    for p in procs:
        try:
            tree += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:  # `ray start --block` stops its processes on SIGTERM
            os.killpg(p.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not graceful:
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=10)
    for proc in alive:  # psutil checks the pid still names the same process
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def cluster():
    """The running cluster; started a second time (fresh ports and folders) if the first
    start fails: on a loaded 2-core machine Ray's head can time out during start-up."""
    for attempt in (1, 2):
        # Short paths (Unix sockets: 107 bytes). One temp dir per node, as on real
        # machines: nodes sharing one would unpack the job's working_dir into the same
        # folder, each in turn, under the feet of the driver importing from it.
        tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        procs: list[subprocess.Popen] = []
        try:
            try:
                c = _start_cluster(tmp, procs)
            except RuntimeError as e:
                if attempt == 2:
                    raise
                print(f"cluster start failed, trying again: {str(e)[:300]}")
                continue
            yield c
            return
        finally:
            _stop(procs, graceful=False)
            shutil.rmtree(tmp, ignore_errors=True)


def _start_cluster(tmp: str, procs: list[subprocess.Popen]) -> dict:
    """Head and worker node (``procs`` receives their `ray start --block` processes)."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        # Inherited by the job driver; the driver forwards it to the actors.
        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
        OMP_NUM_THREADS="1", WANDB_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
        # Ray's token auth, with this cluster's own token (every node, CLI and driver).
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
        RAY_NODE_IP="127.0.0.1", RAY_NUM_CPUS="1", RAY_NUM_GPUS="0")
    gcs, dash, client = _free_ports(3)
    head_args, used = _node_ports({gcs, dash, client})
    worker_args, _ = _node_ports(used | {gcs, dash, client})
    common = ["--object-store-memory", str(300 * 2**20), "--disable-usage-stats", "--block"]
    c = {"url": f"http://127.0.0.1:{dash}", "env": env, "tmp": tmp, "token": token}
    logs = [os.path.join(tmp, "head.log"), os.path.join(tmp, "worker.log")]
    with open(logs[0], "w") as log:
        procs.append(subprocess.Popen(
            [str(LAUNCH / "start_head.sh"), "--ray-client-server-port", str(client),
             *head_args, *common],
            env=dict(env, RAY_PORT=str(gcs), RAY_DASHBOARD_PORT=str(dash),
                     RAY_DASHBOARD_HOST="127.0.0.1", RAY_TEMP_DIR=os.path.join(tmp, "h")),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp))
    _wait(lambda: "version" in _api(c, "/api/version"), 240, "head", procs, logs[:1])
    with open(logs[1], "w") as log:
        procs.append(subprocess.Popen(
            [str(LAUNCH / "start_worker.sh"), f"127.0.0.1:{gcs}",
             "--resources", json.dumps({"node2": 1}), *worker_args, *common],
            env=dict(env, RAY_TEMP_DIR=os.path.join(tmp, "w")), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp))
    _wait(lambda: len(_alive_nodes(c)) == 2, 240, "second node", procs, logs)
    c["procs"], c["logs"] = procs, logs  # [head, node2]: tests may stop node2
    return c


def _api(c, path: str, method: str = "GET") -> dict:
    """Ray's Jobs REST API on the dashboard (documented, stable), with the token."""
    req = urllib.request.Request(c["url"] + path, method=method,
                                 headers={"Authorization": f"Bearer {c['token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _ray_list(c, *args: str) -> list[dict]:
    """`ray list ... --format json` (the state CLI)."""
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "list", *args,
                        "--address", c["url"], "--detail", "--format", "json",
                        "--limit", "1000"],
                       env=c["env"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    if p.stdout.startswith("No resource"):  # the CLI prints this, not [], when empty
        return []
    return json.loads(p.stdout)


def _alive_nodes(c) -> dict[str, str]:
    """node id -> "node2" or "head", for alive nodes."""
    return {n["node_id"]: ("node2" if "node2" in (n.get("resources_total") or {}) else "head")
            for n in _ray_list(c, "nodes") if n["state"] == "ALIVE"}


def _submit(c, sid: str, overrides: list[str]) -> None:
    p = subprocess.run([str(LAUNCH / "submit.sh"), *overrides],
                       env=dict(c["env"], RAY_ADDRESS=c["url"], NO_WAIT="1",
                                SUBMISSION_ID=sid),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _wait_job(c, sid: str, timeout: float):
    t0 = time.monotonic()
    while (info := _api(c, f"/api/jobs/{sid}"))["status"] not in TERMINAL:
        if time.monotonic() - t0 > timeout:
            _api(c, f"/api/jobs/{sid}/stop", "POST")
            pytest.fail(f"job {sid} not done after {timeout:.0f} s:\n"
                        + _api(c, f"/api/jobs/{sid}/logs")["logs"][-4000:])
        time.sleep(5)
    return info, _api(c, f"/api/jobs/{sid}/logs")["logs"]


def _run_job(c, sid: str, overrides: list[str], timeout: float):
    _submit(c, sid, overrides)
    return _wait_job(c, sid, timeout)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_step_run_as_a_job_on_two_nodes(cluster, tmp_path):
    run = tmp_path / "run"
    sid = f"mmagent-{uuid.uuid4().hex[:8]}"
    info, logs = _run_job(cluster, sid, [
        "+algo=grpo", "trainer.total_steps=2", "trainer.ray_address=auto",
        f"hydra.run.dir={run}", "rollout.agent.max_new_tokens=16",
        "trainer.prompts_per_step=2", "learner.num_workers=2",
        "reward.fn=reward_plugins:shortness_reward", "trainer.progress=false",
        # 0.5 + 2 x 0.5 + 0.25 = 1.75 CPUs: more than one node holds (1 CPU each).
        "rollout.num_cpus=0.5", "learner.num_cpus=0.5", "reward.num_cpus=0.25"],
        timeout=1800)
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

    nodes = _alive_nodes(cluster)
    actors = [a for a in _ray_list(cluster, "actors", "--filter", f"job_id={info['job_id']}")
              if a["class_name"] in TRAINER_ACTORS]
    placement = sorted((a["class_name"], nodes.get(a["node_id"], a["node_id"]))
                       for a in actors)
    assert sorted(name for name, _ in placement) == [
        "Learner", "Learner", "RewardScorer", "RolloutWorker"], placement
    assert {node for _, node in placement} == {"head", "node2"}, placement
    print("placement:", placement)
    assert nodes.get(info["driver_node_id"]) == "head"  # job drivers run on the head node


@pytest.mark.slow
def test_job_runtime_env_vars_do_not_break_start_ray(cluster):
    """start_ray alone (no actors, seconds), as a job whose runtime env sets WANDB_MODE."""
    code = ("import ray; from mmagent_rl.config import Config; "
            "from mmagent_rl.cluster import start_ray; c = Config(); "
            "c.trainer.ray_address = 'auto'; start_ray(c); "
            "assert len([n for n in ray.nodes() if n['Alive']]) == 2")
    p = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit",
         "--address", cluster["url"], "--working-dir", REPO,
         "--runtime-env-json", json.dumps({"env_vars": {"WANDB_MODE": "disabled"}}),
         "--", "python", "-c", code],
        env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def test_scripts_parse_and_build_the_ray_commands():
    """Fast: bash syntax of every script and the slurm template, and the `ray` command
    lines the scripts build (RAY=echo prints them instead of running Ray)."""
    for f in ("start_head.sh", "start_worker.sh", "submit.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(LAUNCH / f)], check=True, timeout=30)
    for f in ("start_head.sh", "start_worker.sh", "submit.sh"):
        assert os.access(LAUNCH / f, os.X_OK), f

    def run(script, *args, **env):
        env = dict({k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                   RAY="echo", **env)
        p = subprocess.run([str(LAUNCH / script), *args], env=env, capture_output=True,
                           text=True, timeout=30)
        return p.returncode, p.stdout.split(), p.stderr

    rc, out, _ = run("start_head.sh", "--block", RAY_PORT="7000", RAY_NUM_GPUS="8")
    assert rc == 0 and out[:2] == ["start", "--head"] and out[-1] == "--block"
    assert out[out.index("--port") + 1] == "7000" and out[out.index("--num-gpus") + 1] == "8"
    rc, out, _ = run("start_worker.sh", "10.0.0.1:7000", "--num-gpus", "8")
    assert rc == 0 and out[:3] == ["start", "--address", "10.0.0.1:7000"]
    rc, _, err = run("start_worker.sh")
    assert rc != 0 and "HEAD_IP:PORT" in err  # no address: usage, not a local head
    rc, out, _ = run("submit.sh", "+algo=grpo", "hydra.run.dir=/shared/r1",
                     RAY_ADDRESS="http://10.0.0.1:8265", NO_WAIT="1")
    assert rc == 0
    assert out[:4] == ["job", "submit", "--address", "http://10.0.0.1:8265"]
    assert "--no-wait" in out and out[out.index("--working-dir") + 1] == "."
    assert out[out.index("--"):] == ["--", "python", "-m", "mmagent_rl.launch", "+algo=grpo",
                                     "hydra.run.dir=/shared/r1"]
    rc, out, _ = run("submit.sh", "+algo=grpo")  # an absolute run dir, not Ray's session dir
    assert rc == 0 and out[-1].startswith(f"hydra.run.dir={REPO}/outputs/")
