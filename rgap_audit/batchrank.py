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
Where every output of every sample is a forward row, K and F are tied: the C_out^2 vectors vec(A W) are left
null vectors of K Z_F (_Ties), so its rank is |K| - C_out^2 once the rows they leave are proven independent,
and at least that bound where K Z_F is too large to rank (TiedBound).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from rgap_audit.convspec import ConvSpec
from rgap_audit.rank import (
    _GRAM_MIN,
    AboveRows,
    CarriedDirections,
    _base_factor,
    _gram_full_rank,
    _rank_null,
    _refined_normal_solve,
    _tol_rank,
    gradient_blocks,
)
from rgap_audit.structure import sparse_forward
from rgap_audit.tolerances import EPS, GRAM_SAFE

__all__ = [
    "CarriedElimination",
    "CarriedRowSpace",
    "ForwardFirst",
    "TiedBound",
    "carried_elimination",
    "carried_forward_proof",
    "carried_row_space",
    "composite_first",
    "forward_first",
    "forward_first_cost",
]

_SPARSE_MIN = 16  # smaller per-sample blocks are decided by a dense SVD
# multiply-adds a row Gram summed over the samples may cost (_composite_gram_rank): 1e12 is ~40 s at the
# 2-core CI machine's single-thread 40 GF/s (benchmarks/bench_batch.py); LeNet's stem at B = 8 needs 3.7e11
_GRAM_WORK_MAX = 1e12


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
    if cols.size == 0:
        return 0, None, np.zeros((0, 0))
    if rows.size == 0:
        return 0, None, np.eye(cols.size)
    return _block(sparse_forward(spec, 1).tocsr()[rows][:, cols], dense_limit, seed)


def _block(fs: sp.csr_matrix, dense_limit: int, seed: int) -> tuple[int, float | None, np.ndarray] | str:
    """rank, sigma_min_rel and an orthonormal basis of the null space of one sparse per-sample block, or why
    not: the sparse symmetric factorisation first, a dense QR or SVD when small."""
    m, c = fs.shape
    if c == 0:
        return 0, None, np.zeros((0, 0))
    if m == 0:
        return 0, None, np.eye(c)
    tall = m >= c
    base = _base_factor(fs if tall else fs.T.tocsr(), None) if min(m, c) >= _SPARSE_MIN else "small"
    if not isinstance(base, str):
        lu, tau, ref2, floor = base
        size = c if tall else m
        op = spla.LinearOperator((size, size), matvec=lu.solve, dtype=np.float64)
        rel: float | None = math.sqrt(floor)
        try:  # sigma_min to two digits (the largest eigenvalue of the inverse); the proven floor otherwise
            mu = float(spla.eigsh(op, k=1, which="LA", tol=1e-2, v0=np.random.default_rng(0).standard_normal(size), return_eigenvectors=False)[0])
            rel = math.sqrt((1.0 / mu + tau) / ref2)
        except spla.ArpackNoConvergence:
            pass
        if tall:
            return c, rel, np.zeros((c, 0))
        if 2 * (c - m) > m and m * c <= dense_limit:
            # a null space of more than half the rows' size: the rows' Householder complement (one QR and its
            # application) is cheaper than projecting that many random vectors twice through the sparse factor
            return m, rel, _null_complement(fs.toarray())
        return m, rel, _projected_null(fs.T.tocsr(), lu, c - m, seed)
    if m * c > dense_limit or c * c > dense_limit:
        return f"the forward rows of one sample ({m} x {c}) are not proven full rank by the sparse factorisation ({base}) and too large for a dense SVD"
    dense = fs.toarray()
    top = float(np.abs(dense).max())
    if tall:  # a full-rank block needs no vectors: its QR proves it, else the singular values decide
        rel_qr = _tall_full_rank(dense / top)
        if rel_qr is not None:
            return c, rel_qr, np.zeros((c, 0))
        r, rel = _tol_rank(np.linalg.svd(dense / top, compute_uv=False), (m, c))
        if r == c:
            return r, rel, np.zeros((c, 0))
    r, rel, null = _rank_null(dense, True)
    assert null is not None
    return r, rel, null


def _tall_full_rank(a: np.ndarray) -> float | None:
    """sigma_min / sigma_max of a tall a (m >= c) when its R factor proves that the SVD rule counts all c
    singular values, else None.

    Householder QR is backward stable: R is the exact factor of a + E, |E|_F <= 10 m c eps |a|_F (a generous
    form of the standard bound), so sigma_min(a) >= 1 / |R^-1|_F - |E|_F (Weyl, |R^-1|_2 <= |R^-1|_F) and
    sigma_max(a) <= |R|_F + |E|_F. Full rank is proven when that lower bound exceeds 100 times the rule's
    tolerance max(m, c) eps sigma_max (under that margin the triangular inverse's own rounding, c eps kappa(R)
    relative, stays below 1 %). Costs a QR and a triangular inverse (BLAS-3) instead of a dense
    SVD's bidiagonalisation (~8x slower for a 2916-column block); the reported ratio comes from Lanczos on
    R^T R and on its inverse (relative accuracy 1e-6)."""
    m, c = a.shape
    if c == 0 or m < c:
        return None
    r = sla.qr(a, mode="r", check_finite=False)[0][:c]
    rinv, info = sla.lapack.dtrtri(r, lower=0)
    if info != 0 or not np.all(np.isfinite(rinv)):
        return None
    a_f = float(np.linalg.norm(a))
    err = 10.0 * m * c * EPS * a_f
    lower = 1.0 / float(np.linalg.norm(rinv)) - err
    upper = float(np.linalg.norm(r)) + err
    if not lower > 100.0 * max(m, c) * EPS * upper:
        return None
    v0 = np.random.default_rng(0).standard_normal(c)
    gram = spla.LinearOperator((c, c), matvec=lambda v: r.T @ (r @ v), dtype=np.float64)
    inv = spla.LinearOperator((c, c), matvec=lambda v: rinv @ (rinv.T @ v), dtype=np.float64)
    try:
        lam_max = float(spla.eigsh(gram, k=1, which="LA", tol=1e-6, v0=v0, return_eigenvectors=False)[0])
        mu = float(spla.eigsh(inv, k=1, which="LA", tol=1e-6, v0=v0, return_eigenvectors=False)[0])
    except spla.ArpackNoConvergence:
        return lower / upper  # proven bounds on both ends
    return math.sqrt(1.0 / (mu * lam_max))


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
        got = _pivoted_rank(a_s, g, scale_s, amp, want_null)
        return got if got is not None else _rank_null(a, want_null, scale, amp)
    if not want_null:
        return m, rel, None
    return m, rel, _null_complement(a_s)


def _null_complement(rows: np.ndarray) -> np.ndarray:
    """An orthonormal basis of null(rows) for a wide `rows` (r x n) of full row rank r: the last n - r
    columns of the Householder Q of rows^T (LAPACK geqrf, then ormqr applied to [0; I] only), orthonormal
    to rounding and one BLAS-3 pass (half the flops of projecting random vectors twice and
    re-orthonormalising them)."""
    r, n = rows.shape
    if n == r:
        return np.zeros((n, 0))
    at = np.array(rows.T, order="F")  # a copy: geqrf overwrites it, and rows.T may be the caller's own memory
    lwork = int(sla.lapack.dgeqrf(at, lwork=-1)[2][0])
    qr, tau, _work, info = sla.lapack.dgeqrf(at, lwork=max(lwork, 1), overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"geqrf failed ({info})")
    c = np.zeros((n, n - r), order="F")
    c[r:] = np.eye(n - r)
    lwork = int(sla.lapack.dormqr("L", "N", qr, tau, c, lwork=-1)[1][0])
    cq, _work, info = sla.lapack.dormqr("L", "N", qr, tau, c, lwork=max(lwork, 1), overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"ormqr failed ({info})")
    return np.ascontiguousarray(cq)


