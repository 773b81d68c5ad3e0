"""``grad/variance``: how much the micro-batches of a step disagree on the gradient."""
from __future__ import annotations

import torch


class GradProbe:
    """``grad/variance``: the spread of per-micro-batch policy gradients, for every
    algorithm alike (MAPO claims to reduce it).

    For micro-batch m, g_m is the gradient of its share of the step's loss w.r.t. a
    probe weight (the last language-model layer's MLP down projection), read on a fixed
    random set C of at most 4096 coordinates. With M micro-batches in the whole step
    (all ranks), M * g_m is an unbiased estimate of the step's gradient on C, and
    grad/variance = mean over c in C of the unbiased variance over m of M * g_m[c].

    g_m is read from the micro-batch's own backward by a hook on the probe weight (which
    sees that backward's gradient before it is accumulated), so probing costs no extra
    backward pass (it used to take a second, partial one: 7% of a learner step)."""

    def __init__(self, model, seed: int, max_coords: int = 4096):
        names = [n for n, _ in model.named_parameters()
                 if n.endswith("mlp.down_proj.weight") and "visual" not in n]
        self.param = dict(model.named_parameters())[names[-1]]
        g = torch.Generator().manual_seed(1234)
        n = self.param.numel()
        self.coords = torch.randperm(n, generator=g)[:min(n, max_coords)]
        self._seen: torch.Tensor | None = None
        self.param.register_hook(self._capture)

    def _capture(self, grad: torch.Tensor) -> None:
        self._seen = grad.detach().flatten()[self.coords].double()

    def take(self, scale: float = 1.0) -> list[float]:
        """g_m of the backward just run, whose loss was the share times ``scale``."""
        seen, self._seen = self._seen, None
        if seen is None:  # the loss did not reach the probe weight
            return [0.0] * len(self.coords)
        return (seen / scale).tolist()


def grad_variance(probes: list[list[float]]) -> float:
    """Mean over coordinates of the unbiased variance of M * g_m (see GradProbe)."""
    if len(probes) < 2:
        return float("nan")
    g = torch.tensor(probes, dtype=torch.float64) * len(probes)
    return float(g.var(dim=0, unbiased=True).mean())
