"""grad/variance's probe reads each micro-batch's gradient from its own backward."""
from __future__ import annotations

import torch

from mmagent_rl.learner.grad_probe import GradProbe, grad_variance


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.down_proj = torch.nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.mlp.down_proj(torch.tanh(x)).pow(2).sum()


def test_the_hook_sees_each_backwards_own_gradient_not_the_accumulated_one():
    torch.manual_seed(0)
    model = Tiny()
    probe = GradProbe(model, seed=0)
    xs = [torch.randn(5, 8) for _ in range(3)]
    want = []
    for x in xs:  # the gradient of each micro-batch alone
        (g,) = torch.autograd.grad(model(x), model.mlp.down_proj.weight)
        want.append(g.flatten()[probe.coords].double().tolist())
        probe.take()  # autograd.grad fired the hook too: drop that reading
    got = []
    for x in xs:  # accumulated in .grad, as the learner does; a loss scaled by 2
        (2 * model(x)).backward()
        got.append(probe.take(2.0))
    assert got == want
    assert probe.take() == [0.0] * len(probe.coords)  # nothing seen since
    assert grad_variance(got) > 0