def _pivoted_rank(a: np.ndarray, g: np.ndarray, scale: float, amp: float, want_null: bool) -> tuple[int, float | None, np.ndarray | None] | None:
    """The rank of a wide, row-deficient a (scaled to max |a| = 1) by the SVD rule, certified without its SVD.

    A pivoted Cholesky of G = a a^T (LAPACK pstrf) picks r rows a_1 of a; rank >= r is proven by a Cholesky
    of a_1 a_1^T - tau I (tau: the Gram route's margin over the largest eigenvalue, so sigma_r(a) >= sigma_min(a_1)
    > 1e-4 sigma_max); rank <= r by a basis N of null(a_1) (Householder complement) with |a N|_F below the rule's tolerance
    max(m, n) eps |a| amp, so at least n - r singular values of a are below it (minimax), or, when no null
    basis is wanted and a has fewer rows than columns left over, by the residual E of the other rows
    against a_1's row space (coefficients from G, refined from E: the normal equations lose kappa^2):
    |E|_F below the tolerance bounds sigma_{r+1}(a) (Weyl). None when either fails
    (the caller takes the SVD)."""
    m, n = a.shape
    try:
        lam_max = float(spla.eigsh(g, k=1, which="LA", tol=1e-4, v0=np.random.default_rng(0).standard_normal(m), return_eigenvectors=False)[0])
    except spla.ArpackNoConvergence:
        lam_max = float(np.abs(g).sum(axis=0).max())  # an upper bound on lambda_max
    ref2 = max(lam_max * (1 + 1e-3), scale * scale)
    picked = _pivoted_pick(g, (m, n), ref2, amp)
    if picked is None:
        return None
    r = picked.pick.size
    a1 = a[picked.pick]
    if not want_null and m - r < n - r:
        # rank <= r from the other rows instead of a null basis of n - r columns: a_2 = C a_1 + E with
        # C = (a_2 a_1^T)(a_1 a_1^T)^-1 read from G, so a is within |E|_F of a rank-r matrix (Weyl)
        def residual(coef: np.ndarray) -> tuple[float, np.ndarray]:
            e = a[picked.rest] - coef.T @ a1
            return float(np.linalg.norm(e)) ** 2, a1 @ e.T

        if not _rest_dependent(g, picked, residual):
            return None
        return r, math.sqrt(picked.floor), None
    null = _null_complement(a1)
    if float(np.linalg.norm(a @ null)) >= picked.tol:
        return None
    return r, math.sqrt(picked.floor), (null if want_null else None)


@dataclass
class _Pivoted:
    """Rows of a wide matrix a pivoted Cholesky of their Gram picks, proven independent (_pivoted_pick)."""

    pick: np.ndarray  # sorted row indices
    rest: np.ndarray  # the other rows
    tol: float  # the SVD rule's tolerance, max(m, n) eps sqrt(ref2) amp
    floor: float  # sigma_min(picked rows)^2 / ref2 is proven above it


def _pivoted_pick(g: np.ndarray, shape: tuple[int, int], ref2: float, amp: float) -> _Pivoted | None:
    """A pivoted Cholesky (LAPACK pstrf) of G = a a^T (a of `shape`, ref2 >= sigma_max(a)^2) picks r rows a_1;
    rank >= r is proven by a Cholesky of a_1 a_1^T - tau I (tau: the Gram route's margin, so sigma_r(a) >=
    sigma_min(a_1) > 1e-4 sigma_max). None when the factorisation or the proof fails."""
    m, n = shape
    if ref2 <= 0:
        return None
    _c, piv, r, info = sla.lapack.dpstrf(g, tol=1e4 * 10.0 * (m + n) * EPS * ref2, lower=1)
    if info < 0 or r == 0:
        return None
    pick = np.sort(piv[:r] - 1)
    floor = max(GRAM_SAFE, (100.0 * max(m, n) * EPS * amp) ** 2)
    if not _positive_definite(g[np.ix_(pick, pick)], floor * ref2):  # a_1 a_1^T: G's rows and columns picked
        return None
    return _Pivoted(pick, np.setdiff1d(np.arange(m), pick), max(m, n) * EPS * math.sqrt(ref2) * amp, floor)


def _rest_dependent(g: np.ndarray, picked: _Pivoted, residual: Callable[[np.ndarray], tuple[float, np.ndarray]]) -> bool:
    """rank <= r: the rows left, a_2 = C^T a_1 + E, have |E|_F below the rule's tolerance (Weyl). C comes from G
    and is refined from E itself (normal equations lose kappa^2 of accuracy), up to three residuals;
    `residual(C)` returns (|E|_F^2, a_1 E^T), measured on the rows themselves (the callers hold them, or form
    them sample by sample)."""
    if picked.rest.size == 0:
        return True
    factor = sla.cho_factor(g[np.ix_(picked.pick, picked.pick)], lower=True, check_finite=False)
    coef = sla.cho_solve(factor, g[np.ix_(picked.pick, picked.rest)], check_finite=False)
    for _refinement in range(3):
        resid2, step = residual(coef)
        if math.sqrt(resid2) < picked.tol:
            return True
        coef += sla.cho_solve(factor, step, check_finite=False)
    return False


def forward_first(
    spec: ConvSpec,
    k_np: np.ndarray,
    rows_idx: np.ndarray,
    known_np: np.ndarray | None,
    *,
    want_null: bool,
    exact_limit: int,
) -> ForwardFirst | TiedBound | str:
    """rank([K; F]) by eliminating the per-sample forward rows first (see the module docstring).

    k_np: dL/dz, (N, *out_shape); rows_idx: indices into N * n_out of the entries of z the forward rows
    see (an entrywise link above, no directions carried from above: then F is block-diagonal over the
    samples); known_np: (N, C_in, S) bool, input entries known to the attacker, or None. Returns why
    not when a per-sample block is not settled or the reduced system exceeds exact_limit entries, with the
    ties' upper bound on the rank (TiedBound) where they prove one.
    """
    n = k_np.shape[0]
    per = _per_sample(spec, n, rows_idx, known_np)
    solved: dict[tuple[bytes, bytes], tuple[int, float | None, np.ndarray]] = {}
    nulls: list[np.ndarray] = []
    for rows, cols in per:
        key = (rows.tobytes(), cols.tobytes())
        if key not in solved:
            got = _sample_block(spec, rows, cols, exact_limit, seed=len(solved))
            if isinstance(got, str):
                return got
            solved[key] = got
        nulls.append(solved[key][2])
    rank_f = sum(solved[(r.tobytes(), c.tobytes())][0] for r, c in per)
    d_f = sum(nb.shape[1] for nb in nulls)
    rels = [v[1] for v in solved.values() if v[1] is not None]
    amp = 1.0 / min([v[1] for v in solved.values() if v[1] is not None and v[2].shape[1]] or [1.0])
    if spec.n_weight * d_f > exact_limit:
        too_large = f"the reduced system K Z_F ({spec.n_weight} x {d_f}) is too large for an exact rank"
        tied = _tied_row_rank(spec, k_np, per, nulls, rows_idx, amp, exact_limit)
        if isinstance(tied, str):
            return f"{too_large} ({tied})"
        if isinstance(tied, TiedBound):
            return TiedBound(rank_f + tied.upper, f"{too_large} ({tied.why})")
        r_t, rel_t = tied
        return ForwardFirst(rank_f + r_t, rank_f, r_t, len(solved), min([*rels, rel_t]), None)
    # K Z_F: rows (channel, group output channel, kernel offset), columns (sample, null vector)
    k_t = torch.from_numpy(np.ascontiguousarray(k_np))
    blocks = gradient_blocks(spec, k_t)
    a = np.zeros((spec.n_weight, d_f))
    col = 0
    for i, ((_rows, cols), nb) in enumerate(zip(per, nulls)):
        d_i = nb.shape[1]
        if d_i == 0:
            continue
        a[:, col : col + d_i] = _k_columns(spec, blocks, i, nb, cols)
        col += d_i
    scale = max((float(np.linalg.norm(blk, 2)) for _c, blk in blocks), default=0.0)
    rows_kept = np.any(a != 0, axis=1)
    # a null basis of K Z_F only where the basis it gives in x (at least d_f - rows columns) can be kept
    keep_null = want_null and n * spec.n_in * max(0, d_f - int(rows_kept.sum())) <= 2 * exact_limit
    ties = _ties(spec, n, rows_idx)
    by_ties = None if isinstance(ties, str) or d_f < ties.kept.size else _tied_reduced_rank(a, ties, scale, amp, keep_null)
    r_k, rel_k, null_k = by_ties if by_ties is not None else _reduced_rank(a[rows_kept], keep_null, scale, amp)
    if rel_k is not None:
        rels.append(rel_k)
    null = None
    if want_null and null_k is not None and n * spec.n_in * null_k.shape[1] <= 2 * exact_limit:  # kept for the layer below
        out = np.zeros((n, spec.n_in, null_k.shape[1]))
        col = 0
        for i, ((_rows, cols), nb) in enumerate(zip(per, nulls)):
            d_i = nb.shape[1]
            if d_i:
                out[i, cols] = nb @ null_k[col : col + d_i]
            col += d_i
        null = torch.from_numpy(out.reshape(n * spec.n_in, -1))
    return ForwardFirst(rank_f + r_k, rank_f, r_k, len(solved), min(rels) if rels else None, null)


