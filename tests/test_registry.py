"""The algorithm registry (mmagent_rl/algos/registry.py): one plug-in point, no
algorithm names tested outside algos/."""
from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

import pytest
import torch

from mmagent_rl import algos
from mmagent_rl.algos.grpo import GRPO, dynamic_sampling_keep, group_advantages
from mmagent_rl.algos.registry import _REGISTRY
from mmagent_rl.config import AlgoConfig

PKG = pathlib.Path(algos.__file__).parent.parent


def test_unknown_name_lists_every_registered_algorithm():
    with pytest.raises(ValueError) as e:
        algos.get("ppo")
    for name in ("grpo", "mapo", "papo", "axpo", "gspo"):
        assert name in str(e.value)
    assert algos.names()[:4] == ["grpo", "mapo", "papo", "axpo"]


def test_no_code_outside_algos_tests_an_algorithm_name():
    """Trainer, learner, reward and rollout code reach algorithms only through hooks."""
    names = "|".join(algos.names())
    pattern = re.compile(rf"""algo(?:rithm)?(?:_name|\.name)\s*[!=]=|["']({names})["']""")
    offenders = []
    for path in [PKG / "trainer.py", PKG / "config.py", *sorted((PKG / "learner").glob("*.py")),
                 *sorted((PKG / "reward").glob("*.py")), *sorted((PKG / "rollout").glob("*.py"))]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PKG)}:{i}: {line.strip()}")
    assert offenders == []


def test_a_new_algorithm_gets_its_config_section_from_the_registry():
    @dataclass
    class ToyConfig:
        scale: float = 2.0

    @algos.register
    class Toy(GRPO):
        name = "toy_for_test"
        config = ToyConfig

        def advantages(self, trajs):
            adv, m = super().advantages(trajs)
            return adv * self.cfg.toy_for_test.scale, m

    try:
        cls = algos.config_class()
        cfg = cls(name="toy_for_test")
        assert cfg.toy_for_test == ToyConfig() and cfg.grpo.kl_beta == 0.001
        assert isinstance(algos.build(cfg), Toy)
        with pytest.raises(ValueError, match="registered twice"):
            algos.register(type("Other", (GRPO,), {"name": "toy_for_test"}))
    finally:
        _REGISTRY.pop("toy_for_test")


def test_group_ids_as_a_tensor_group_like_a_list():
    """A tensor of ids used to make every rollout its own group (all advantages 0)."""
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ids = [0, 0, 1, 1]
    want = group_advantages(r, ids)
    assert want.abs().sum() > 0
    assert torch.equal(group_advantages(r, torch.tensor(ids)), want)
    assert dynamic_sampling_keep(r, torch.tensor(ids)).tolist() == [True, True, False, False]


def test_papo_alarm_state_survives_a_checkpoint_round_trip():
    a = algos.build(AlgoConfig(name="papo"))
    for kl in (0.1, 0.1, 0.1):
        a.after_learn({"papo/kl_prcp": kl, "papo/entropy_ori": 1.0, "papo/entropy_aug": 1.0}, 1)
    b = algos.build(AlgoConfig(name="papo"))
    b.load_state_dict(a.state_dict())
    jump = {"papo/kl_prcp": 1.0, "papo/entropy_ori": 2.0, "papo/entropy_aug": 2.0}
    assert b.after_learn(jump, 4) == {"papo/hacking_alarm": 1.0}
    fresh = algos.build(AlgoConfig(name="papo"))
    assert fresh.after_learn(jump, 4) == {"papo/hacking_alarm": 0.0}  # no history yet


def test_hooks_default_to_grpo_and_mapo_asks_for_a_description():
    g = algos.build(AlgoConfig(name="grpo"))
    assert g.alignment() is None and g.system_prompt(None, "D") is None
    m = algos.build(AlgoConfig(name="mapo"))
    assert m.alignment() is m.cfg.mapo
    assert m.system_prompt(None, "D").startswith("D ") and "<description>" in \
        m.system_prompt(None, "D")
    assert m.system_prompt("mine", "D") == "mine"


def test_algo_config_pickles_by_name():
    """The class is made by the registry: bound to mmagent_rl.config so that pickle
    (torch.save, multiprocessing) finds it, not only Ray's by-value cloudpickle."""
    import pickle

    cfg = AlgoConfig(name="papo")
    cfg.papo.gamma = 0.04
    back = pickle.loads(pickle.dumps(cfg))
    assert type(back) is AlgoConfig and back == cfg


WINGS = ("rollout", "reward", "learner", "data")
# below the wings: what any of them may import (docs/design.md, "Imports across the wings")
SHARED = ("trajectory", "example", "chat", "wire", "transfer", "tools", "config", "algos",
          "checkpoint")


def _imports_of(path: pathlib.Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "mmagent_rl"):
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out.update(m.split(".")[1] for m in mods if m.count(".") >= 1)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names
                       if a.name.startswith("mmagent_rl."))
    return out


def test_no_wing_imports_a_sibling_wing_or_anything_above_it():
    pkg = pathlib.Path(algos.__file__).parents[1]
    bad = []
    for wing in WINGS:
        for f in sorted((pkg / wing).glob("*.py")):
            for mod in _imports_of(f) - {wing}:
                if mod not in SHARED:
                    bad.append(f"{wing}/{f.name} imports mmagent_rl.{mod}")
    assert not bad, bad
