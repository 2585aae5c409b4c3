"""Block elimination of a batch layer system: the forward rows first, sample by sample.

At B > 1 the gradient rows are shared by the samples (K x = sum_n K_n x_n, K_n = k_n * x_n) while the
forward rows are per sample: F = blockdiag(F_n), F_n the rows of W at the entries of z_n that reach the
layer above. Eliminating F first,

    rank([K; F]) = sum_n rank(F_n) + rank(K Z_F),   Z_F = blockdiag(null(F_n)),

which is small exactly when the forward rows are nearly full rank (each null(F_n) is small), where the
gradient-first route rank(K) + rank(F Z_K) (rank.layer_rank) has to rank a reduced system as large as
all the forward rows. Samples whose F_n coincide (the same entries reach the layer above and the same
inputs are unknown: LeakyReLU, Sigmoid, a ReLU pattern shared) are factorised once.

F_n's rank is proven with rank.py's sparse symmetric factorisation (positive pivots of F_n F_n^T - tau I
or F_n^T F_n - tau I), its null basis from that factor (random vectors projected on null(F_n), twice,
then orthonormalised); a pattern the sparse proof does not settle falls back to a dense SVD when small.
K Z_F is formed from K's dense per-group blocks (rank.gradient_blocks) and ranked with rank.py's rule,
against |K| and widened by the error amplification 1 / sigma_min_rel of the F_n whose null bases enter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse.linalg as spla
import torch

from rgap_audit.convspec import ConvSpec
from rgap_audit.rank import _GRAM_MIN, _base_factor, _gram_full_rank, _rank_null, _refined_normal_solve, gradient_blocks
from rgap_audit.structure import sparse_forward

__all__ = ["ForwardFirst", "forward_first", "forward_first_cost"]

_SPARSE_MIN = 16  # smaller per-sample blocks are decided by a dense SVD


@dataclass
class ForwardFirst:
    """The forward-first elimination of one batch layer."""

    rank: int
    rank_forward: int  # sum_n rank(F_n)
    rank_reduced: int  # rank(K Z_F)
    patterns: int  # distinct per-sample forward blocks factorised
    sigma_min_rel: float | None
    null_basis: torch.Tensor | None  # (N * n_in, deficit) orthonormal, flattened x coords; None when not kept


def _per_sample(spec: ConvSpec, n: int, rows_idx: np.ndarray, known_np: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample: (its forward rows, local indices into n_out; its unknown input entries, local into n_in)."""
    n_out, n_in = spec.n_out, spec.n_in
    sample = rows_idx // n_out
    out = []
    for i in range(n):
        rows = np.sort(rows_idx[sample == i] - i * n_out)
        cols = np.arange(n_in) if known_np is None else np.flatnonzero(~known_np[i].reshape(-1))
        out.append((rows, cols))
    return out


def forward_first_cost(spec: ConvSpec, n: int, rows_idx: np.ndarray, known_np: np.ndarray | None) -> int:
    """Entries of K Z_F when every F_n has full row rank (its null space has cols - rows dimensions):
    the size of the reduced system this route ranks, to compare with the gradient-first route's."""
    d = sum(max(0, cols.size - rows.size) for rows, cols in _per_sample(spec, n, rows_idx, known_np))
    return spec.n_weight * d


def _projected_null(fs_t, lu, d: int, seed: int) -> np.ndarray:
    """An orthonormal basis of null(F) (d = its dimension) from the factor of F F^T - tau I, F = fs_t^T:
    seeded random vectors with their row-space part removed (refined solves), twice, then QR."""
    c = fs_t.shape[0]
    y = np.random.default_rng(seed).standard_normal((c, d))
    for steps in (0, 1):  # the second pass refines the first (the factor is of F F^T - tau I)
        coef = _refined_normal_solve(fs_t, lu, np.asarray(fs_t.T @ y), steps)  # (F F^T)^-1 F y, all columns at once
        y = y - np.asarray(fs_t @ coef)
        y = sla.qr(y, mode="economic", check_finite=False)[0]
    return np.ascontiguousarray(y)


def _sample_block(spec: ConvSpec, rows: np.ndarray, cols: np.ndarray, dense_limit: int, seed: int) -> tuple[int, float | None, np.ndarray] | str:
    """rank(F_n), sigma_min_rel and an orthonormal basis of null(F_n) (len(cols), nullity), or why not."""
    m, c = rows.size, cols.size
    if c == 0:
        return 0, None, np.zeros((0, 0))
    if m == 0:
        return 0, None, np.eye(c)
    fs = sparse_forward(spec, 1).tocsr()[rows][:, cols]
    tall = m >= c
    base = _base_factor(fs if tall else fs.T.tocsr(), None) if min(m, c) >= _SPARSE_MIN else "small"
    if not isinstance(base, str):
        lu, tau, ref2, floor = base
        size = c if tall else m
        op = spla.LinearOperator((size, size), matvec=lu.solve, dtype=np.float64)
        rel = math.sqrt(floor)
        try:  # sigma_min to two digits (the largest eigenvalue of the inverse); the proven floor otherwise
            mu = float(spla.eigsh(op, k=1, which="LA", tol=1e-2, v0=np.random.default_rng(0).standard_normal(size), return_eigenvectors=False)[0])
            rel = math.sqrt((1.0 / mu + tau) / ref2)
        except spla.ArpackNoConvergence:
            pass
        if tall:
            return c, rel, np.zeros((c, 0))
        return m, rel, _projected_null(fs.T.tocsr(), lu, c - m, seed)
    if m * c > dense_limit or c * c > dense_limit:
        return f"the forward rows of one sample ({m} x {c}) are not proven full rank by the sparse factorisation ({base}) and too large for a dense SVD"
    r, rel, null = _rank_null(fs.toarray(), True)
    assert null is not None
    return r, rel, null