@dataclass
class _Ties:
    """The C_out^2 identities between K and F of a layer whose forward rows are every output of every sample:
    for any C_out x C_out matrix A, <A W, K x> = sum_n <k_n, A W x_n> = 0 on null(F), so the vectors vec(A W)
    (independent when W, C_out x C_in k, has full row rank) lie in K Z_F's left null space."""

    kept: np.ndarray  # rows of K left after dropping, per output channel, the C_out weight columns a pivoted QR of W picks
    basis: np.ndarray  # (C_out, C_in k) orthonormal rows spanning W's row space: V = I_{C_out} (x) basis spans the ties
    c_in: int
    c_out: int
    w_min: float  # sigma_min of W (C_out x C_in k)

    def forward_residual(self, spec: ConvSpec, k_np: np.ndarray, per: list[tuple[np.ndarray, np.ndarray]], nulls: list[np.ndarray]) -> float:
        """An upper bound on |V^T K Z_F|_F without K Z_F: with B = [vec(E_oo' W)] (sigma_min(B) = sigma_min(W)),
        B^T K Z_n is k_n (C_out x positions) applied to W Z_n (C_out x positions x d) per output channel, which
        is W Z_n = 0 up to the rounding of the null bases; |V^T a| <= |B^T a| / sigma_min(W)."""
        w1 = sparse_forward(spec, 1).tocsr()
        done: dict[int, np.ndarray] = {}
        total = 0.0
        for i, ((_rows, cols), nb) in enumerate(zip(per, nulls)):
            if nb.shape[1] == 0:
                continue
            if id(nb) not in done:  # samples sharing a block share its null basis object
                done[id(nb)] = np.asarray(w1[:, cols] @ nb)
            total += self.sample_residual2(k_np[i], done[id(nb)])
        return math.sqrt(total) / self.w_min

    def sample_residual2(self, k_i: np.ndarray, wz: np.ndarray) -> float:
        """|B^T K_n Z_n|_F^2 for one sample from its dL/dz k_i and W Z_n (n_out x d): k_i applied per output channel."""
        return float(np.linalg.norm(np.matmul(k_i.reshape(self.c_out, -1)[None], wz.reshape(self.c_out, -1, wz.shape[1])))) ** 2

    def residual(self, a: np.ndarray) -> float:
        """|V^T a|_F for a with K's rows (channel, output channel, kernel offset): at least the largest of
        |v^T a| over unit v in the ties' span, so sigma_{|K| - C_out^2 + 1}(a) is at most this (minimax)."""
        t = a.reshape(self.c_in, self.c_out, -1, a.shape[1]).transpose(1, 0, 2, 3).reshape(self.c_out, -1, a.shape[1])
        return float(np.linalg.norm(np.matmul(self.basis, t)))


def _ties(spec: ConvSpec, n: int, rows_idx: np.ndarray) -> _Ties | str:
    """The identities of _Ties for this layer, or why there are none. Dropping, for every output channel, the
    rows at the C_out weight columns S a pivoted QR of W picks (W[:, S] nonsingular) leaves rows no tie
    vanishes on: those are the candidates for a basis of K Z_F's row space."""
    c_out = spec.out_channels
    kk = spec.n_weight // (c_out * spec.in_channels)
    if spec.groups != 1:
        return "a grouped layer"
    if rows_idx.size != n * spec.n_out:
        return "the forward rows are not every output of every sample: no identities with K"
    w_mat = spec.weight.detach().to(torch.float64).reshape(c_out, -1).numpy()
    if c_out > w_mat.shape[1]:
        return "more output channels than weights per output"
    _q, r_w, piv = sla.qr(w_mat, mode="economic", pivoting=True, check_finite=False)
    if not abs(r_w[c_out - 1, c_out - 1]) > 1e-8 * abs(r_w[0, 0]):
        return "the weight is not proven to have full row rank"
    rows_g = c_out * kk  # gradient_blocks' rows per input channel: (output channel, kernel offset)
    col_c, col_ab = piv[:c_out] // kk, piv[:c_out] % kk
    dropped = (col_c[None, :] * rows_g + np.arange(c_out)[:, None] * kk + col_ab[None, :]).ravel()
    basis = sla.qr(w_mat.T, mode="economic", check_finite=False)[0].T
    w_min = float(np.linalg.svd(w_mat, compute_uv=False)[-1])
    return _Ties(np.setdiff1d(np.arange(spec.n_weight), dropped), np.ascontiguousarray(basis), spec.in_channels, c_out, w_min)


def _tied_reduced_rank(a: np.ndarray, ties: _Ties, scale: float, amp: float, want_null: bool) -> tuple[int, float | None, np.ndarray | None] | None:
    """rank(K Z_F) = |K| - C_out^2 by rank.py's SVD rule, certified from the ties instead of a factorisation of
    all of K Z_F's rows (CNN6's 12 -> 36 layer at B = 8: 2592 of 3888 rows). rank <= |K| - C_out^2: the ties'
    residual |V^T a|_F is below the rule's tolerance (minimax); rank >= it: the Gram of the kept rows proves them
    independent (their sigma_min bounds sigma_{|K| - C_out^2}(a), interlacing). The null basis is the kept rows'
    Householder complement, checked against all of a. None when a proof fails (the caller ranks a itself)."""
    m, n = a.shape
    top = float(np.abs(a).max()) if a.size else 0.0
    if top == 0.0 or n < ties.kept.size or ties.kept.size < _GRAM_MIN:
        return None
    a_s = a / top
    scale_s = scale / top if scale > 0 else float(np.linalg.norm(a_s))  # >= sigma_max(a_s): |K| or |a_s|_F
    tol = max(m, n) * EPS * scale_s * amp
    if not ties.residual(a_s) < tol:
        return None
    a_k = a_s[ties.kept]
    rel = _gram_full_rank(a_k, scale_s, amp, gram=a_k @ a_k.T, shape=(m, n))
    if rel is None:
        return None
    if not want_null:
        return int(ties.kept.size), rel, None
    null = _null_complement(a_k)
    if not float(np.linalg.norm(a_s @ null)) < tol:
        return None
    return int(ties.kept.size), rel, null


