"""A DLG-style baseline (Zhu et al., 2019), written here: L-BFGS on the gradient distance.

Starting from a seeded random input, minimise || g(x') - g ||^2 over x' (the label is given to the
baseline, which favours it). Used only by benchmarks/bench_reconstruct.py to put the closed-form
attack's time and error next to an optimisation attack on the same model, input and gradient.
Bounded by a wall-clock budget and a number of L-BFGS iterations.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from rgap_audit.losses import loss_value


@dataclass
class DLGResult:
    input: torch.Tensor
    seconds: float
    iterations: int  # L-BFGS outer steps
    evaluations: int  # gradient-distance evaluations (each a double backward)
    grad_distance: float  # final relative gradient distance |g(x') - g| / |g|
    history: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, evaluations, mse vs truth)
    stopped: str = ""


def dlg(
    model: torch.nn.Module,
    gradients: dict[str, torch.Tensor],
    input_shape: tuple[int, ...],
    loss: str,
    label,
    *,
    budget_s: float = 60.0,
    max_iters: int = 10_000,
    seed: int = 0,
    true_input: torch.Tensor | None = None,
    mse_fn=None,
) -> DLGResult:
    """L-BFGS (strong Wolfe line search) on the squared gradient distance, in float64, until the budget runs out."""
    m = copy.deepcopy(model).to(torch.float64).eval()
    params = [(n, p) for n, p in m.named_parameters() if n in gradients]
    target = [gradients[n].to(torch.float64) for n, _ in params]
    norm2 = sum(float(t.pow(2).sum()) for t in target)
    lab = torch.as_tensor([label], dtype=torch.float64 if loss == "logistic" else torch.long)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *input_shape), generator=g, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-300, tolerance_change=1e-300)
    evals = 0
    last = [float("inf")]

    def closure():
        nonlocal evals
        opt.zero_grad()
        out = m(x)
        gs = torch.autograd.grad(loss_value(loss, out, lab), [p for _, p in params], create_graph=True)
        d = sum(((a - b) ** 2).sum() for a, b in zip(gs, target)) / norm2
        d.backward()
        evals += 1
        last[0] = float(d.detach())
        return d

    t0 = time.perf_counter()
    history: list[tuple[float, int, float]] = []
    it = 0
    stopped = "iterations"
    while it < max_iters:
        opt.step(closure)
        it += 1
        el = time.perf_counter() - t0
        if true_input is not None and mse_fn is not None:
            history.append((el, evals, float(mse_fn(true_input, x.detach()))))
        if last[0] == 0.0 or not torch.isfinite(x).all():
            stopped = "converged" if last[0] == 0.0 else "diverged"
            break
        if el >= budget_s:
            stopped = "budget"
            break
    return DLGResult(x.detach(), time.perf_counter() - t0, it, evals, last[0] ** 0.5, history, stopped)
