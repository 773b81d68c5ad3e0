"""model.path as a local folder or as a hub name resolved through the HF cache (no hub
here: the cache is laid out by hand, as `hf download` leaves it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmagent_rl.config import Config
from mmagent_rl.sources import resolve_model_path
from mmagent_rl.wire import checkpoint_shapes

_RESOLVE = ("import json, sys; from mmagent_rl.config import Config; "
            "from mmagent_rl.sources import resolve_model_path; "
            "from mmagent_rl.wire import checkpoint_shapes; c = Config(); "
            "c.model.path = sys.argv[1]; p = resolve_model_path(c); "
            "print(json.dumps([p, len(checkpoint_shapes(p))]))")


def _resolve_offline(name: str, hub_cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _RESOLVE, name], env=env,
                          capture_output=True, text=True, timeout=120)


def _cache_model(hub_cache, repo_id: str, source: str) -> str:
    """The HF cache layout: models--org--name/{refs/main, snapshots/<rev>/<symlinks>}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), snap / name)
    return str(snap)


def test_a_hub_name_in_the_cache_resolves_to_its_snapshot_with_its_shapes(tmp_path):
    from mmagent_rl.models.embedded import embedded_path

    src = embedded_path()
    snap = _cache_model(tmp_path / "hub", "tiny-org/agent", src)
    out = _resolve_offline("tiny-org/agent", tmp_path / "hub")
    assert out.returncode == 0, out.stderr[-2000:]
    path, n_shapes = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.realpath(path) == os.path.realpath(snap)
    assert n_shapes == len(checkpoint_shapes(src)) > 0  # the weight push has its shapes

    missing = _resolve_offline("tiny-org/absent", tmp_path / "hub")
    assert missing.returncode != 0
    assert "not in the Hugging Face cache" in missing.stderr
    assert "model.path=tiny-org/absent" in missing.stderr


def test_a_local_folder_resolves_to_itself_and_bad_paths_fail_at_start(tmp_path):
    from mmagent_rl.models.embedded import embedded_path

    cfg = Config()
    cfg.model.path = embedded_path()
    assert resolve_model_path(cfg) == embedded_path()
    cfg.model.path = str(tmp_path)  # a folder without weights
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model_path(cfg)
    cfg.model.path = str(tmp_path / "nope")  # neither a folder nor org/name
    with pytest.raises(ValueError, match="no such folder"):
        resolve_model_path(cfg)