@dataclass
class TiedBound:
    """What the ties prove about a batch layer whose K Z_F is too large to rank: rank <= upper (the forward
    rows' rank plus |K| - C_out^2), and why the exact rank was not reached."""

    upper: int
    why: str


def _tied_row_rank(
    spec: ConvSpec,
    k_np: np.ndarray,
    per: list[tuple[np.ndarray, np.ndarray]],
    nulls: list[np.ndarray],
    rows_idx: np.ndarray,
    amp: float,
    exact_limit: int,
) -> tuple[int, float] | TiedBound | str:
    """rank(K Z_F) of a wide K Z_F too large to hold, from the ties (_Ties): rank(K Z_F) <= |K| - C_out^2 when
    their residual (bounded sample by sample through W Z_n, _Ties.forward_residual) is below the rule's
    tolerance, and the Gram of the kept rows, summed over the samples without forming K Z_F, proves them
    independent: rank = |K| - C_out^2 exactly. (rank, sigma_min ratio of the kept rows); a TiedBound on
    rank(K Z_F) when only the upper bound is proven; why not when not even that."""
    n = k_np.shape[0]
    ties = _ties(spec, n, rows_idx)
    if isinstance(ties, str):
        return ties
    kept = ties.kept
    blocks = gradient_blocks(spec, torch.from_numpy(np.ascontiguousarray(k_np)))
    scale = max((float(np.linalg.norm(blk, 2)) for _c, blk in blocks), default=0.0)
    d_f = sum(nb.shape[1] for nb in nulls)
    if not ties.forward_residual(spec, k_np, per, nulls) < max(spec.n_weight, d_f) * EPS * scale * amp:
        return f"the {ties.c_out ** 2} identities' residual is not below the rank tolerance"
    bound = f"the {ties.c_out ** 2} identities vec(A W) prove rank(K Z_F) <= {kept.size}"
    if kept.size * kept.size > exact_limit or any(spec.n_weight * nb.shape[1] > exact_limit for nb in nulls):
        return TiedBound(int(kept.size), f"{bound}; the Gram of its {kept.size} rows left is too large to prove that rank")
    gram = np.zeros((kept.size, kept.size))
    for i, ((_rows, cols), nb) in enumerate(zip(per, nulls)):
        if nb.shape[1]:
            part = _k_columns(spec, blocks, i, nb, cols)[kept]
            gram += part @ part.T
    rel = _gram_full_rank(np.empty((0, 0)), scale, amp, gram=gram, shape=(d_f, kept.size))
    if rel is None:
        return TiedBound(int(kept.size), f"{bound}; the Gram of its {kept.size} rows left does not prove them independent")
    return int(kept.size), rel


def _k_columns(
    spec: ConvSpec, blocks: list[tuple[list[int], np.ndarray]], i: int, flat: np.ndarray, cols: np.ndarray | None = None
) -> np.ndarray:
    """K applied to directions of sample i alone: (|K|, d), rows (channel, group output channel, kernel offset)
    as rank.gradient_blocks orders them. flat: (n_in, d) in sample i's input coordinates, or, with `cols`,
    (len(cols), d) on those input entries only (the others zero)."""
    if cols is not None:
        full_rows = np.zeros((spec.n_in, flat.shape[1]))
        full_rows[cols] = flat
        flat = full_rows
    cin = spec.in_channels
    cig, s_sp = cin // spec.groups, spec.n_in // cin
    rows_g = blocks[0][1].shape[0]
    full = flat.reshape(cin, s_sp, -1)
    out = np.empty((cin * rows_g, flat.shape[1]))
    for g, (chans, blk) in enumerate(blocks):
        part = blk[:, i * s_sp : (i + 1) * s_sp]  # (rows_g, S): sample i's columns of the group's block
        out[g * cig * rows_g : (g + 1) * cig * rows_g] = (part[None] @ full[chans]).reshape(cig * rows_g, -1)
    return out


def composite_first(
    spec: ConvSpec, k_np: np.ndarray, known_np: np.ndarray | None, above: AboveRows, *, want_null: bool, exact_limit: int
) -> ForwardFirst | str:
    """rank([K; P F]) of a batch layer below a layer j whose null basis was too large to keep, from j's own
    rows (rank.AboveRows) instead of its basis.

    j's undetermined directions are null([K_j; F_j]) (nothing was carried into j), and x_j = L z = L W x
    with L the entrywise link, so this layer's undetermined directions are

        {x : K x = 0, K_j L W x = 0, F_j L W x = 0},

    F_j L W block-diagonal over the samples (A_n = F_j^(n) L_n W: the forward rows of both layers composed).
    Eliminating those first, rank = sum_n rank(A_n) + rank([K; K_j L W] Z_A), Z_A = blockdiag(null(A_n)),
    each A_n factorised as batchrank's forward blocks are (every sample its own: L_n carries its pattern).
    CNN6-d's stem at B = 8: 8 blocks of 1620 x 3072, then 2736 x 11616, where the basis j left was
    27744 x 13024. The two gradient blocks are scaled to unit largest entry each (row scalings). Why not,
    when the link mixes samples, a block is not settled or the reduced system is too large."""
    n = k_np.shape[0]
    spec_j = above.spec
    n_in_j, n_out = spec_j.n_in, spec.n_out
    if above.idx.size != n * n_in_j or above.k.shape[0] != n:
        return "the link to the layer above does not map sample by sample"
    w_i = sparse_forward(spec, 1).tocsr()
    w_j = sparse_forward(spec_j, 1).tocsr()
    rows_j = [rows for rows, _cols in _per_sample(spec_j, n, above.rows_idx, None)]
    cols_i = [cols for _rows, cols in _per_sample(spec, n, np.zeros(0, dtype=np.int64), known_np)]
    d_least = sum(max(0, c.size - r.size) for r, c in zip(rows_j, cols_i))  # each null(A_n) has at least c_n - m_n directions
    rows_m = spec.n_weight + spec_j.n_weight
    if rows_m * d_least > exact_limit and rows_m * rows_m > exact_limit:  # (_composite_gram_rank needs its row Gram only)
        return f"the reduced system [K; K_above L W] Z ({rows_m} x >= {d_least}) is too large for an exact rank"
    nulls: list[np.ndarray] = []
    lws: list[sp.csr_matrix] = []
    rank_f, rels = 0, []
    for i in range(n):
        idx = above.idx[i * n_in_j : (i + 1) * n_in_j]
        fac = above.fac[i * n_in_j : (i + 1) * n_in_j]
        live = idx >= 0
        src = idx[live] - i * n_out
        if src.size and (src.min() < 0 or src.max() >= n_out):
            return "the link to the layer above mixes samples"
        l_n = sp.csr_matrix((fac[live], (np.flatnonzero(live), src)), shape=(n_in_j, n_out))
        lw = (l_n @ w_i[:, cols_i[i]]).tocsr()  # x_j from this sample's unknown inputs
        a_n = (w_j[rows_j[i]] @ lw).tocsr()
        a_n = a_n[np.flatnonzero(np.diff(a_n.indptr))]  # rows the unknowns do not reach constrain nothing
        got = _block(a_n, exact_limit, seed=i)
        if isinstance(got, str):
            return got
        r, rel, nb = got
        rank_f += r
        if rel is not None and nb.shape[1]:
            rels.append(rel)
        nulls.append(nb)
        lws.append(lw)
    d_f = sum(nb.shape[1] for nb in nulls)
    amp = 1.0 / min(rels or [1.0])
    if rows_m * d_f > exact_limit:
        too_large = f"the reduced system [K; K_above L W] Z ({rows_m} x {d_f}) is too large for an exact rank"
        by_gram = _composite_gram_rank(spec, k_np, above, nulls, lws, cols_i, amp, exact_limit)
        if isinstance(by_gram, str):
            return f"{too_large} ({by_gram})"
        r_t, rel_t = by_gram
        return ForwardFirst(rank_f + r_t, rank_f, r_t, n, min([*rels, rel_t]), None)
    blocks_i = gradient_blocks(spec, torch.from_numpy(np.ascontiguousarray(k_np)))
    blocks_j = gradient_blocks(spec_j, torch.from_numpy(np.ascontiguousarray(above.k)))
    a1 = np.zeros((spec.n_weight, d_f))
    a2 = np.zeros((spec_j.n_weight, d_f))
    col = 0
    for i, nb in enumerate(nulls):
        d_i = nb.shape[1]
        if d_i == 0:
            continue
        a1[:, col : col + d_i] = _k_columns(spec, blocks_i, i, nb, cols_i[i])
        a2[:, col : col + d_i] = _k_columns(spec_j, blocks_j, i, np.asarray(lws[i] @ nb))
        col += d_i
    parts = [b[np.any(b != 0, axis=1)] for b in (a1, a2)]
    parts = [b / float(np.abs(b).max()) for b in parts if b.size]
    m = np.vstack(parts) if parts else np.zeros((0, d_f))
    keep_null = want_null and n * spec.n_in * max(0, d_f - m.shape[0]) <= exact_limit
    r_k, rel_k, null_k = _reduced_rank(m, keep_null, 0.0, amp)
    if rel_k is not None:
        rels.append(rel_k)
    null = None
    if keep_null and null_k is not None and n * spec.n_in * null_k.shape[1] <= exact_limit:
        out = np.zeros((n, spec.n_in, null_k.shape[1]))
        col = 0
        for i, nb in enumerate(nulls):
            d_i = nb.shape[1]
            if d_i:
                out[i, cols_i[i]] = nb @ null_k[col : col + d_i]
            col += d_i
        null = torch.from_numpy(out.reshape(n * spec.n_in, -1))
    return ForwardFirst(rank_f + r_k, rank_f, r_k, n, min(rels) if rels else None, null)


