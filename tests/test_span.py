"""rgap_audit.span.row_space against a dense SVD and least squares (numpy), on gradients built as
sum_n k_n x_n^T and on a matrix of larger rank (the saturated-sketch path)."""

from __future__ import annotations

import numpy as np
import torch

from rgap_audit.span import row_space


def _dense(g: np.ndarray, x: np.ndarray) -> tuple[int, list[float]]:
    s = np.linalg.svd(g, compute_uv=False)
    rank = int((s > 1e-10 * s[0]).sum())
    _, _, vt = np.linalg.svd(g, full_matrices=False)
    v = vt[:rank].T
    return rank, [float(np.linalg.norm(xi - v @ (v.T @ xi)) / np.linalg.norm(xi)) for xi in x]


def test_row_space_matches_dense_svd():
    gen = torch.Generator().manual_seed(0)
    for out, n_in, b in ((8, 30, 3), (2, 30, 4), (40, 12, 5)):
        x = torch.rand(b, n_in, generator=gen, dtype=torch.float64)
        k = torch.randn(b, out, generator=gen, dtype=torch.float64)
        g = k.T @ x
        got = row_space(g, x)
        rank, dist = _dense(g.numpy(), x.numpy())
        assert got.rank == rank == min(b, out, n_in)
        np.testing.assert_allclose(got.distances, dist, atol=1e-10)
        assert got.holds_every_sample == (rank == b)  # fewer outputs than samples: a proper subspace
    # a gradient of rank 20 > B + 8: the sketch saturates and the dense path takes over
    g = torch.randn(30, 25, generator=gen, dtype=torch.float64) @ torch.diag(torch.tensor([1.0] * 20 + [0.0] * 5, dtype=torch.float64))
    x = torch.rand(2, 25, generator=gen, dtype=torch.float64)
    got = row_space(g, x)
    rank, dist = _dense(g.numpy(), x.numpy())
    assert got.rank == rank == 20
    np.testing.assert_allclose(got.distances, dist, atol=1e-10)