def _reduced_rank(a: np.ndarray, want_null: bool, scale: float, amp: float) -> tuple[int, float | None, np.ndarray | None]:
    """rank.py's rule on K Z_F. A wide matrix is settled from its row Gram when that proves full row rank
    (its null space then by projection, twice); anything else goes to rank._rank_null."""
    m, n = a.shape
    if m == 0 or n == 0 or not np.any(a) or m >= n or m < _GRAM_MIN:
        return _rank_null(a, want_null, scale, amp)
    top = float(np.abs(a).max())
    a_s, scale_s = a / top, scale / top
    g = a_s @ a_s.T
    rel = _gram_full_rank(a_s, scale_s, amp, gram=g)
    if rel is None:
        return _rank_null(a, want_null, scale, amp)
    if not want_null:
        return m, rel, None
    factor = sla.cho_factor(g, lower=True, check_finite=False)
    y = np.random.default_rng(7).standard_normal((n, n - m))
    for _ in range(2):
        y = y - a_s.T @ sla.cho_solve(factor, a_s @ y, check_finite=False)
        y = np.linalg.qr(y)[0]
    return m, rel, np.ascontiguousarray(y)


def forward_first(
    spec: ConvSpec,
    k_np: np.ndarray,
    rows_idx: np.ndarray,
    known_np: np.ndarray | None,
    *,
    want_null: bool,
    exact_limit: int,
) -> ForwardFirst | str:
    """rank([K; F]) by eliminating the per-sample forward rows first (see the module docstring).

    k_np: dL/dz, (N, *out_shape); rows_idx: indices into N * n_out of the entries of z the forward rows
    see (an entrywise link above, no directions carried from above: then F is block-diagonal over the
    samples); known_np: (N, C_in, S) bool, input entries known to the attacker, or None. Returns why
    not when a per-sample block is not settled or the reduced system exceeds exact_limit entries.
    """
    n = k_np.shape[0]
    cin, g_cnt = spec.in_channels, spec.groups
    cig = cin // g_cnt
    s_sp = spec.n_in // cin
    per = _per_sample(spec, n, rows_idx, known_np)
    solved: dict[tuple[bytes, bytes], tuple[int, float | None, np.ndarray]] = {}
    nulls: list[np.ndarray] = []
    for i, (rows, cols) in enumerate(per):
        key = (rows.tobytes(), cols.tobytes())
        if key not in solved:
            got = _sample_block(spec, rows, cols, exact_limit, seed=len(solved))
            if isinstance(got, str):
                return got
            solved[key] = got
        nulls.append(solved[key][2])
    rank_f = sum(solved[(r.tobytes(), c.tobytes())][0] for r, c in per)
    d_f = sum(nb.shape[1] for nb in nulls)
    if spec.n_weight * d_f > exact_limit:
        return f"the reduced system K Z_F ({spec.n_weight} x {d_f}) is too large for an exact rank"
    rels = [v[1] for v in solved.values() if v[1] is not None]
    amp = 1.0 / min([v[1] for v in solved.values() if v[1] is not None and v[2].shape[1]] or [1.0])
    # K Z_F: rows (channel, group output channel, kernel offset), columns (sample, null vector)
    k_t = torch.from_numpy(np.ascontiguousarray(k_np))
    blocks = gradient_blocks(spec, k_t)
    rows_g = blocks[0][1].shape[0]
    a = np.zeros((cin * rows_g, d_f))
    col = 0
    for i, ((_rows, cols), nb) in enumerate(zip(per, nulls)):
        d_i = nb.shape[1]
        if d_i == 0:
            continue
        full = np.zeros((spec.n_in, d_i))
        full[cols] = nb
        full = full.reshape(cin, s_sp, d_i)
        for g, (chans, blk) in enumerate(blocks):
            part = blk[:, i * s_sp : (i + 1) * s_sp]  # (rows_g, S): sample i's columns of the group's block
            a[g * cig * rows_g : (g + 1) * cig * rows_g, col : col + d_i] = (part[None] @ full[chans]).reshape(cig * rows_g, d_i)
        col += d_i
    scale = max((float(np.linalg.norm(blk, 2)) for _c, blk in blocks), default=0.0)
    rows_kept = np.any(a != 0, axis=1)
    r_k, rel_k, null_k = _reduced_rank(a[rows_kept], want_null, scale, amp)
    if rel_k is not None:
        rels.append(rel_k)
    null = None
    if want_null and null_k is not None and n * spec.n_in * null_k.shape[1] <= exact_limit:
        out = np.zeros((n, spec.n_in, null_k.shape[1]))
        col = 0
        for i, ((_rows, cols), nb) in enumerate(zip(per, nulls)):
            d_i = nb.shape[1]
            if d_i:
                out[i, cols] = nb @ null_k[col : col + d_i]
            col += d_i
        null = torch.from_numpy(out.reshape(n * spec.n_in, -1))
    return ForwardFirst(rank_f + r_k, rank_f, r_k, len(solved), min(rels) if rels else None, null)