def _composite_gram_rank(
    spec: ConvSpec,
    k_np: np.ndarray,
    above: AboveRows,
    nulls: list[np.ndarray],
    lws: list[sp.csr_matrix],
    cols_i: list[np.ndarray],
    amp: float,
    exact_limit: int,
) -> tuple[int, float] | str:
    """rank(M) of composite_first's reduced system M = [K; K_j L W] Z_A when M is too large to hold but its
    row Gram is not, by rank.py's rule, certified as _pivoted_rank certifies a wide matrix, sample by sample
    (M's columns are per sample, so G = sum_n M_n M_n^T and |E|_F^2 = sum_n |E_n|_F^2):

    a pivoted Cholesky of G (each block scaled to unit largest entry: a row scaling) picks r rows, proven
    independent by a Cholesky of their Gram minus the Gram route's margin (sigma_r(M) above it); rank <= r
    by a second pass: the other rows' residual E against the picked rows' span (_rest_dependent: coefficients
    from G, refined from E itself, up to three passes) has |E|_F below the rule's tolerance (Weyl). Some rows are dependent by construction: layer j's ties
    vec(A W_j) with its forward rows (0 on null(A_n)), and <W, K x> = sum_n <k_j, A_n x_n> for this layer.
    LeNet's stem at B = 8: a 4500^2 Gram for a 4500 x 18432 system. (rank, sigma_min ratio) or why not."""
    spec_j = above.spec
    rows = spec.n_weight + spec_j.n_weight
    d_f = sum(nb.shape[1] for nb in nulls)
    if rows * rows > exact_limit or any(rows * nb.shape[1] > exact_limit for nb in nulls):
        return f"its row Gram ({rows}^2) or one sample's block is too large"
    if rows * rows * d_f > _GRAM_WORK_MAX:
        return f"its row Gram ({rows}^2, summed over {d_f} columns) is too much work ({rows * rows * d_f:.1e} > {_GRAM_WORK_MAX:.0e} multiply-adds)"
    blocks_i = gradient_blocks(spec, torch.from_numpy(np.ascontiguousarray(k_np)))
    blocks_j = gradient_blocks(spec_j, torch.from_numpy(np.ascontiguousarray(above.k)))

    def sample_rows(i: int) -> tuple[np.ndarray, np.ndarray]:
        nb = nulls[i]
        return _k_columns(spec, blocks_i, i, nb, cols_i[i]), _k_columns(spec_j, blocks_j, i, np.asarray(lws[i] @ nb))

    m1 = spec.n_weight
    gram = np.zeros((rows, rows))
    top1 = top2 = 0.0
    for i, nb in enumerate(nulls):
        if nb.shape[1]:
            p = np.vstack(sample_rows(i))
            top1, top2 = max(top1, float(np.abs(p[:m1]).max())), max(top2, float(np.abs(p[m1:]).max()))
            gram += sla.blas.dsyrk(1.0, p)  # upper triangle of p p^T
    if top1 == 0.0 or top2 == 0.0:
        return "a block of the reduced system is zero"
    gram = np.triu(gram) + np.triu(gram, 1).T
    scale = np.concatenate([np.full(m1, 1.0 / top1), np.full(rows - m1, 1.0 / top2)])
    gram *= scale[:, None] * scale[None, :]
    ref2 = _largest_eigenvalue(gram) * (1 + 1e-3)
    if ref2 <= 0:
        return "the reduced system is zero"
    picked = _pivoted_pick(gram, (rows, d_f), ref2, amp)
    if picked is None:
        return "the rows its pivoted Cholesky picks are not proven independent"

    def residual(coef: np.ndarray) -> tuple[float, np.ndarray]:  # one more pass over the samples
        resid2, step = 0.0, np.zeros_like(coef)
        for i, nb in enumerate(nulls):
            if nb.shape[1]:
                p = np.vstack(sample_rows(i)) * scale[:, None]
                e = p[picked.rest] - coef.T @ p[picked.pick]
                resid2 += float(np.linalg.norm(e)) ** 2
                step += p[picked.pick] @ e.T
        return resid2, step

    if not _rest_dependent(gram, picked, residual):
        r = picked.pick.size
        return f"the {picked.rest.size} rows left are not proven dependent on the {r} picked (residual above the rank tolerance)"
    return int(picked.pick.size), math.sqrt(picked.floor)


