"""The subspace a shared weight gradient reveals: the rows of dL/dW = sum_n k_n x_n^T of a Linear that
reads the input lie in span{x_1 .. x_B}. One measurement, used by the audit (RGAP404) and by --verify."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rgap_audit.tolerances import SPAN_IN_TOL as IN_TOL
from rgap_audit.tolerances import SPAN_RTOL as RTOL

RULE = f"randomised range finder (B + 8 Gaussian columns), then an SVD; singular values above {RTOL:g} x the largest"


@dataclass
class RowSpace:
    rank: int  # numerical rank of dL/dW
    singular_values_rel: list[float]  # of dL/dW, descending, relative to the largest (at most B + 8)
    distances: list[float]  # each sample's relative distance to the row space

    @property
    def holds_every_sample(self) -> bool:
        return bool(self.distances) and max(self.distances) <= IN_TOL


def row_space(grad_w: torch.Tensor, samples: torch.Tensor, seed: int = 0) -> RowSpace:
    """Measure the row space of grad_w (out x in) against samples (B x in).

    A Gaussian sketch grad_w^T Omega with m = B + 8 columns spans the row space whenever its rank is at
    most m (always so when the rows are combinations of the B samples); the singular values of
    grad_w Q (Q an orthonormal basis of the sketch) are then those of grad_w. Cost O(out * in * m)."""
    g = grad_w.detach().to(torch.float64)
    x = samples.detach().to(torch.float64).reshape(samples.shape[0], -1)
    m = min(g.shape[0], g.shape[1], x.shape[0] + 8)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(g.T @ torch.randn(g.shape[0], m, generator=gen, dtype=torch.float64))
    _, s, vh = torch.linalg.svd(g @ q, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return RowSpace(0, [], [1.0] * x.shape[0])
    rank = int((s > RTOL * s[0]).sum())
    basis = q @ vh[:rank].T  # (in, rank), orthonormal
    if rank == m < min(g.shape):  # the sketch is saturated: the rank may be larger, take the dense SVD
        _, s, vh = torch.linalg.svd(g, full_matrices=False)
        rank = int((s > RTOL * s[0]).sum())
        basis = vh[:rank].T
    resid = x - (x @ basis) @ basis.T
    dist = (resid.norm(dim=1) / x.norm(dim=1).clamp_min(1e-300)).tolist()
    return RowSpace(rank, (s / s[0]).tolist(), dist)
