"""The subspace a shared weight gradient reveals: the rows of dL/dW = sum_n k_n x_n^T of a Linear that
reads the input lie in span{x_1 .. x_B}; the rows of a convolution's dL/dW (C_out x C_in k) =
sum_n sum_p k_n[:, p] patch_n(p)^T lie in the span of the batch's input patches. Used by the audit
(RGAP404) and, for a Linear, by --verify."""

from __future__ import annotations

from collections.abc import Iterable
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


PATCH_RULE = f"dense SVD of the C_out x (C_in k) weight gradient, singular values above {RTOL:g} x the largest"


@dataclass
class PatchSpace:
    """The row space of a convolution's weight gradient against the input patches it is built from."""

    rank: int  # numerical rank of dL/dW as a C_out x (C_in k) matrix
    dims: int  # C_in k: the dimension of patch space
    count: int  # patches tested (zero patches, all padding, lie in every subspace and are not counted)
    distance: float  # largest relative distance of a patch to the row space (0 when it is the whole space)

    @property
    def holds_every_patch(self) -> bool:
        return self.count > 0 and self.distance <= IN_TOL

    @property
    def proper(self) -> bool:
        """The row space is a proper subspace of patch space: holding every patch then says something."""
        return self.rank < self.dims


def patch_space(grad_w: torch.Tensor, patches: Iterable[torch.Tensor]) -> PatchSpace:
    """Measure the row space of grad_w (C_out x D, a convolution's weight gradient with its kernel
    flattened) against blocks of input patches (P x D each, e.g. one sample's unfold at a time, so that
    B x positions patches are never held at once). The weight is small (D = C_in k), so its SVD is dense."""
    g = grad_w.detach().to(torch.float64)
    dims = g.shape[1]
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    rank = 0 if s.numel() == 0 or float(s[0]) == 0.0 else int((s > RTOL * s[0]).sum())
    basis = vh[:rank].T  # (D, rank), orthonormal
    count, worst = 0, 0.0
    for block in patches:
        p = block.detach().to(torch.float64).reshape(-1, dims)
        norms = p.norm(dim=1)
        live = norms > 0
        count += int(live.sum())
        if rank == dims or not bool(live.any()):
            continue  # the whole space holds every patch
        resid = p[live] - (p[live] @ basis) @ basis.T
        worst = max(worst, float((resid.norm(dim=1) / norms[live]).max()))
    return PatchSpace(rank, dims, count, worst)
