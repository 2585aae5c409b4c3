"""How close a reconstruction is: relative error, MSE / PSNR in the reader's units, the nearest of
several equally consistent inputs, and (for a batch) the best combination of the samples."""

from __future__ import annotations

import math

import torch

from rgap_audit.attack.engine import Reconstruction
from rgap_audit.records import Combination, Metrics


def image_metrics(x: torch.Tensor, x_rec: torch.Tensor) -> Metrics:
    """Relative error, and MSE / PSNR after mapping the original's [min, max] to [0, 1] (peak 1.0)."""
    x = x.to(torch.float64)
    x_rec = x_rec.to(torch.float64)
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    mse = float((((x_rec - lo) / span - (x - lo) / span) ** 2).mean())
    return Metrics(
        rel_error=float((x_rec - x).norm() / x.norm().clamp_min(1e-300)),
        mse=mse,
        psnr_db=(10.0 * math.log10(1.0 / mse)) if mse > 0 else None,
    )


def best_of(rec: Reconstruction, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The reconstruction among the equally consistent ones that is closest to the truth (index 0: the chosen)."""
    if rec.input is None:
        return None, 0
    cands = [rec.input, *rec.alternatives]
    errs = [float((c - x).norm()) for c in cands]
    i = min(range(len(cands)), key=errs.__getitem__)
    return cands[i], i


def combination_fit(samples: torch.Tensor, x_rec: torch.Tensor) -> Combination:
    """Least-squares c minimising ||x_rec - sum_n c_n x_n|| over the samples (B, *shape), and its relative residual.

    `fills_input_space` is True when the samples span every direction of the input (B >= entries): then any
    vector is a combination and a small residual says nothing.
    """
    X = samples.reshape(samples.shape[0], -1).to(torch.float64).T  # entries x B
    y = x_rec.reshape(-1).to(torch.float64)
    c = torch.linalg.lstsq(X, y.unsqueeze(1), driver="gelsd").solution[:, 0]  # minimum norm if samples are dependent
    res = float((X @ c - y).norm() / y.norm().clamp_min(1e-300)) if float(y.norm()) > 0 else None
    rank = int(torch.linalg.matrix_rank(X))
    return Combination(coefficients=c.tolist(), residual_rel=res, samples_rank=rank, fills_input_space=rank >= X.shape[0])


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2g}"
