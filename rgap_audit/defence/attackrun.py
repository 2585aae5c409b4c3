"""One run of the closed-form attack on a modified gradient, measured against the true input.

The attacker is given its best case: of the plain and projected variants and of every input the gradient
admits equally well, the one closest to the truth counts (a defence has to stop all of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rgap_audit.attack.engine import Reconstruction, attack_graph
from rgap_audit.errors import AttackUnsupported, AuditError
from rgap_audit.instance import Instance
from rgap_audit.verify.metrics import best_of


@dataclass
class Outcome:
    """The measured result of one attack run."""

    rel_error: float | None  # None: nothing came back (the chain is cut, the attack raised)
    psnr_db: float | None  # peak 1 after mapping the original's [min, max] to [0, 1] (as --verify); None when exact
    reconstruction: Reconstruction | None
    best: torch.Tensor | None  # the reconstruction measured


def psnr(x: torch.Tensor, x_rec: torch.Tensor) -> float | None:
    """PSNR in dB, peak 1, both mapped by the original's [min, max] -> [0, 1] (verify.metrics' convention)."""
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    mse = float((((x_rec.reshape(x.shape) - x) / span) ** 2).mean())
    return None if mse == 0 else 10.0 * math.log10(1.0 / mse)


def attack(client: Instance, grads: dict[str, torch.Tensor]) -> Outcome:
    """R-GAP on `grads` (same graph, constants and loss as the client); errors against the client's input."""
    x = client.x.to(torch.float64)
    try:
        rec = attack_graph(client.graph, client.env, grads, client.input_shape, client.loss, true_input=x)
    except (AttackUnsupported, AuditError, ValueError, RuntimeError, ArithmeticError):
        return Outcome(None, None, None, None)
    best: torch.Tensor | None = None
    err: float | None = None
    for r in [rec] + ([rec.projected] if rec.projected is not None else []):
        cand, _ = best_of(r, x)
        if cand is None or not bool(torch.isfinite(cand).all()):
            continue
        e = float((cand.reshape(x.shape) - x).norm() / x.norm())
        if err is None or e < err:
            err, best = e, cand
    if best is None:
        return Outcome(None, None, rec, None)
    return Outcome(err, psnr(x, best), rec, best)