def forward_null_gram(
    spec: ConvSpec, n: int, rows_idx: np.ndarray, pieces: list[tuple[int, list[int], np.ndarray]]
) -> tuple[np.ndarray, float, int]:
    """H = (F Z)^T (F Z) of the gradient-first route, without F Z: per sample, sum of Z_n^T T_n Z_n.

    F = blockdiag(F_n) (the rows of W at the entries of z_n the forward rows see; a row's scale does not
    change its span), Z = null(K) from rank.py's per-channel pieces (group, channels, Z_piece (N*S, d)).
    T_n = F_n^T F_n is one sample's (C_in S)^2 Gram; (F Z)^T (F Z) = sum_n Z_n^T T_n Z_n, Z_n the rows of
    sample n. Z_n is block-diagonal over the channels (each piece's channels share Z_piece's rows), so
    T_n Z_n is one matrix product per piece (T_n's channel columns against Z_piece's sample rows) and
    Z_n^T (T_n Z_n) one more: N (d S C_in S + d^2 S) flops in BLAS-3 instead of the N n_out d^2 of forming
    F Z's Gram, and F Z is never held. Returns (H, |F| = max_n sigma_max(F_n), rows of F Z counted for
    the tolerance).
    """
    cin = spec.in_channels
    s_sp = spec.n_in // cin
    live = [(chans, z) for _g, chans, z in pieces if z.shape[1] and chans]
    offs = np.cumsum([0] + [len(chans) * z.shape[1] for chans, z in live])
    d = int(offs[-1])
    h = np.zeros((d, d))
    w1 = sparse_forward(spec, 1).tocsr()
    grams: dict[bytes, np.ndarray] = {}
    groups: dict[bytes, list[int]] = {}  # samples sharing a forward block, hence T_n
    scale2 = 0.0
    for i, (rows, _cols) in enumerate(_per_sample(spec, n, rows_idx, None)):
        key = rows.tobytes()
        groups.setdefault(key, []).append(i)
        if key not in grams:
            fs = w1[rows]
            grams[key] = (fs.T @ fs).toarray()
            if rows.size:
                scale2 = max(scale2, _largest_eigenvalue(grams[key]) if spec.n_in <= 4096 else float(abs(fs.T @ fs).sum(axis=0).max()))
    # each piece's rows, per pattern group, ordered (pixel, sample) so that one product per channel pair covers
    # every sample: zp[q][key] is (S * n_g, d_q), rows (a, n)
    zp = [{key: np.ascontiguousarray(z.reshape(n, s_sp, -1)[idx].transpose(1, 0, 2)).reshape(-1, z.shape[1]) for key, idx in groups.items()} for _c, z in live]
    for q, (chans_q, z_q) in enumerate(live):
        d_q = z_q.shape[1]
        for jc, c in enumerate(chans_q):
            # the block row of (piece q, channel c) right of the diagonal, mirrored below it (H is symmetric)
            col = offs[q] + jc * d_q
            row = slice(col, col + d_q)
            for p in range(q, len(live)):
                chans_p = live[p][0][jc:] if p == q else live[p][0]
                d_p = live[p][1].shape[1]
                rows_p = np.concatenate([np.arange(cp * s_sp, (cp + 1) * s_sp) for cp in chans_p])
                acc = np.zeros((len(chans_p), d_q, d_p))
                for key, idx in groups.items():
                    # Y[(c', a), (b, n)-ordered columns] = T_n[c', c] Z_q^(n): one product for the group's samples
                    t_pc = grams[key][rows_p, c * s_sp : (c + 1) * s_sp]  # (|C_p| S, S)
                    zq = zp[q][key].reshape(s_sp, len(idx) * d_q)  # rows b, columns (n, i)
                    y = (t_pc @ zq).reshape(len(chans_p), s_sp * len(idx), d_q)  # (c', (a, n), i)
                    acc += np.matmul(y.transpose(0, 2, 1), zp[p][key])  # sum over (a, n): (c', i, j)
                blk = acc.transpose(1, 0, 2).reshape(d_q, -1)
                if p == q:  # its first block is (c, c) itself: symmetrised
                    blk[:, :d_q] = 0.5 * (blk[:, :d_q] + blk[:, :d_q].T)
                h[row, col : col + len(chans_p) * d_p] = blk
                h[col : col + len(chans_p) * d_p, row] = blk.T  # H is symmetric: both triangles at once
                col += len(chans_p) * d_p
    return h, math.sqrt(scale2), int(rows_idx.size)


def _largest_eigenvalue(g: np.ndarray) -> float:
    """lambda_max of a symmetric positive semi-definite G (Lanczos to 1e-10, about the accuracy of a full
    eigvalsh, at a fraction of its cost; the diagonalisation for small G)."""
    if g.shape[0] <= 4 * _GRAM_MIN:
        return float(np.linalg.eigvalsh(g)[-1])
    v0 = np.random.default_rng(0).standard_normal(g.shape[0])
    try:
        return float(spla.eigsh(g, k=1, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False)[0])
    except spla.ArpackNoConvergence:
        return float(np.linalg.eigvalsh(g)[-1])


@dataclass
class _TallSamples:
    """Per-sample tall forward blocks F_n (the rows of W at the entries of z_n the rows see, the columns of
    sample n's unknown inputs), each distinct block factorised once (_tall_samples)."""

    blocks: list[tuple[bytes, np.ndarray | slice]]  # per sample: its block's key, its rows' positions in rows_idx
    cols: dict[bytes, np.ndarray]  # per block: the unknown input entries (local to the sample)
    mats: dict[bytes, sp.csr_matrix]  # per block: F_n, sparse
    factors: dict[bytes, tuple[np.ndarray, bool]]  # per block: Cholesky factor of F_n^T F_n
    lefts: dict[bytes, tuple[np.ndarray, float]]  # per block: orthonormal basis of range(F_n)^perp, its leak bound
    lam: float  # proven: every lambda_min(F_n^T F_n) > lam
    ref2: float  # >= every sigma_max(F_n)^2
    tau: float  # the Gram route's margin over ref2


