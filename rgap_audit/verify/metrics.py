"""How close a reconstruction is: relative error, MSE / PSNR / SSIM in the reader's units, the nearest of
several equally consistent inputs, and (for a batch) the best combination of the samples."""

from __future__ import annotations

import math

import torch

from rgap_audit.attack.engine import Reconstruction
from rgap_audit.records import Combination, Metrics

# SSIM as published (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004): an 11x11 circular-symmetric Gaussian window
# of standard deviation 1.5 (normalised), K1 = 0.01, K2 = 0.03, the dynamic range L = 1 of the [0, 1]-mapped input
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_window() -> torch.Tensor:
    t = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float | None:
    """Mean SSIM of two images (C, H, W) or (H, W), over channels and the positions where the whole window fits.

    Per position, with Gaussian-weighted local means mu, variances s^2 and covariance s_xy:
    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)), C_i = (K_i L)^2.
    None when the input is not an image at least as large as the window (a vector, a sequence, a small map).
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if x.dim() == 2:
        x, y = x[None], y[None]
    size = 2 * SSIM_RADIUS + 1
    if x.dim() != 3 or x.shape != y.shape or x.shape[1] < size or x.shape[2] < size:
        return None
    g = _gaussian_window()
    c = x.shape[0]

    def local_mean(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only, per channel
        t = torch.nn.functional.conv2d(t[None], g.reshape(1, 1, -1, 1).expand(c, 1, size, 1), groups=c)
        return torch.nn.functional.conv2d(t, g.reshape(1, 1, 1, -1).expand(c, 1, 1, size), groups=c)[0]

    mx, my = local_mean(x), local_mean(y)
    vx = local_mean(x * x) - mx * mx
    vy = local_mean(y * y) - my * my
    cxy = local_mean(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def image_metrics(x: torch.Tensor, x_rec: torch.Tensor, input_shape: tuple[int, ...] | None = None) -> Metrics:
    """Relative error, and MSE / PSNR (peak 1.0) / SSIM after mapping the original's [min, max] to [0, 1].

    input_shape: one sample's shape, for SSIM (default: x's shape without a leading batch of 1); SSIM needs an
    image (C, H, W): a two-dimensional input is a (channels, length) sequence and gets none.
    """
    x = x.to(torch.float64)
    x_rec = x_rec.to(torch.float64).reshape(x.shape)
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    a, b = (x - lo) / span, (x_rec - lo) / span
    mse = float(((b - a) ** 2).mean())
    shape = tuple(input_shape) if input_shape is not None else tuple(x.shape[1:] if x.dim() > 1 and x.shape[0] == 1 else x.shape)
    image = len(shape) == 3 and math.prod(shape) == x.numel()
    return Metrics(
        rel_error=float((x_rec - x).norm() / x.norm().clamp_min(1e-300)),
        mse=mse,
        psnr_db=(10.0 * math.log10(1.0 / mse)) if mse > 0 else None,
        ssim=ssim(a.reshape(shape), b.reshape(shape)) if image else None,
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