def _tall_samples(spec: ConvSpec, n: int, rows_idx: np.ndarray, known_np: np.ndarray | None, exact_limit: int) -> _TallSamples | str:
    """Factorise each distinct tall F_n and prove its full column rank: a Cholesky of F_n^T F_n - lam I
    proves lambda_min > lam >= tau (tau the Gram route's margin over |F|^2); an orthonormal basis of
    range(F_n)^perp from seeded random vectors projected twice. Why not, when a block is wide, too large
    for a dense factorisation or not proven."""
    n_out = spec.n_out
    sample = rows_idx // n_out
    w1 = sparse_forward(spec, 1).tocsr()
    blocks: list[tuple[bytes, np.ndarray | slice]] = []
    per: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(n):
        sel = np.flatnonzero(sample == i)
        local = rows_idx[sel] - i * n_out
        order = np.argsort(local, kind="stable")
        rows = local[order]
        cols = np.arange(spec.n_in) if known_np is None else np.flatnonzero(~known_np[i].reshape(-1))
        if rows.size < cols.size:
            return f"sample {i} has {rows.size} forward rows for {cols.size} unknowns"
        if rows.size * cols.size > exact_limit:
            return f"one sample's forward rows ({rows.size} x {cols.size}) are too large for a dense factorisation"
        key = rows.tobytes() + b"|" + cols.tobytes()
        per.setdefault(key, (rows, cols))
        picked = sel[order]
        contiguous = picked.size and int(picked[-1]) - int(picked[0]) == picked.size - 1 and bool(np.all(np.diff(picked) == 1))
        blocks.append((key, slice(int(picked[0]), int(picked[-1]) + 1) if contiguous else picked))  # a view, not a copy
    mats = {key: w1[rows][:, cols].tocsr() for key, (rows, cols) in per.items()}  # sparse F_n
    grams = {key: (f.T @ f).toarray() for key, f in mats.items()}
    lam_max = 0.0
    for g in grams.values():
        if g.size:
            top = float(g[0, 0]) if g.shape[0] == 1 else float(
                spla.eigsh(g, k=1, which="LA", tol=1e-4, v0=np.random.default_rng(0).standard_normal(g.shape[0]), return_eigenvectors=False)[0]
            )
            lam_max = max(lam_max, top)
    ref2 = lam_max * (1 + 1e-3)
    if ref2 <= 0:
        return "the forward rows are zero"
    m_all, c_all = int(rows_idx.size), sum(per[key][1].size for key, _ in blocks)
    floor = max(GRAM_SAFE, (100.0 * max(m_all, c_all) * EPS) ** 2)
    tau = floor * ref2
    factors: dict[bytes, tuple[np.ndarray, bool]] = {}
    lefts: dict[bytes, tuple[np.ndarray, float]] = {}
    lam = math.inf
    for key, f in mats.items():
        g = grams[key]
        try:
            factor = sla.cho_factor(g, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return "one sample's forward rows are not proven to have full column rank (Cholesky)"
        # lambda_min: half the Lanczos estimate (largest eigenvalue of the inverse through the factor), proven
        # by the positive pivots of G - lam I; the Gram route's margin tau when that fails. Either proves
        # lambda_min(G) > tau.
        op = spla.LinearOperator(g.shape, matvec=lambda v, fc=factor: sla.cho_solve(fc, v, check_finite=False), dtype=np.float64)
        try:
            mu = float(spla.eigsh(op, k=1, which="LA", tol=1e-2, v0=np.random.default_rng(0).standard_normal(g.shape[0]), return_eigenvectors=False)[0])
        except (spla.ArpackNoConvergence, ValueError):
            mu = 0.0
        lam_i = None
        for shift in ([0.5 / mu] if mu > 0 and 0.5 / mu > tau else []) + [tau]:
            if _positive_definite(g, shift):
                lam_i = shift
                break
        if lam_i is None:
            return "one sample's forward rows are not proven to have full column rank (Cholesky)"
        lam = min(lam, lam_i)
        factors[key] = factor
        m, c = f.shape
        nb = np.random.default_rng(1).standard_normal((m, m - c))
        for _ in range(2):
            nb = nb - np.asarray(f @ sla.cho_solve(factor, np.asarray(f.T @ nb), check_finite=False))
            nb = sla.qr(nb, mode="economic", overwrite_a=True, check_finite=False)[0]
        leak = float(np.linalg.norm(np.asarray(f.T @ nb))) / math.sqrt(lam_i) if nb.size else 0.0
        lefts[key] = (nb, leak)
    return _TallSamples(blocks, {key: cols for key, (_rows, cols) in per.items()}, mats, factors, lefts, lam, ref2, tau)


def _left_products(ts: _TallSamples, carried: np.ndarray) -> np.ndarray:
    """N^T Q for N = blockdiag(N_n), N_n the orthonormal basis of range(F_n)^perp: (sum_n (m_n - c_n)) x d."""
    rows_nq = sum(ts.lefts[key][0].shape[1] for key, _ in ts.blocks)
    nq = np.empty((rows_nq, carried.shape[1]))
    at = 0
    for key, part in ts.blocks:
        nb = ts.lefts[key][0]
        np.matmul(nb.T, carried[part], out=nq[at : at + nb.shape[1]])
        at += nb.shape[1]
    return nq


def carried_forward_proof(
    spec: ConvSpec, n: int, rows_idx: np.ndarray, carried: np.ndarray, known_np: np.ndarray | None, exact_limit: int, sv_max: float = 1.0
) -> float | str:
    """Prove that the forward rows alone have full column rank when the layer above carried directions Q
    down (they mix the samples), from per-sample blocks: sigma_min / sigma_max of P F, or why not.

    F = blockdiag(F_n) (tall F_n: the rows of W at the entries of z_n the rows see, the columns of sample
    n's unknown inputs), P = I - Q Q^T. sigma_min(P F) >= sigma_min(F) (sigma_min(N^T Q) - leak) with N =
    blockdiag(N_n), N_n an orthonormal basis of range(F_n)^perp (rank.py's principal-angle bound, here per
    sample): each distinct F_n is factorised once (_tall_samples), and only N^T Q (sum_n (m_n - c_n) x d)
    meets the samples. `carried` may be any basis T of the directions whose singular values are at most
    sv_max (forward.entry_rows' raw basis, not orthonormalised): with Q = T R^-1 orthonormal,
    sigma_min(N^T Q) >= sigma_min(N^T T) / sigma_max(T).
    """
    ts = _tall_samples(spec, n, rows_idx, known_np, exact_limit)
    if isinstance(ts, str):
        return ts
    d = carried.shape[1]
    rows_nq = sum(ts.lefts[key][0].shape[1] for key, _ in ts.blocks)
    if rows_nq < d:
        return f"{rows_nq} directions outside the forward rows' range for {d} carried directions"
    nq = _left_products(ts, carried)
    leak = max(v[1] for v in ts.lefts.values())
    s_min = float(np.sqrt(max(sla.eigh(nq.T @ nq, eigvals_only=True, subset_by_index=[0, 0], check_finite=False)[0], 0.0))) if d else 1.0
    s_min /= sv_max
    if ts.lam * max(s_min - leak, 0.0) ** 2 <= ts.tau * 1.0000001:
        return "the carried directions are not proven to leave the forward rows full column rank (principal angles)"
    return math.sqrt(ts.lam / ts.ref2) * (s_min - leak)


@dataclass
class CarriedElimination:
    """rank([K; P F]) of a batch layer below carried directions, by eliminating the tall forward rows."""

    rank: int
    rank_reduced: int  # rank of M = [N^T Q; K F^+ Q]
    carried: int  # d, the directions carried from above
    sigma_min_rel: float | None
    null_basis: torch.Tensor | None  # (N * n_in, deficit) orthonormal; None when not kept


def carried_elimination(
    spec: ConvSpec,
    k_np: np.ndarray,
    rows_idx: np.ndarray,
    carried_dirs: CarriedDirections,
    known_np: np.ndarray | None,
    *,
    want_null: bool,
    exact_limit: int,
) -> CarriedElimination | str:
    """rank([K; P F]) when every sample's forward rows F_n are tall with full column rank and the layer above
    carried d directions Q down (orthonormal, mixing the samples; P = I - Q Q^T).

    x is undetermined iff K x = 0 and F x = Q y for some y. F x = Q y is solvable iff N^T Q y = 0 (N =
    blockdiag(N_n), orthonormal bases of range(F_n)^perp), and then x = F^+ Q y, one x per y (F and Q
    have full column rank). So null([K; P F]) = F^+ Q null(M) with M = [N^T Q; K F^+ Q], and

        rank([K; P F]) = unknowns - d + rank(M).

    M has sum_n (m_n - c_n) + |K| rows and d columns, where the gradient-first route ranks P F Z, sum_n m_n
    rows by (unknowns - rank K) columns: a Conv2d(3, 12, 4, 2, 2) on 32 x 32 below a Linear head at B = 2
    ranks 1368 x 3468 instead of 6936 x 5568. The two blocks of M are each scaled to unit largest entry (a
    row scaling: the exact rank is unchanged) and M is ranked by rank.py's rule with its tolerance widened by
    sigma_max / sigma_min of F (F^+ amplifies rounding by that much) and by the spread of the carried basis.

    Q need not be orthonormal: any basis T of the carried directions with full column rank gives the same
    null space (F x = T y, x = F^+ T y), so the raw basis of forward.entry_rows (the layer above's
    orthonormal null basis scaled entry by entry through the link, spread = max / min scale) is used as
    is, which skips orthonormalising a (sum m_n) x d basis (45 s at CNN6-d's stem at B = 4). Why not, when
    a block is not proven or M is too large."""
    n = k_np.shape[0]
    raw = carried_dirs.usable_raw
    if raw is not None and carried_dirs.spread is not None:
        carried, spread = raw, float(carried_dirs.spread)
    else:
        carried, spread = carried_dirs.orthonormal(), 1.0
    unknowns = n * spec.n_in - (0 if known_np is None else int(known_np.sum()))
    if (rows_idx.size - unknowns + spec.n_weight) * carried.shape[1] > exact_limit:  # M's size, before any factorisation
        return f"the reduced system [N^T Q; K F^+ Q] ({rows_idx.size - unknowns + spec.n_weight} x {carried.shape[1]}) is too large for an exact rank"
    ts = _tall_samples(spec, n, rows_idx, known_np, exact_limit)
    if isinstance(ts, str):
        return ts
    d = carried.shape[1]
    rows_nq = sum(ts.lefts[key][0].shape[1] for key, _ in ts.blocks)
    rows_k = spec.n_weight  # K's rows: the weight's entries
    if (rows_nq + rows_k) * d > exact_limit or max(c.size for c in ts.cols.values()) * d > exact_limit:
        return f"the reduced system [N^T Q; K F^+ Q] ({rows_nq + rows_k} x {d}) is too large for an exact rank"

    blocks = gradient_blocks(spec, torch.from_numpy(np.ascontiguousarray(k_np)))
    kx = np.zeros((rows_k, d))  # K F^+ Q = sum_n K_n x_n, rows (channel, group output channel, kernel offset)
    k_first = rows_k < d and rows_k * spec.n_in <= exact_limit  # fewer right-hand sides: K_n (F_n^T F_n)^-1 first
    for i, (key, part) in enumerate(ts.blocks):  # one sample at a time: F^+ Q itself (N n_in x d) is never held
        ft_q = np.asarray(ts.mats[key].T @ carried[part])  # F_n^T Q_n
        if k_first:
            kn = _k_dense(spec, blocks, n, sample=i)  # K_n: block-diagonal over the input channels
            y = sla.cho_solve(ts.factors[key], np.ascontiguousarray(kn[:, ts.cols[key]].T), check_finite=False)  # (c_n, |K|)
            kx += y.T @ ft_q
        else:
            kx += _k_columns(spec, blocks, i, sla.cho_solve(ts.factors[key], ft_q, check_finite=False), ts.cols[key])  # K_n F_n^+ Q_n
    nq = _left_products(ts, carried)
    parts = [b / float(np.abs(b).max()) for b in (nq, kx) if b.size and np.any(b)]
    m = np.vstack(parts) if parts else np.zeros((0, d))
    f_rel = math.sqrt(ts.lam / ts.ref2)
    r_m, rel_m, null_m = _reduced_rank(m, want_null, 0.0, spread / f_rel)
    null = None
    if want_null and null_m is not None and n * spec.n_in * null_m.shape[1] <= exact_limit:
        per = np.zeros((n, spec.n_in, null_m.shape[1]))  # F^+ (Q null(M)), sample by sample
        for i, (key, part) in enumerate(ts.blocks):
            qy = np.asarray(ts.mats[key].T @ (carried[part] @ null_m))
            per[i, ts.cols[key]] = sla.cho_solve(ts.factors[key], qy, check_finite=False)
        v = per.reshape(n * spec.n_in, -1)
        null = torch.from_numpy(np.linalg.qr(v)[0] if v.shape[1] else v)
    rel = None if rel_m is None else rel_m * f_rel / spread
    return CarriedElimination(unknowns - d + r_m, r_m, d, rel, null)


@dataclass
class CarriedRowSpace:
    """rank([K; P F]) of a batch layer whose carried directions leave fewer known rows than unknowns."""

    rank: int
    rows: int  # |K| + m - d, the rows of [K; U^T F]
    known_rows: int  # m - d, the forward rows' directions the attacker knows
    sigma_min_rel: float | None
    null_basis: torch.Tensor | None  # (N * n_in, deficit) orthonormal; None when not kept


def _k_dense(spec: ConvSpec, blocks: list[tuple[list[int], np.ndarray]], n: int, sample: int | None = None) -> np.ndarray:
    """K as a dense (|K|, N n_in) matrix from rank.gradient_blocks, or with `sample` only that sample's
    columns K_n (|K|, n_in): rows (channel, group output channel, kernel offset), columns (sample, channel,
    position) as x; block-diagonal over the input channels."""
    cin = spec.in_channels
    s_sp = spec.n_in // cin
    rows_g = blocks[0][1].shape[0]
    n_cols = n if sample is None else 1
    k = np.zeros((cin * rows_g, n_cols, cin, s_sp))
    for chans, blk in blocks:
        per = blk.reshape(rows_g, n, s_sp)
        per = per if sample is None else per[:, sample : sample + 1]
        for c in chans:
            k[c * rows_g : (c + 1) * rows_g, :, c, :] = per
    return k.reshape(cin * rows_g, n_cols * spec.n_in)


def carried_row_space(
    spec: ConvSpec,
    k_np: np.ndarray,
    rows_idx: np.ndarray,
    carried_dirs: CarriedDirections,
    known_np: np.ndarray | None,
    *,
    want_null: bool,
    exact_limit: int,
) -> CarriedRowSpace | str:
    """rank([K; P F]) from its rows when the layer above carried so many directions down that |K| + m - d is
    below the unknowns (m forward rows, d directions; P = I - Q Q^T): then P F = U U^T F with U an orthonormal
    basis of range(Q)^perp (m - d columns), [K; P F] has the singular values of [K; U^T F], and its rank is at
    most |K| + m - d. The wide [K; U^T F] (each block scaled to unit largest entry: a row scaling) is ranked by
    rank.py's rule from its row Gram: independent rows, or a pivoted Cholesky's certificate where they are
    not (_reduced_rank; the ties <diag(a) W, K x> = sum_n <k_n, diag(a) W x_n> make some dependent). U is the
    Householder complement of the carried basis (raw or orthonormal: the same span, full column rank either
    way). ResNet-tiny's stem at B = 8 below its residual segment: 216 + 1208 rows for 6144 unknowns, where
    the gradient-first route's P F Z (4545 x 5928 with the carried rows) was too large. Why not, when a size
    exceeds exact_limit."""
    n = k_np.shape[0]
    basis = carried_dirs.usable_raw if carried_dirs.usable_raw is not None else carried_dirs.orthonormal()
    m, d = basis.shape
    cols = np.arange(n * spec.n_in) if known_np is None else np.flatnonzero(~known_np.reshape(-1))
    rows = spec.n_weight + m - d
    if rows >= cols.size:
        return f"{rows} rows for {cols.size} unknowns: not fewer rows than unknowns"
    if rows * rows > exact_limit or m * m > exact_limit or rows * cols.size > exact_limit:
        return f"the rows [K; U^T F] ({rows} x {cols.size}) are too large for their Gram"
    u = _null_complement(basis.T)  # (m, m - d): range(Q)^perp
    f = sparse_forward(spec, n).tocsr()[rows_idx][:, cols]
    uf = np.asarray((f.T @ u).T)  # U^T F, (m - d, unknowns)
    kd = _k_dense(spec, gradient_blocks(spec, torch.from_numpy(np.ascontiguousarray(k_np))), n)[:, cols]
    parts = [b / float(np.abs(b).max()) for b in (kd, uf) if b.size and np.any(b)]
    r_mat = np.vstack(parts) if parts else np.zeros((0, cols.size))
    keep_null = want_null and n * spec.n_in * (cols.size - min(rows, r_mat.shape[0])) <= exact_limit
    rank, rel, nb = _reduced_rank(r_mat, keep_null, 0.0, carried_dirs.spread or 1.0)
    null = None
    if keep_null and nb is not None:
        full = np.zeros((n * spec.n_in, nb.shape[1]))
        full[cols] = nb
        null = torch.from_numpy(full)
    return CarriedRowSpace(rank, rows, m - d, rel, null)


def _positive_definite(g: np.ndarray, shift: float) -> bool:
    """Whether the Cholesky factorisation of G - shift I succeeds (every pivot positive: a proof that
    lambda_min(G) > shift up to the factorisation's rounding, which the callers' margins dominate)."""
    h = g.copy()
    h.flat[:: h.shape[0] + 1] -= shift
    try:
        sla.cho_factor(h, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return False
    return True
