"""Structured exact rank of one layer's R-GAP system [K; F], its null space and closed-form counts.

For a layer z = W x (ConvSpec) with output gradient k = dL/dz the attacker has two kinds of linear
constraints on the input x (N samples, padding excluded):

* K x = vec(dL/dW)  (gradient constraints). K is block-diagonal over input channels; the block of
  channel c depends only on c's group: rows (group output channel o, kernel offset u), columns
  (sample n, input position t), entry k[n, o, q] where s*q + d*u - p = t per spatial dim. For
  stride s the block splits exactly by stride residue class: (t + p) = d*u (mod s) per dim, so we
  build and solve one small dense block per residue class, straight from index arithmetic.
* F x = known part of z  (forward constraints), F = C W with C = V^T J (see ForwardInfo).

rank([K; F]) = rank(K) + rank(F Z) with Z an orthonormal basis of null(K) (block-diagonal). F Z is
formed without F: the null vectors of each block are put into their channel of an input batch and
pushed through the convolution (one call per distinct block), then through fwd.jac, then the
undetermined directions fwd.unknown are projected out. Each block gets its own numerical-rank
tolerance, the scales of K and F are unrelated and never meet in one SVD: a K residue block
max(shape) * eps * sigma_max; F Z max(shape) * eps * max(sigma_max(F Z), |F|) / g, with |F|
estimated on random vectors (F Z may be pure round-off) and g the smallest relative gap of the K
blocks whose null bases enter Z (their errors, ~eps / g, pass into F Z). The null space of the
layer is Z . null(F Z). Clearly full-rank blocks (sigma_min / reference > 1e-4) are settled from
their Gram matrix, without an SVD.

Everything is float64 numpy/torch; no loops over positions.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as sla
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as TF

from rgap_audit.convspec import ConvSpec
from rgap_audit.convtranspose import ConvTransposeSpec
from rgap_audit.structure import entry_map, sparse_forward
from rgap_audit.tolerances import EPS, GRAM_SAFE

__all__ = [
    "AboveRows",
    "CarriedDirections",
    "ForwardInfo",
    "LayerRank",
    "dense_system",
    "gradient_blocks",
    "gradient_counting_holds",
    "gradient_rank_counting",
    "layer_counting_holds",
    "layer_rank",
    "layer_rank_counting",
]

_EPS = EPS
# Gram fast path: accept "full rank" only when lambda_min / lambda_max of the Gram matrix exceeds this,
# i.e. sigma_min / sigma_max > 1e-4, far above both the SVD tolerance (~1e-12) and the Gram's own
# rounding (~n * eps in lambda). Anything closer is decided by an SVD of the matrix itself.
_GRAM_SAFE = GRAM_SAFE
_GRAM_MIN = 96  # below this size an SVD is as cheap as the Gram route
_CHUNK_ELEMS = 4_000_000  # z-perturbation entries pushed through fwd.jac at once


# ====================================================================== records
@dataclass
class CarriedDirections:
    """The directions of the forward rows' entries left undetermined above (ForwardInfo.entries[1]).

    `raw` (len(rows), d; dense or sparse) spans them with full column rank; `sv_bounds`, when known from how
    raw was built, bounds its singular values (lo, hi) (an orthonormal basis scaled row by row by w: min |w|,
    max |w|; (1, 1): orthonormal). The orthonormal basis is computed on first use (`orthonormal`, by the
    caller's `orthonormalise`): the batch routes below carried directions (batchrank.carried_forward_proof
    and carried_elimination) work with raw and its bounds and never need it."""

    raw: Any
    sv_bounds: tuple[float, float] | None = None
    orthonormalise: Callable[[Any], np.ndarray] | None = None
    _q: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def spread(self) -> float | None:
        """An upper bound on raw's condition number, None when unknown."""
        return None if self.sv_bounds is None else self.sv_bounds[1] / self.sv_bounds[0]

    @property
    def usable_raw(self) -> np.ndarray | None:
        """raw, dense, when its singular values are bounded (else None: use `orthonormal`)."""
        return self.raw if self.sv_bounds is not None and isinstance(self.raw, np.ndarray) else None

    @property
    def d(self) -> int:
        """The number of directions: raw's columns when its singular values are bounded (then it has full
        column rank), else the orthonormal basis's (computed now)."""
        return int(self.raw.shape[1]) if self.sv_bounds is not None else int(self.orthonormal().shape[1])

    def orthonormal(self) -> np.ndarray:
        if self._q is None:
            if self.orthonormalise is None:
                raise ValueError("carried directions without an orthonormal basis or a way to compute one")
            self._q = self.orthonormalise(self.raw)
        return self._q

    @staticmethod
    def of(carried: CarriedDirections | np.ndarray | None) -> CarriedDirections | None:
        """An orthonormal array (how tests and older callers pass them) as CarriedDirections."""
        if carried is None or isinstance(carried, CarriedDirections):
            return carried
        return CarriedDirections(raw=carried, sv_bounds=(1.0, 1.0), _q=carried)


@dataclass
class AboveRows:
    """The system of the weighted layer above (j), handed down in place of its null basis when that basis
    was too large to keep (batchrank.composite_first): its spec, dL/dz (N, *out_shape_j), the per-sample
    forward rows it ranked (indices into N * n_out_j; nothing was carried into it, so its null space is
    exactly null([K_j; F_j])), and the entrywise link from this layer's z to x_j: per entry of x_j, the
    entry of z it reads (-1: none) and its factor."""

    spec: ConvSpec
    k: np.ndarray
    rows_idx: np.ndarray
    idx: np.ndarray
    fac: np.ndarray


@dataclass
class ForwardInfo:
    """What the attacker knows of the layer output z (shape (N, *spec.out_shape)): the row space of C = V^T J."""

    jac: Callable[[torch.Tensor], torch.Tensor] | None = None
    """maps a batch of z-perturbations (d, N, *out_shape) to perturbations of the next input x'
    (d, *x'_shape); None = identity (x' = z)"""
    unknown: torch.Tensor | None = None
    """(D, n') orthonormal columns in flattened x' coords (D entries of x'): directions of x' left
    undetermined above; None = none"""
    none: bool = False
    """nothing is known about z: no forward constraints at all"""
    rows: int | None = None
    """number of forward rows to report (caller's count of known directions of z); None: the
    number of rows of C, min(D - n', N * n_out), which bounds rank(C) from above"""
    entries: tuple[np.ndarray, CarriedDirections | np.ndarray | None] | None = None
    """set when the rows of C are the entries of z scaled one by one (an elementwise link above,
    reshapes and permutations aside): (indices into N * n_out of the entries that reach x', the
    directions of those entries left undetermined above (CarriedDirections, or a (len, d) orthonormal
    array), or None). Lets the forward rows' own rank be proven on the sparse operator first
    (forward_full_rank)."""
    cache: dict | None = None
    """a dict the caller keeps across calls on the same layer (same weights): factorisations that depend
    only on the layer and the entries seen are reused (the attack's pattern passes)"""
    measure: bool = True
    """measure sigma_min where the forward rows' proof settles the layer (the attack's repeated solves
    skip it and keep the proven bound; the decision does not depend on it)"""
    above_rows: AboveRows | None = None
    """B > 1, the layer above's null basis not kept: its own rows, to rank this layer with them
    (batchrank.composite_first) instead of bounding it by a count"""


@dataclass
class SystemRHS:
    """The right-hand sides of one layer's system, to solve it as well as rank it (the attack).

    dw: dL/dW (the weight's shape, the normalised layer's layout). z: the layer output the forward
    rows measure, bias removed, (N, *out_shape); the forward rows apply C (ForwardInfo) to it.
    """

    dw: torch.Tensor
    z: torch.Tensor | None


@dataclass
class LayerRank:
    """Rank of one layer's system [K; F] (exact, or proven bounds when too large)."""

    unknowns: int
    grad_rows: int
    fwd_rows: int
    rank_grad: int | None
    rank_grad_counting: int
    rank: int | None
    rank_lower: int
    rank_upper: int
    deficit: int | None  # unknowns - rank (None when only bounds)
    method: str  # "structured-svd" | "bounds"
    sigma_min_rel: float | None  # smallest kept singular value / largest, over the blocks solved
    null_basis: torch.Tensor | None  # (N * n_in, deficit) orthonormal, flattened x coords (N, *in_shape)
    seconds: float
    solution: torch.Tensor | None = None  # with a SystemRHS: the minimum-norm solution, flattened (N * n_in,)
    notes: list[str] = dataclasses.field(default_factory=list)  # what a route that was tried and dropped said


# ====================================================================== geometry
def _dims(spec: ConvSpec) -> list[tuple[int, int, int, int, int, int]]:
    """Per spatial dim: (input size, kernel, stride, padding, dilation, output size)."""
    return list(zip(spec.in_spatial, spec.kernel, spec.stride, spec.padding, spec.dilation, spec.out_spatial))


def _qmap(h: int, kk: int, s: int, p: int, d: int, o: int) -> np.ndarray:
    """q[u, t]: the output index whose window puts kernel offset u on input position t, else o (a zero slot)."""
    u = np.arange(kk)[:, None]
    t = np.arange(h)[None, :]
    num = t + p - d * u
    q = num // s
    ok = (num % s == 0) & (q >= 0) & (q < o)
    return np.where(ok, q, o)


@dataclass
class _Class:
    """One stride residue class: the kernel offsets and input positions that only meet each other."""

    us: list[np.ndarray]  # kernel offsets, per dim
    ts: list[np.ndarray]  # input positions, per dim
    tflat: np.ndarray  # flat spatial index of the positions (t1 major)
    n_rows_per_out: int  # prod of len(us)


def _classes(spec: ConvSpec, split: bool = True) -> list[_Class]:
    """Residue classes of the gradient block (split=False: one class, the whole block)."""
    dims = _dims(spec)
    per_dim: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for h, kk, s, p, d, _o in dims:
        u = np.arange(kk)
        t = np.arange(h)
        if not split or s == 1:
            per_dim.append([(u, t)])
        else:
            per_dim.append([(u[(d * u) % s == r], t[(t + p) % s == r]) for r in range(s)])
    out = []
    for combo in itertools.product(*per_dim):
        us = [c[0] for c in combo]
        ts = [c[1] for c in combo]
        if ts:
            grids = np.meshgrid(*ts, indexing="ij")
            tflat = np.ravel_multi_index(tuple(g.ravel() for g in grids), spec.in_spatial) if grids[0].size else np.zeros(0, int)
        else:
            tflat = np.zeros(1, dtype=np.int64)
        out.append(_Class(us, ts, np.asarray(tflat, dtype=np.int64), int(np.prod([len(u) for u in us], dtype=np.int64))))
    return out


def _padded_k(spec: ConvSpec, k: np.ndarray, g: int) -> np.ndarray:
    """k of group g's output channels, (N, C_out/groups, *out), with one zero slot appended per dim."""
    cog = spec.out_channels // spec.groups
    kg = k[:, g * cog : (g + 1) * cog]
    return np.pad(kg, [(0, 0), (0, 0)] + [(0, 1)] * spec.ndim)


def _gather_block(kp: np.ndarray, qmaps: list[np.ndarray], cls: _Class) -> np.ndarray:
    """Dense block of one class: rows (o, u...) and columns (n, t...), entries k[n, o, q(u, t)]."""
    n, cog = kp.shape[:2]
    m = len(qmaps)
    if m == 0:
        return np.ascontiguousarray(kp.T)  # (C_out/groups, N)
    idx = []
    for j in range(m):
        sub = qmaps[j][np.ix_(cls.us[j], cls.ts[j])]
        shape = [1] * (2 * m)
        shape[2 * j], shape[2 * j + 1] = sub.shape
        idx.append(sub.reshape(shape))
    g = kp[(slice(None), slice(None), *idx)]  # (N, Cog, a1, n1, ..., am, nm)
    order = [1] + [2 + 2 * j for j in range(m)] + [0] + [3 + 2 * j for j in range(m)]
    g = g.transpose(order)
    rows = cog * cls.n_rows_per_out
    return np.ascontiguousarray(g.reshape(rows, n * cls.tflat.size))


# ====================================================================== dense linear algebra
def _tol_rank(s: np.ndarray, shape: tuple[int, int], scale: float = 0.0, amp: float = 1.0) -> tuple[int, float | None]:
    """Numerical rank with the usual tolerance max(shape) * eps * reference * amp, and sigma_min_kept / reference.

    reference = max(sigma_max, scale): `scale` is the size of the operator the matrix was cut from
    (F for F Z), so that a product that is pure round-off (F Z = 0 up to eps * |F|) has rank 0.
    amp >= 1 widens the tolerance by the error amplification of the factors (F Z: the null bases Z
    of K blocks carry errors eps / sigma_min_rel(block)).
    """
    ref = max(float(s[0]) if s.size else 0.0, scale)
    if ref <= 0:
        return 0, None
    tol = max(shape) * _EPS * ref * amp
    r = int((s > tol).sum())
    return r, (float(s[r - 1] / ref) if r else None)


def _gram_full_rank(
    a: np.ndarray, scale: float = 0.0, amp: float = 1.0, gram: np.ndarray | None = None, shape: tuple[int, int] | None = None
) -> float | None:
    """sigma_min / reference when the Gram matrix G proves a has full rank min(shape), else None.

    Proof: a Cholesky factorisation of G - tau I with tau = floor * reference^2 succeeds, so every
    eigenvalue of G exceeds tau, i.e. sigma_min / reference > sqrt(floor) >= 1e-4, far above both the
    Gram's rounding (~n eps in lambda) and 100 times the rank tolerance of _tol_rank. Small G are
    simply diagonalised; for large ones a Cholesky is ~4x cheaper than an eigen-decomposition and
    the extreme eigenvalues (hence the reported sigma_min / reference) come from Lanczos (ARPACK,
    relative accuracy 1e-4) on G and on (G - tau I)^-1 through the factor. `gram`: G when the caller has it,
    `shape`: a's shape when a itself is not formed (then `gram` is required).
    """
    m, n = a.shape if shape is None else shape
    g = gram if gram is not None else (a.T @ a if m >= n else a @ a.T)
    size = g.shape[0]
    floor = max(_GRAM_SAFE, (100.0 * max(m, n) * _EPS * amp) ** 2)
    if size <= 4 * _GRAM_MIN:
        w = np.linalg.eigvalsh(g)
        ref2 = max(float(w[-1]), scale * scale)
        if ref2 > 0 and w[0] > floor * ref2:
            return float(math.sqrt(w[0] / ref2))
        return None
    v0 = np.random.default_rng(0).standard_normal(size)
    try:
        lam_max = float(spla.eigsh(g, k=1, which="LA", tol=1e-4, v0=v0, return_eigenvectors=False)[0])
    except spla.ArpackNoConvergence:
        lam_max = float(np.linalg.norm(g, ord=1))  # an upper bound on lambda_max
    ref2 = max(lam_max * (1 + 1e-3), scale * scale)
    if ref2 <= 0:
        return None
    tau = floor * ref2
    shifted = g.copy()  # G - tau I without an identity as large as G (its allocation cost as much as the factor)
    shifted.flat[:: size + 1] -= tau
    try:
        factor = sla.cho_factor(shifted, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    inv = spla.LinearOperator((size, size), matvec=lambda v: sla.cho_solve(factor, v, check_finite=False), dtype=np.float64)
    try:
        mu = float(spla.eigsh(inv, k=1, which="LA", tol=1e-4, v0=v0, return_eigenvectors=False)[0])
    except spla.ArpackNoConvergence:  # full rank is proven; the conditioning needs the spectrum
        w = np.linalg.eigvalsh(g)
        return float(math.sqrt(max(w[0], 0.0) / max(float(w[-1]), scale * scale)))
    return float(math.sqrt((1.0 / mu + tau) / ref2))


@dataclass
class _GapRank:
    """A rank decided from the Gram's eigendecomposition where its spectrum has a clear gap."""

    rank: int
    rel: float | None  # smallest kept sigma / reference
    kept: np.ndarray  # (n, rank) orthonormal eigenvectors of the kept part
    kept_lam: np.ndarray  # their eigenvalues (sigma^2)
    null: np.ndarray  # (n, n - rank) orthonormal basis of the certified null directions


def _gram_gap(a: np.ndarray, scale: float = 0.0, amp: float = 1.0, gram: np.ndarray | None = None) -> _GapRank | None:
    """The SVD rule's rank (_tol_rank) from the eigendecomposition of G = a^T a, when it can be certified.

    G's computed eigenvalues are within delta = 10 (m + n) eps ref^2 of the true sigma^2 (Weyl), so an
    eigenvalue above 1e4 delta is a singular value far above the rule's tolerance; the eigenvectors V_s of
    the eigenvalues below 1e2 delta span directions with |a V_s| measured directly (an SVD of a V_s): when
    it is below the tolerance, at least dim V_s singular values are (minimax). Both together give the
    rank exactly; any eigenvalue in between, or |a V_s| at or above the tolerance, returns None (the
    caller takes the SVD of a itself). Costs a Gram (`gram`, when the caller has it), an eigendecomposition
    and a thin SVD instead of a's SVD.
    """
    m, n = a.shape
    g = gram if gram is not None else a.T @ a
    lam, vec = sla.eigh(g, driver="evd", check_finite=False)
    ref2 = max(float(lam[-1]) if lam.size else 0.0, scale * scale)
    if ref2 <= 0:
        return None
    delta = 10.0 * (m + n) * _EPS * ref2
    big, small = lam > 1e4 * delta, lam <= 1e2 * delta
    if not bool((big | small).all()):
        return None
    vs = vec[:, small]
    tol = max(m, n) * _EPS * math.sqrt(ref2) * amp
    if vs.shape[1]:
        _u, s_small, vt_small = np.linalg.svd(a @ vs, full_matrices=False)
        if float(s_small[0]) >= tol:
            return None
        null = vs @ vt_small.T
    else:
        null = np.zeros((n, 0))
    kept_lam = lam[big]
    rel = float(math.sqrt(kept_lam[0] / ref2)) if kept_lam.size else None
    return _GapRank(int(big.sum()), rel, vec[:, big], kept_lam, np.ascontiguousarray(null))


def _rank_values(a: np.ndarray, scale: float = 0.0, amp: float = 1.0) -> tuple[int, float | None]:
    """Numerical rank of a (no vectors); a Gram eigen-decomposition settles clearly full-rank cases."""
    m, n = a.shape
    if m == 0 or n == 0:
        return 0, None
    if min(m, n) >= _GRAM_MIN:
        rel = _gram_full_rank(a, scale, amp)
        if rel is not None:
            return min(m, n), rel
    s = np.linalg.svd(a, compute_uv=False)
    return _tol_rank(s, (m, n), scale, amp)


def _rank_null(
    a: np.ndarray, want_null: bool, scale: float = 0.0, amp: float = 1.0
) -> tuple[int, float | None, np.ndarray | None]:
    """Numerical rank of a, sigma_min_rel and (if wanted) an orthonormal basis of its null space.

    scale, amp: see _tol_rank (0, 1: a's own largest singular value, the usual tolerance).
    """
    m, n = a.shape
    if n == 0:
        return 0, None, np.zeros((0, 0))
    if m == 0 or not np.any(a):
        return 0, None, (np.eye(n) if want_null else None)
    top = float(np.abs(a).max())
    a, scale = a / top, scale / top
    if not want_null:
        r, rel = _rank_values(a, scale, amp)
        return r, rel, None
    if m >= n >= _GRAM_MIN:
        g = a.T @ a
        rel = _gram_full_rank(a, scale, amp, gram=g)
        if rel is not None:
            return n, rel, np.zeros((n, 0))
        gap = _gram_gap(a, scale, amp, gram=g)
        if gap is not None:
            return gap.rank, gap.rel, gap.null
    _u, s, vt = np.linalg.svd(a, full_matrices=m < n)
    r, rel = _tol_rank(s, (m, n), scale, amp)
    return r, rel, np.ascontiguousarray(vt[r:].T)


def _rank_null_stack(
    a: np.ndarray, want_null: bool, scale: float = 0.0, amp: float = 1.0
) -> list[tuple[int, float | None, np.ndarray | None]]:
    """_rank_null of each matrix of a stack (G, m, n) of small blocks, by one stacked SVD: the same rule
    (each block scaled by its largest entry, _tol_rank on its singular values) and the same LAPACK
    routine per block, without a Python call per block. Blocks at or above _GRAM_MIN columns (where
    _rank_null may take the Gram route) go through _rank_null itself, so the results are identical."""
    n_blk, m, n = a.shape
    if n_blk == 0:
        return []
    if n == 0 or m == 0 or min(m, n) >= _GRAM_MIN or (want_null and n >= _GRAM_MIN):
        return [_rank_null(b, want_null, scale, amp) for b in a]
    top = np.abs(a).reshape(n_blk, -1).max(axis=1)
    zero = top == 0
    safe = np.where(zero, 1.0, top)
    a = a / safe[:, None, None]
    if want_null:
        _u, s, vt = np.linalg.svd(a, full_matrices=m < n)
    else:
        s, vt = np.linalg.svd(a, compute_uv=False), None
    ref = np.maximum(s[:, 0], scale / safe)
    tol = max(m, n) * _EPS * ref * amp
    ranks = (s > tol[:, None]).sum(axis=1)
    out: list[tuple[int, float | None, np.ndarray | None]] = []
    for i in range(n_blk):
        if zero[i] or ref[i] <= 0:
            out.append((0, None, np.eye(n) if want_null else None))
            continue
        r = int(ranks[i])
        rel = float(s[i, r - 1] / ref[i]) if r else None
        out.append((r, rel, np.ascontiguousarray(vt[i, r:].T) if vt is not None else None))
    return out


def _submatrix_rank(a_rows: int, a_cols: int, get: Callable[[np.ndarray, np.ndarray], np.ndarray], limit: int) -> int:
    """Rank of an evenly spaced submatrix of at most `limit` entries: a sound lower bound on the rank."""
    r = min(a_rows, max(1, math.isqrt(max(limit, 1))))
    c = min(a_cols, max(1, limit // r))
    ri = np.unique(np.linspace(0, a_rows - 1, r).round().astype(np.int64))
    ci = np.unique(np.linspace(0, a_cols - 1, c).round().astype(np.int64))
    sub = get(ri, ci)
    if not np.any(sub):
        return 0
    return _rank_values(sub / np.abs(sub).max())[0]


@dataclass
class _Block:
    """One solved residue block of K (for one channel mask)."""

    rank: int | None  # exact numerical rank, None when only bounded
    lower: int
    upper: int
    rel: float | None
    null: np.ndarray | None  # (len(cols), nullity) orthonormal, None if not computed
    cols: np.ndarray  # columns of the block in (n, t) = n * S + t coordinates
    pinv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (U_r, s_r, Vt_r) of the scaled block
    scale: float = 1.0  # the block was divided by this before its factorisation


def _solve_block(b: np.ndarray, cols: np.ndarray, need_null: bool, limit: int, factors: bool = False) -> _Block:
    """Rank (and null basis) of one residue block; with `factors`, also its rank-r SVD for solving,
    the rank decided by the same rule (_tol_rank) as the Gram route would (it proves full rank only
    far above that rule's threshold)."""
    r, c = b.shape
    if c == 0:
        return _Block(0, 0, 0, None, np.zeros((0, 0)), cols, (np.zeros((r, 0)), np.zeros(0), np.zeros((0, 0))))
    if r == 0 or not np.any(b):
        return _Block(0, 0, 0, None, np.eye(c) if need_null else None, cols, (np.zeros((r, 0)), np.zeros(0), np.zeros((0, c))))
    top = float(np.abs(b).max())
    b = b / top
    hi = min(r, c)
    if r * c > limit:  # too big for a dense factorisation: a submatrix gives a sound lower bound
        lo = _submatrix_rank(r, c, lambda ri, ci: b[np.ix_(ri, ci)], limit)
        return _Block(None, lo, hi, None, None, cols)
    if factors:
        u, sv, vt = np.linalg.svd(b, full_matrices=need_null and r < c)
        rk, rel = _tol_rank(sv, (r, c))
        null = np.ascontiguousarray(vt[rk:].T) if need_null else None
        return _Block(rk, rk, rk, rel, null, cols, (u[:, :rk], sv[:rk], vt[:rk]), top)
    if need_null and c * c <= limit:
        rk, rel, null = _rank_null(b, True)
        return _Block(rk, rk, rk, rel, null, cols)
    rk, rel = _rank_values(b)
    return _Block(rk, rk, rk, rel, None, cols)


# ====================================================================== the forward rows alone
@dataclass
class ForwardProof:
    """The forward rows alone determine x: F (rows of W at known entries of z, columns of unknown
    entries of x, carried directions projected out) has full column rank, proven by a factorisation."""

    rel: float  # sigma_min / sigma_max of F (a lower bound where carried directions enter), > 1e-4
    factor: Any  # SuperLU factor of F^T F - tau I (symmetric, no pivoting)
    operator: Any  # F, scipy CSR
    tau: float
    carried: np.ndarray | None = None  # Q, the carried directions of the rows
    woodbury: tuple[np.ndarray, object] | None = None  # ((F^T F - tau I)^{-1} F^T Q, Cholesky of the capacitance)
    angles: tuple[np.ndarray, tuple] | None = None  # (N, SVD of N^T Q): N an orthonormal basis of range(F)^perp

    def inverse(self, v: np.ndarray) -> np.ndarray:
        """(F^T P F - tau I)^{-1} v, P = I - Q Q^T (Woodbury through the capacitance)."""
        out = self.factor.solve(v)
        if self.woodbury is not None:
            w, cap = self.woodbury
            out = out + w @ sla.cho_solve(cap, w.T @ v, check_finite=False)
        return out

    def solve(self, zr: np.ndarray) -> np.ndarray:
        """argmin_x ||P (F x - zr)||.

        With the left null space N of F (`angles`): F x = zr + Q a needs N^T (zr + Q a) = 0, so a is a
        least-squares solve with the small N^T Q and x = F^+ (zr + Q a), the pair refined twice on its
        residual. Otherwise refinement on F^T P F through `inverse`: each step shrinks the error by
        tau / (lambda_min - tau)."""
        fs, q = self.operator, self.carried
        if self.angles is not None and q is not None:
            return self._solve_by_angles(zr)

        def apply(v: np.ndarray) -> np.ndarray:  # F^T P F v
            fv = np.asarray(fs @ v).reshape(-1)
            if q is not None:
                fv = fv - q @ (q.T @ fv)
            return np.asarray(fs.T @ fv).reshape(-1)

        if q is not None:
            zr = zr - q @ (q.T @ zr)
        b = np.asarray(fs.T @ zr).reshape(-1)
        x = self.inverse(b)
        for _ in range(8):
            step = self.inverse(b - apply(x))
            x = x + step
            if np.linalg.norm(step) <= 1e-15 * np.linalg.norm(x):
                break
        return x

    def _solve_by_angles(self, zr: np.ndarray) -> np.ndarray:
        assert self.angles is not None and self.carried is not None
        fs, q = self.operator, self.carried
        nb, (u, sv, vt) = self.angles

        def once(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            a = -(vt.T @ ((u.T @ (nb.T @ r)) / sv))
            return _refined_normal_solve(fs, self.factor, np.asarray(fs.T @ (r + q @ a)).reshape(-1)), a

        x, a = once(zr)
        for _ in range(2):
            dx, da = once(zr + q @ a - np.asarray(fs @ x).reshape(-1))
            x, a = x + dx, a + da
        return x


_LEFT_NULL_MAX = 1 << 24  # entries of the cached basis of range(F)^perp (128 MiB)


def _operator_key(fs) -> tuple:
    """A cache key for one sparse forward operator (its pattern and values)."""
    return (fs.shape, fs.nnz, hash(fs.indices.tobytes()), hash(fs.data.tobytes()))


def _refined_normal_solve(fs, lu, b: np.ndarray, steps: int = 2) -> np.ndarray:
    """(F^T F)^{-1} b from the factor of F^T F - tau I, refined `steps` times."""
    x = lu.solve(b)
    for _ in range(steps):
        x = x + lu.solve(b - fs.T @ (fs @ x))
    return x


def _principal_angles(fs, lu, tau: float, carried: np.ndarray, cache: dict) -> tuple[np.ndarray, tuple] | None:
    """Prove F^T P F > tau I through the angles between range(F) and the carried directions Q.

    For unit-norm Q columns and N an orthonormal basis of range(F)^perp, sigma_min(P F) >= sigma_min(F) *
    sigma_min(N^T Q) (sigma_min(N^T Q) is the sine of the smallest angle between range(F) and range(Q)).
    N and a proven lam <= lambda_min(F^T F) (positive pivots of F^T F - lam I, lam half a Lanczos
    estimate) are computed once per operator and kept in `cache`; each call then costs one product
    N^T Q and its SVD instead of a factor solve per carried direction. Returns (N, SVD of N^T Q) when
    lam * (sigma_min(N^T Q) - leak)^2 > tau, else None (the caller decides by the capacitance instead).
    """
    key = ("left-null", *_operator_key(fs))
    if key not in cache:
        cache[key] = _left_null(fs, lu, tau)
    nb, lam, leak = cache[key]
    if nb.shape[1] < carried.shape[1]:
        return None
    u, sv, vt = np.linalg.svd(nb.T @ carried, full_matrices=False)
    if not sv.size or lam * max(float(sv[-1]) - leak, 0.0) ** 2 <= tau:
        return None
    return nb, (u, sv, vt)


def _left_null(fs, lu, tau: float) -> tuple[np.ndarray, float, float]:
    """(N, lam, leak): N an orthonormal basis of range(F)^perp, lam <= lambda_min(F^T F) proven by the
    positive pivots of F^T F - lam I (lam half a Lanczos estimate; tau when that fails), and leak >=
    |U_F^T N| (U_F an orthonormal basis of range F) from |F^T N| <= leak sqrt(lam): how far N is from
    exact, which shifts every singular value of N^T Q by at most that much."""
    import scipy.sparse as sp

    m, c = fs.shape
    op = spla.LinearOperator((c, c), matvec=lu.solve, dtype=np.float64)
    lam = tau
    try:
        mu = float(spla.eigsh(op, k=1, which="LA", tol=1e-2, v0=np.random.default_rng(0).standard_normal(c), return_eigenvectors=False)[0])
    except spla.ArpackNoConvergence:
        mu = 0.0
    if mu > 0 and 0.5 / mu > tau:
        shifted = ((fs.T @ fs) - (0.5 / mu) * sp.identity(c, format="csc")).tocsc()
        try:
            low = spla.splu(shifted, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        except (RuntimeError, MemoryError):
            pass
        else:
            if np.array_equal(low.perm_r, low.perm_c) and bool((low.U.diagonal() > 0).all()):
                lam = 0.5 / mu
    try:  # the projection onto range(F)^perp with the unshifted factor: rounding error only
        proj = spla.splu((fs.T @ fs).tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    except (RuntimeError, MemoryError):
        proj = lu
    nb = np.random.default_rng(1).standard_normal((m, m - c))
    leak = math.inf
    for _ in range(3):  # one projection is usually enough
        nb = np.linalg.qr(nb - fs @ proj.solve(np.asarray(fs.T @ nb)))[0]
        leak = float(np.linalg.norm(np.asarray(fs.T @ nb))) / math.sqrt(lam)
        if leak <= 1e-8:
            break
    return nb, lam, leak


def _base_factor(fs, cache: dict | None):
    """lambda_max of F^T F and the symmetric factor of F^T F - tau I, or why it fails (kept in `cache`)."""
    import scipy.sparse as sp

    key = ("forward-ldl", *_operator_key(fs))
    if cache is not None and key in cache:
        return cache[key]
    m, c = fs.shape
    a = (fs.T @ fs).tocsc()
    v0 = np.random.default_rng(0).standard_normal(c)
    try:
        lam_max = float(spla.eigsh(a, k=1, which="LA", tol=1e-4, v0=v0, return_eigenvectors=False)[0])
    except (spla.ArpackNoConvergence, ValueError):
        lam_max = float(abs(a).sum(axis=0).max())  # an upper bound on lambda_max
    ref2 = lam_max * (1 + 1e-3)
    floor = max(_GRAM_SAFE, (100.0 * max(m, c) * _EPS) ** 2)
    out: tuple | str
    if ref2 <= 0:
        out = "the forward rows are zero"
    else:
        tau = floor * ref2
        shifted = (a - tau * sp.identity(c, format="csc")).tocsc()
        try:
            lu = spla.splu(shifted, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        except MemoryError:
            out = "the sparse factorisation of the forward rows does not fit in memory"
        except RuntimeError as exc:
            out = f"the forward rows are singular ({exc})"
        else:
            if not np.array_equal(lu.perm_r, lu.perm_c) or not bool((lu.U.diagonal() > 0).all()):
                out = "the forward rows alone are not proven to have full column rank (a pivot <= 0)"
            else:
                out = (lu, tau, ref2, floor)
    if cache is not None:
        cache[key] = out
    return out


def forward_full_rank(
    spec: ConvSpec,
    n: int,
    rows: np.ndarray,
    cols: np.ndarray | None = None,
    carried: np.ndarray | None = None,
    cache: dict | None = None,
    measure: bool = True,
) -> ForwardProof | str:
    """Prove that the forward rows alone have full column rank, without forming F Z.

    rows: indices (into N * n_out) of the entries of z the rows see; cols: indices (into N * n_in) of the
    unknown entries of x (None: all); carried: (len(rows), d) orthonormal directions of those entries
    left undetermined above, projected out of the rows. A = F^T F is factorised as A - tau I with tau =
    floor * lambda_max (floor = max(GRAM_SAFE, (100 max(m, n) eps)^2), the Gram route's own margin) by
    SuperLU in symmetric mode with diagonal pivots only: a symmetric LDL^T, so positive pivots prove
    A - tau I positive definite (Sylvester). The carried directions U = F^T Q lower A to A - U U^T,
    which stays above tau I exactly when the capacitance matrix I - U^T (A - tau I)^{-1} U is positive
    definite (a Cholesky). Returns why not when it is not proven (the caller decides with dense algebra).
    `cache` keeps the factor of A - tau I between calls on the same rows (the attack's pattern passes);
    `measure` False skips measuring sigma_min (the proven bound sqrt(floor) is kept): the decision is the same.
    """
    fs = sparse_forward(spec, n).tocsr()[rows]
    if cols is not None:
        fs = fs[:, cols]
    m, c = fs.shape
    if c == 0 or m < c:
        return f"{m} forward rows for {c} unknowns"
    base = _base_factor(fs, cache)
    if isinstance(base, str):
        return base
    lu, tau, ref2, floor = base
    proof = ForwardProof(rel=math.sqrt(floor), factor=lu, operator=fs, tau=tau)
    d = 0 if carried is None else carried.shape[1]
    if carried is not None and d and cache is not None and not measure and m * (m - c) <= _LEFT_NULL_MAX:
        angles = _principal_angles(fs, lu, tau, carried, cache)
        if angles is not None:
            proof.carried, proof.angles = carried, angles
            _nb, lam, leak = cache[("left-null", *_operator_key(fs))]
            proof.rel = math.sqrt(lam / ref2) * (float(angles[1][1][-1]) - leak)
            return proof
    if d:
        u = np.asarray(fs.T @ carried)  # (c, d)
        w = lu.solve(u)
        cap = np.eye(u.shape[1]) - u.T @ w
        try:
            cap_factor = sla.cho_factor(0.5 * (cap + cap.T), lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return "the carried directions take the forward rows below full column rank"
        proof.carried, proof.woodbury = carried, (w, cap_factor)
    if not measure:
        return proof
    op = spla.LinearOperator((c, c), matvec=proof.inverse, dtype=np.float64)
    try:  # sigma_min: the largest eigenvalue of the inverse, to two digits
        mu = float(spla.eigsh(op, k=1, which="LA", tol=1e-2, v0=np.random.default_rng(0).standard_normal(c), return_eigenvectors=False)[0])
        proof.rel = math.sqrt((1.0 / mu + tau) / ref2)
    except spla.ArpackNoConvergence:
        pass  # proven: sigma_min / sigma_max > sqrt(floor), the value kept
    return proof


# ====================================================================== public: blocks and counts
def gradient_blocks(spec: ConvSpec, k: torch.Tensor) -> list[tuple[list[int], np.ndarray]]:
    """The distinct dense blocks of K, one per group: (input channels sharing it, block).

    block: (C_out/groups * prod(kernel), N * prod(in_spatial)), rows ordered (o, u1, .., um) as in
    the weight, columns (n, t1, .., tm) as in x. Built by index arithmetic, no autograd.
    """
    k_np = k.detach().to(torch.float64).reshape(-1, *spec.out_shape).cpu().numpy()
    qmaps = [_qmap(*dm) for dm in _dims(spec)]
    (whole,) = _classes(spec, split=False)
    cig = spec.in_channels // spec.groups
    return [
        (list(range(g * cig, (g + 1) * cig)), _gather_block(_padded_k(spec, k_np, g), qmaps, whole))
        for g in range(spec.groups)
    ]


def _class_counts(spec: ConvSpec) -> list[tuple[int, int]]:
    """Per residue class: (kernel offsets that meet some real position, real positions covered by some window)."""
    per_dim = []
    for h, kk, s, p, d, o in _dims(spec):
        valid = _qmap(h, kk, s, p, d, o) < o  # (k, h)
        u_alive = valid.any(axis=1)
        t_cov = valid.any(axis=0)
        ru = (d * np.arange(kk)) % s
        rt = (np.arange(h) + p) % s
        per_dim.append([(int((u_alive & (ru == r)).sum()), int((t_cov & (rt == r)).sum())) for r in range(s)])
    out = []
    for combo in itertools.product(*per_dim):
        out.append((int(np.prod([c[0] for c in combo], dtype=np.int64)), int(np.prod([c[1] for c in combo], dtype=np.int64))))
    return out


def gradient_rank_counting(spec: ConvSpec | ConvTransposeSpec, n_samples: int = 1) -> int:
    """Closed form of rank(K) (rgap-notes section 3), generalised to N-d, dilation, groups and N samples.

    rank(K) = C_in * sum over stride residue classes of min(C_out/groups * a, n_samples * c), with a the
    kernel offsets of the class that meet a real input position and c the real positions of the class
    covered by some window. A Linear layer: C_in * min(C_out, n_samples).

    For every instance this is an upper bound (no block has more rank than non-zero rows or columns).
    It is the generic value (random k) where gradient_counting_holds(spec): dilation 1 and every
    output dim longer than the kernel; the tests check this for 1-3 spatial dims, stride, padding,
    groups and N >= 1. Outside it the value can be too high: with dilation, and when a kernel is at
    least as long as the output, where <k_o', g_o> = <k_o, g_o'> (g_o = k_o correlated with x) ties
    pairs of output channels.
    """
    if isinstance(spec, ConvTransposeSpec):
        return _transposed_rank_counting(spec, n_samples)
    cog = spec.out_channels // spec.groups
    return spec.in_channels * sum(min(cog * a, n_samples * c) for a, c in _class_counts(spec))


def _transposed_rank_counting(spec: ConvTransposeSpec, n_samples: int) -> int:
    """rank(K) <= C_in * min(C_out/groups * a, n_samples * c) for a transposed convolution.

    a: kernel offsets u that meet some output (0 <= s*i - p + d*u < out for some input position i), c:
    input positions that reach some output (per dim, multiplied): the non-zero rows and columns of one
    channel's block (the equivalent stride-1 convolution's, its columns at inserted zeros dropped, so it
    does not split by residue class). An upper bound for every instance; it equalled the numeric rank
    on 269 of 271 random small configurations (random k), the two misses with one output channel per
    group, two samples and a kernel longer than the 2x2 input, like the convolution's exceptions.
    """
    a_all, c_all = 1, 1
    for h, kk, s, p, d, o in zip(spec.in_spatial, spec.kernel, spec.stride, spec.padding, spec.dilation, spec.out_spatial):
        j = s * np.arange(h)[None, :] - p + d * np.arange(kk)[:, None]  # (k, h): output index
        valid = (j >= 0) & (j < o)
        a_all *= int(valid.any(axis=1).sum())
        c_all *= int(valid.any(axis=0).sum())
    cog = spec.out_channels // spec.groups
    return spec.in_channels * min(cog * a_all, n_samples * c_all)


def layer_rank_counting(spec: ConvSpec) -> int:
    """The notes' closed form for rank([K; W]) with the whole z known, one sample.

    rank_G = gradient_rank_counting, rank_W = min(C_out * prod(out), covered input entries),
    overlap = min(C_out^2, rank_G, rank_W) (for any C_out x C_out matrix A, <dL/dW, A W> = <k, A z>),
    rank = min(covered entries, rank_G + rank_W - overlap). A grouped conv is `groups` independent
    convolutions on disjoint channels, so the formula is applied per group and summed (exact
    decomposition).

    A claim, not a theorem: it matches the numeric rank where layer_counting_holds(spec) (Linear;
    conv with dilation 1, C_out/groups >= 2 and per dim stride < kernel < output, padding <= kernel-2,
    the regime of CNN6), and can miss by a few either way outside it (stride >= kernel, padding =
    kernel-1, one output channel per group, dilation). Use layer_rank for the actual number.
    """
    g = spec.groups
    cig, cog = spec.in_channels // g, spec.out_channels // g
    covered_sp = 1
    for h, kk, s, p, d, o in _dims(spec):
        covered_sp *= int((_qmap(h, kk, s, p, d, o) < o).any(axis=0).sum())
    covered = cig * covered_sp
    rank_g = cig * sum(min(cog * a, c) for a, c in _class_counts(spec))
    rank_w = min(cog * int(np.prod(spec.out_spatial, dtype=np.int64)), covered)
    overlap = min(cog * cog, rank_g, rank_w)
    return g * min(covered, rank_g + rank_w - overlap)


def gradient_counting_holds(spec: ConvSpec) -> bool:
    """Whether gradient_rank_counting is claimed to equal the generic rank(K) (see there)."""
    return all(d == 1 and o > kk for (_h, kk, _s, _p, d, o) in _dims(spec))


def layer_counting_holds(spec: ConvSpec) -> bool:
    """Whether layer_rank_counting is claimed to equal the generic rank([K; W]) (see there)."""
    if spec.ndim == 0:
        return True
    if spec.out_channels // spec.groups < 2:
        return False
    return all(d == 1 and s < kk < o and p <= max(0, kk - 2) for (_h, kk, s, p, d, o) in _dims(spec))


# ====================================================================== forward through the null space
def _forward_columns(
    spec: ConvSpec,
    pieces: list[tuple[int, list[int], np.ndarray]],
    fwd: ForwardInfo,
    n: int,
    d_cols: int,
    big_d: int,
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """M = (projected) C W Z for the given null pieces (group, channels, Z (N*S, d)), as (D, d_cols).

    Returns M and a column map: (channel, piece index, j0, j1, first column) per run of columns.
    """
    m_mat = np.empty((big_d, d_cols))
    colmap: list[tuple[int, int, int, int, int]] = []
    g_cnt = spec.groups
    cog = spec.out_channels // g_cnt
    cig = spec.in_channels // g_cnt
    out_sp = spec.out_spatial
    n_out_g = cog * int(np.prod(out_sp, dtype=np.int64))
    w = spec.weight.to(torch.float64)
    unk = None if fwd.unknown is None else fwd.unknown.detach().to(torch.float64).cpu().numpy().reshape(big_d, -1)
    col = 0
    for pi, (g, chans, z) in enumerate(pieces):
        dz_cols = z.shape[1]
        if dz_cols == 0:
            continue
        local = [c - g * cig for c in chans]
        wp = w[g * cog : (g + 1) * cog, local]  # (Cog, nch, *k)
        wp = wp.transpose(0, 1).reshape(len(chans) * cog, 1, *spec.kernel)
        step = max(1, _CHUNK_ELEMS // max(1, len(chans) * n * spec.n_out))
        for j0 in range(0, dz_cols, step):
            j1 = min(dz_cols, j0 + step)
            m = j1 - j0
            y = torch.from_numpy(np.ascontiguousarray(z[:, j0:j1].T)).reshape(m * n, 1, *spec.in_spatial)
            with torch.no_grad():
                if spec.ndim == 0:
                    out = TF.linear(y, wp.reshape(len(chans) * cog, 1))
                else:
                    conv = (TF.conv1d, TF.conv2d, TF.conv3d)[spec.ndim - 1]
                    out = conv(y, wp, None, spec.stride, spec.padding, spec.dilation, 1)
            out = out.reshape(m, n, len(chans), n_out_g).permute(2, 0, 1, 3)  # (nch, m, N, Cog*out)
            dz = torch.zeros(len(chans) * m, n, spec.out_channels, int(np.prod(out_sp, dtype=np.int64)), dtype=torch.float64)
            dz[:, :, g * cog : (g + 1) * cog] = out.reshape(len(chans) * m, n, cog, -1)
            dz = dz.reshape(len(chans) * m, n, *spec.out_shape)
            xp = dz if fwd.jac is None else fwd.jac(dz)
            block = xp.detach().reshape(len(chans) * m, big_d).cpu().numpy().T
            if unk is not None:
                block = block - unk @ (unk.T @ block)
            m_mat[:, col : col + len(chans) * m] = block
            for i, c in enumerate(chans):
                colmap.append((c, pi, j0, j1, col + i * m))
            col += len(chans) * m
    return m_mat[:, :col], colmap


def _elementwise_map(spec: ConvSpec, fwd: ForwardInfo, n: int, big_d: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For a link that scales entries of z one by one (fwd.entries): per entry of x', the entry of z it
    reads and its factor (structure.entry_map through fwd.jac). None when the link is not elementwise."""
    push = (lambda t: t) if fwd.jac is None else fwd.jac
    got = entry_map(push, (1, n, *spec.out_shape))
    return None if got is None or got[0].size != big_d else got


def _grouped_route(spec: ConvSpec, fwd: ForwardInfo, solving: bool) -> bool:
    """Whether _grouped_forward_rank may apply: a grouped convolution whose forward rows are entries of z
    with nothing carried from above (it still returns None when the link is not elementwise)."""
    return spec.groups > 1 and not solving and fwd.entries is not None and fwd.entries[1] is None and fwd.unknown is None


def _grouped_forward_rank(
    spec: ConvSpec,
    pieces: list[tuple[int, list[int], np.ndarray]],
    fwd: ForwardInfo,
    n: int,
    big_d: int,
    want_null: bool,
    scale: float,
    amp: float,
    exact_limit: int,
) -> tuple[int, float | None, np.ndarray | None, list[tuple[int, int, int, int, int]]] | None:
    """rank(F Z) of a grouped convolution whose forward rows are entries of z (an elementwise link, nothing
    carried from above): each group's null directions reach only its own output channels, so F Z is
    block-diagonal by group and its rank is the sum of the groups' ranks (one small SVD each, the same
    rule as K's residue blocks). A depthwise layer of 960 channels is 960 blocks of a few columns, where
    the whole F Z would be a dense (|x'|, d) matrix. The columns W Z of many groups come from one
    grouped convolution (each null vector its own group). None when the structure does not apply."""
    if spec.ndim == 0:
        return None
    emap = _elementwise_map(spec, fwd, n, big_d)
    if emap is None:
        return None
    idx, fac = emap
    g_cnt, cog, cig = spec.groups, spec.out_channels // spec.groups, spec.in_channels // spec.groups
    out_sp = int(np.prod(spec.out_spatial, dtype=np.int64))
    s_sp = int(np.prod(spec.in_spatial, dtype=np.int64))
    live = np.flatnonzero(idx >= 0)
    zi = idx[live]
    n_row, rem = np.divmod(zi, spec.n_out)
    co_row, sp_row = np.divmod(rem, out_sp)
    g_row, col_row = np.divmod(co_row, cog)
    order = np.argsort(g_row, kind="stable")
    row_bounds = np.searchsorted(g_row[order], np.arange(g_cnt + 1))
    w = spec.weight.to(torch.float64)
    conv = (TF.conv1d, TF.conv2d, TF.conv3d)[spec.ndim - 1]
    by_group: dict[int, list[int]] = {}
    for pi, (g, _chans, z) in enumerate(pieces):
        if z.shape[1]:
            by_group.setdefault(g, []).append(pi)
    colmap: list[tuple[int, int, int, int, int]] = []
    runs: list[tuple[int, int, int, int, int]] = []  # (piece, channel, group, first column, columns)
    col = 0
    for g in sorted(by_group):
        for pi in by_group[g]:
            _g, chans, z = pieces[pi]
            for c in chans:
                runs.append((pi, c, g, col, z.shape[1]))
                colmap.append((c, pi, 0, z.shape[1], col))
                col += z.shape[1]
    per_col = n * max(s_sp, cog * out_sp)
    budget = max(per_col, _CHUNK_ELEMS)
    rank = 0
    rels: list[float] = []
    nulls: list[tuple[int, np.ndarray]] = []  # (first column of the group's block, its null basis)
    i = 0
    while i < len(runs):  # chunks of whole groups, each at most `budget` entries of conv input/output
        j, width = i, 0
        while j < len(runs) and (width == 0 or (width + runs[j][4]) * per_col <= budget or runs[j][2] == runs[j - 1][2]):
            width += runs[j][4]
            j += 1
        chunk, c_base = runs[i:j], runs[i][3]
        y = np.empty((n, width, s_sp))
        kern = torch.empty(width * cog, 1, *spec.kernel, dtype=torch.float64)
        groups_of = np.empty(width, dtype=np.int64)
        for pi, c, g, c0, m in chunk:
            a = c0 - c_base
            y[:, a : a + m] = pieces[pi][2].reshape(n, s_sp, m).transpose(0, 2, 1)
            kern[a * cog : (a + m) * cog] = w[g * cog : (g + 1) * cog, c - g * cig].expand(m, cog, *spec.kernel).reshape(m * cog, 1, *spec.kernel)
            groups_of[a : a + m] = g
        with torch.no_grad():
            out = conv(torch.from_numpy(y).reshape(n, width, *spec.in_spatial), kern, None, spec.stride, spec.padding, spec.dilation, width)
        out_np = out.reshape(n, width, cog, out_sp).numpy()
        present = np.unique(groups_of)
        edges = np.searchsorted(groups_of, np.append(present, g_cnt))  # groups_of is sorted: runs go group by group
        n_rows = row_bounds[present + 1] - row_bounds[present]
        n_cols = edges[1:] - edges[:-1]
        shapes = np.stack([n_rows, n_cols], axis=1)
        kinds, kind_of = np.unique(shapes, axis=0, return_inverse=True)
        for (nr, nc), members in zip(kinds.tolist(), [np.flatnonzero(kind_of.reshape(-1) == q) for q in range(len(kinds))]):
            # the groups whose blocks have this shape, gathered and ranked together
            if nr * nc > exact_limit:
                return None
            first = edges[members]
            got: list[tuple[int, float | None, np.ndarray | None]]
            if nr == 0:
                got = [(0, None, np.eye(nc))] * members.size
            else:
                r = order[row_bounds[present[members]][:, None] + np.arange(nr)[None, :]]  # (G, nr)
                cols = first[:, None] + np.arange(nc)[None, :]  # (G, nc)
                stack = out_np[n_row[r][:, :, None], cols[:, None, :], col_row[r][:, :, None], sp_row[r][:, :, None]]
                got = _rank_null_stack(stack * fac[live[r]][:, :, None], want_null, scale, amp)
            for c0, (rk, rel, nb) in zip(first.tolist(), got):
                rank += rk
                if rel is not None:
                    rels.append(rel)
                if want_null and nb is not None and nb.shape[1]:
                    nulls.append((c_base + c0, nb))
        i = j
    null_f: np.ndarray | None = None
    n_null = sum(nb.shape[1] for _c, nb in nulls)
    if want_null and n * spec.n_in * n_null <= exact_limit:  # the layer's null basis is kept only that small
        nulls.sort(key=lambda t: t[0])  # columns in group order, as one group at a time would give
        null_f = np.zeros((col, n_null))
        k0 = 0
        for c0, nb in nulls:
            null_f[c0 : c0 + nb.shape[0], k0 : k0 + nb.shape[1]] = nb
            k0 += nb.shape[1]
    return rank, (min(rels) if rels else None), null_f, colmap


def _f_scale(spec: ConvSpec, fwd: ForwardInfo, n: int, big_d: int, known_np: np.ndarray | None) -> float:
    """An estimate of |F| = |C W|: the largest |F v| over a few seeded random unit vectors v.

    Used only as the reference of F Z's rank tolerance (see _tol_rank); a random v sees at least
    |F|_F / sqrt(unknowns), so the tolerance max(shape) * eps * scale stays above round-off.
    """
    gen = torch.Generator().manual_seed(12345)
    v = torch.randn(8, n, *spec.in_shape, generator=gen, dtype=torch.float64)
    if known_np is not None:
        v = v * torch.from_numpy(~known_np).reshape(1, n, *spec.in_shape)
    v = v / v.reshape(8, -1).norm(dim=1).clamp_min(1e-300).reshape(8, *([1] * (v.dim() - 1)))
    with torch.no_grad():
        z = spec.forward(v.reshape(8 * n, *spec.in_shape), with_bias=False).reshape(8, n, *spec.out_shape)
    xp = z if fwd.jac is None else fwd.jac(z)
    f = xp.detach().reshape(8, big_d).cpu().numpy().T
    if fwd.unknown is not None:
        u = fwd.unknown.detach().to(torch.float64).cpu().numpy().reshape(big_d, -1)
        f = f - u @ (u.T @ f)
    return float(np.linalg.norm(f, axis=0).max())


# ====================================================================== the layer
def layer_rank(
    spec: ConvSpec,
    k: torch.Tensor,
    fwd: ForwardInfo,
    *,
    want_null: bool = True,
    exact_limit: int = 40_000_000,
    known: torch.Tensor | None = None,
    rhs: SystemRHS | None = None,
    elimination: str = "auto",
    lost_above: int | None = None,
) -> LayerRank:
    """Exact numerical rank of [K; F] for one layer, by residue blocks of K and the reduced F Z.

    `lost_above`: the layer above left up to this many directions undetermined with no basis (the walk
    then lowers the rank bound by as much, analysis.bounds): a lower bound from part of F Z that those
    lost rows would erase anyway (rank K + its rank <= unknowns <= rank K + lost_above) is not computed.

    At B > 1 with per-sample forward rows (fwd.entries, nothing carried from above) the forward rows may
    be eliminated first instead (batchrank.forward_first): `elimination` "auto" takes the route whose
    reduced system is smaller, "gradient-first" / "forward-first" force one (the tests compare them).
    Below directions carried from above with tall per-sample forward rows, batchrank.carried_elimination
    ranks [N^T Q; K F^+ Q] instead of P F Z when that is smaller ("carried" forces it); below so many that
    fewer rows are known than there are unknowns, batchrank.carried_row_space ranks the layer from those
    rows where that system is the smaller ("row-space" forces it). Below a layer whose
    null basis was too large to keep (fwd.above_rows), batchrank.composite_first ranks the layer with that
    layer's own rows instead of bounding it.

    With `rhs` the system is also solved (the attack): the minimum-norm x = K^+ dW + Z (F Z)^+ r,
    from the factorisations that decide the rank, so that the attack's nullity is the audit's by
    construction; LayerRank.solution is None when only bounds are known.

    k: dL/dz, (N, *spec.out_shape). known: optional bool mask (N, *spec.in_shape) of input entries
    the attacker already knows (constants, e.g. a ReLU's zeros): they are not unknowns.
    Falls back to method="bounds" (rank=None, proven rank_lower <= rank <= rank_upper) when a K
    block has more than exact_limit entries or the reduced system F Z has more than exact_limit
    entries. null_basis (N * n_in, deficit), orthonormal, rows of known entries zero; None when
    want_null is False, when only bounds are known, or when it would exceed exact_limit entries.
    """
    if isinstance(spec, ConvTransposeSpec):
        if rhs is not None:
            raise ValueError("solving a transposed convolution's system is not supported")
        return _transposed_layer_rank(spec, k, fwd, want_null=want_null, exact_limit=exact_limit, known=known)
    t0 = time.perf_counter()
    solving = rhs is not None
    k_np = k.detach().to(torch.float64).reshape(-1, *spec.out_shape).cpu().numpy()
    n = k_np.shape[0]
    cin, g_cnt = spec.in_channels, spec.groups
    cig = cin // g_cnt
    s_sp = int(np.prod(spec.in_spatial, dtype=np.int64))
    total_x = n * spec.n_in
    known_np = None
    if known is not None:
        known_np = known.detach().reshape(n, cin, s_sp).cpu().numpy().astype(bool)
        if not known_np.any():
            known_np = None
    unknowns = total_x - (0 if known_np is None else int(known_np.sum()))
    grad_rows = spec.n_weight
    counting = gradient_rank_counting(spec, n)

    # ---- forward side: size of x' and rows reported
    if fwd.none:
        big_d, n_unk, fwd_rows = 0, 0, 0
    else:
        if fwd.jac is None:
            big_d = n * spec.n_out
        else:
            big_d = int(fwd.jac(torch.zeros(1, n, *spec.out_shape, dtype=torch.float64)).numel())
        n_unk = 0 if fwd.unknown is None else int(fwd.unknown.shape[1])
        if fwd.unknown is not None and int(fwd.unknown.shape[0]) != big_d:
            raise ValueError(f"fwd.unknown has {fwd.unknown.shape[0]} rows, x' has {big_d} entries")
        fwd_rows = fwd.rows if fwd.rows is not None else max(0, min(big_d - n_unk, n * spec.n_out))

    # ---- K: residue blocks per (group, class, column mask); upper bound first to plan
    qmaps = [_qmap(*dm) for dm in _dims(spec)]
    classes = _classes(spec)
    cog = spec.out_channels // g_cnt
    nn_idx = np.arange(n)[:, None] * s_sp
    class_cols = [(nn_idx + cl.tflat[None, :]).ravel() for cl in classes]  # (n, t) coords
    chan_keys: list[tuple] = []  # per channel: tuple of block keys
    plan: dict[tuple, tuple[int, int, np.ndarray | None]] = {}  # key -> (group, class, kept column positions)
    upper_k = upper_k_channel = 0
    for c in range(cin):
        g = c // cig
        if known_np is None and c % cig:  # no masks: every channel of a group has its group's blocks
            chan_keys.append(chan_keys[-1])
            upper_k += upper_k_channel
            continue
        keys: list[tuple] = []
        upper_k_channel = 0
        for ci, cl in enumerate(classes):
            keep: np.ndarray | None
            key: tuple
            if known_np is None:
                keep = None
                key = (g, ci, None)
            else:
                kc = ~known_np[:, c, cl.tflat].ravel()
                keep = np.flatnonzero(kc)
                key = (g, ci, kc.tobytes())
            if key not in plan:
                plan[key] = (g, ci, keep)
            ncols = class_cols[ci].size if keep is None else keep.size
            upper_k_channel += min(cog * cl.n_rows_per_out, ncols)
            keys.append(key)
        upper_k += upper_k_channel
        chan_keys.append(tuple(keys))
    d_min = unknowns - upper_k
    # ---- the forward rows alone, when they are entries of z and K cannot settle the layer by itself:
    # a sparse proof that F has full column rank settles rank = unknowns without Z or F Z
    proof: ForwardProof | None = None
    batch_proof: float | None = None  # a batch's forward rows proven full column rank per sample (batchrank)
    notes: list[str] = []
    batch_rows = n > 1 and not solving and fwd.entries is not None and fwd.entries[1] is None  # per-sample forward rows
    per_sample = batch_rows and elimination != "gradient-first"
    carried_dirs = CarriedDirections.of(fwd.entries[1]) if fwd.entries is not None else None
    # ---- B > 1 below a layer whose null basis was too large to keep: rank with that layer's own rows
    composite = None
    if fwd.above_rows is not None and n > 1 and not solving and d_min > 0:
        from rgap_audit.batchrank import composite_first

        got_a = composite_first(spec, k_np, known_np, fwd.above_rows, want_null=want_null, exact_limit=exact_limit)
        if isinstance(got_a, str):
            notes.append(f"batch: the layer above's rows not used: {got_a}")
        else:
            composite = got_a
    # ---- a batch below carried directions, tall forward rows per sample, more directions carried than the
    # angle proof below can take (rows - d < unknowns): eliminate the forward rows (batchrank) when its
    # reduced system [N^T Q; K F^+ Q] is smaller than the gradient-first P F Z
    carried_elim = None
    # ---- a batch below so many carried directions that fewer rows are known than there are unknowns: the
    # rows themselves, [K; U^T F] with U the complement of the carried directions (batchrank.carried_row_space)
    row_space = None
    if n > 1 and not solving and fwd.entries is not None and not fwd.none and d_min > 0 and carried_dirs is not None and carried_dirs.d:
        rows_r = spec.n_weight + fwd.entries[0].size - carried_dirs.d
        # auto: where its system is smaller than the gradient-first route's P F Z (m x (unknowns - |K|) at least)
        smaller_r = rows_r * unknowns < fwd.entries[0].size * max(0, unknowns - spec.n_weight)
        if elimination == "row-space" or (elimination == "auto" and rows_r < unknowns and smaller_r and rows_r * rows_r <= exact_limit):
            from rgap_audit.batchrank import carried_row_space

            got_r = carried_row_space(spec, k_np, fwd.entries[0], carried_dirs, known_np, want_null=want_null, exact_limit=exact_limit)
            if isinstance(got_r, str):
                notes.append(f"batch: not ranked from its rows: {got_r}")
            else:
                row_space = got_r
    if row_space is None and n > 1 and not solving and fwd.entries is not None and not fwd.none and d_min > 0 and carried_dirs is not None:
        rows_idx = fwd.entries[0]
        if carried_dirs.d and rows_idx.size >= unknowns and not per_sample:
            cost = (rows_idx.size - unknowns + spec.n_weight) * carried_dirs.d
            smaller = rows_idx.size - carried_dirs.d < unknowns and cost < max(d_min, 1) * big_d
            if elimination == "carried" or (elimination == "auto" and smaller):
                from rgap_audit.batchrank import carried_elimination

                got_c = carried_elimination(spec, k_np, rows_idx, carried_dirs, known_np, want_null=want_null, exact_limit=exact_limit)
                if isinstance(got_c, str):
                    notes.append(f"batch: no carried-direction elimination: {got_c}")
                else:
                    carried_elim = got_c
    settled_above = carried_elim is not None or row_space is not None
    if fwd.entries is not None and not fwd.none and d_min > 0 and not per_sample and not settled_above:  # a batch: per-sample blocks below
        rows_idx = fwd.entries[0]
        n_carried = 0 if carried_dirs is None else carried_dirs.d
        room = carried_dirs is None or rows_idx.size - n_carried >= unknowns
        if room and n > 1 and not solving and carried_dirs is not None:
            from rgap_audit.batchrank import carried_forward_proof

            raw = carried_dirs.usable_raw  # the raw basis and its largest singular value, or the orthonormal one
            basis, hi = (raw, carried_dirs.sv_bounds[1]) if raw is not None and carried_dirs.sv_bounds else (carried_dirs.orthonormal(), 1.0)
            angles = carried_forward_proof(spec, n, rows_idx, basis, known_np, exact_limit, sv_max=hi)
            if isinstance(angles, str):
                notes.append(f"per-sample forward proof: {angles}")
            else:
                batch_proof = angles
        if room and batch_proof is None:
            cols_idx = None if known_np is None else np.flatnonzero(~known_np.reshape(-1))
            carried = None if carried_dirs is None else carried_dirs.orthonormal()
            got = forward_full_rank(spec, n, rows_idx, cols_idx, carried, cache=fwd.cache, measure=fwd.measure)
            if isinstance(got, str):
                notes.append(f"{got}: decided by the dense reduced system")
            else:
                proof = got
    # ---- a batch with per-sample forward rows: eliminate them first when that reduced system is smaller
    forward_first_route = False
    if proof is None and batch_rows and d_min > 0:
        from rgap_audit.batchrank import forward_first_cost

        assert fwd.entries is not None  # batch_rows

        if elimination == "auto":
            forward_first_route = forward_first_cost(spec, n, fwd.entries[0], known_np) < max(d_min, 1) * big_d
        else:
            forward_first_route = elimination == "forward-first"
    if proof is not None or batch_proof is not None or carried_elim is not None or composite is not None or row_space is not None:
        need_z = False  # the forward rows settle the layer: K only for its rank
    elif fwd.none:
        need_z = want_null and total_x * d_min <= exact_limit
    else:
        # Z is needed for an exact F Z; when F Z will be too big it still buys a better lower bound
        # (rank(K) + rank of F on a subset of Z), worth it only while the null bases are cheap
        z_cost = sum((class_cols[ci].size if keep is None else keep.size) ** 2 for _g, ci, keep in plan.values())
        # a grouped layer's F Z is block-diagonal by group (_grouped_forward_rank): exact whenever Z fits
        by_groups = _grouped_route(spec, fwd, solving) and z_cost <= exact_limit
        need_z = (
            d_min * big_d <= exact_limit or z_cost <= exact_limit // 40 or by_groups
            or (batch_rows and d_min * d_min <= 2 * exact_limit)
        )

    blocks: dict[tuple, _Block] = {}
    kp_cache: dict[int, np.ndarray] = {}
    whole: dict[tuple[int, int], np.ndarray] = {}  # (group, class) -> block before column masks
    for key, (g, ci, keep) in plan.items():
        if g not in kp_cache:
            kp_cache[g] = _padded_k(spec, k_np, g)
        if (g, ci) not in whole:  # channels with different known-input masks share the unmasked block
            whole[(g, ci)] = _gather_block(kp_cache[g], qmaps, classes[ci])
        b = whole[(g, ci)]
        cols = class_cols[ci]
        if keep is not None:
            b, cols = b[:, keep], cols[keep]
        blocks[key] = _solve_block(b, cols, need_z or (solving and proof is None), exact_limit, factors=solving and proof is None)

    key_counts: dict[tuple, int] = {}
    for keys_c in chan_keys:
        key_counts[keys_c] = key_counts.get(keys_c, 0) + 1
    rank_k_lo = sum(cnt * sum(blocks[key].lower for key in keys_c) for keys_c, cnt in key_counts.items())
    rank_k_hi = sum(cnt * sum(blocks[key].upper for key in keys_c) for keys_c, cnt in key_counts.items())
    k_exact = all(b.rank is not None for b in blocks.values())
    rank_k = rank_k_lo if k_exact else None
    rels = [b.rel for b in blocks.values() if b.rel is not None]
    z_ok = k_exact and all(b.null is not None for b in blocks.values())

    x_k = _gradient_solution(spec, rhs, blocks, chan_keys, classes, n) if rhs is not None and k_exact and proof is None else None

    def result(rank, lo, hi, method, null=None, solution=None) -> LayerRank:
        return LayerRank(
            unknowns=unknowns,
            grad_rows=grad_rows,
            fwd_rows=fwd_rows,
            rank_grad=rank_k,
            rank_grad_counting=counting,
            rank=rank,
            rank_lower=lo,
            rank_upper=hi,
            deficit=None if rank is None else unknowns - rank,
            method=method,
            sigma_min_rel=min(rels) if rels else None,
            null_basis=null,
            seconds=time.perf_counter() - t0,
            solution=None if solution is None else torch.from_numpy(solution.reshape(-1)),
            notes=notes,
        )

    if batch_proof is not None:
        rels.append(batch_proof)
        notes.append("batch: the forward rows alone have full column rank, proven per sample with the carried directions' angles")
        return result(unknowns, unknowns, unknowns, "batch-angles", torch.zeros(total_x, 0, dtype=torch.float64) if want_null else None)
    def eliminated(rank: int, rel: float | None, method: str, note: str, null: torch.Tensor | None) -> LayerRank:
        """The result of a batch elimination (batchrank): its rank decides the layer."""
        if rel is not None:
            rels.append(rel)
        notes.append(note)
        return result(rank, rank, rank, method, null)

    if composite is not None:
        note = (
            "batch: ranked with the layer above's own rows (its null basis was not kept): sum over samples of "
            f"rank(F_above L W) = {composite.rank_forward}, rank([K; K_above L W] Z) = {composite.rank_reduced}"
        )
        return eliminated(composite.rank, composite.sigma_min_rel, "batch-composite", note, composite.null_basis)
    if row_space is not None:
        note = (
            f"batch: ranked from its rows, K and the forward rows' {row_space.known_rows} directions the carried ones leave known: "
            f"rank {row_space.rank} of those {row_space.rows} rows"
        )
        return eliminated(row_space.rank, row_space.sigma_min_rel, "batch-rowspace", note, row_space.null_basis)
    if carried_elim is not None:
        note = (
            f"batch: the forward rows eliminated per sample below {carried_elim.carried} carried directions: "
            f"rank = unknowns - {carried_elim.carried} + rank([N^T Q; K F^+ Q]) = {carried_elim.rank_reduced}"
        )
        return eliminated(carried_elim.rank, carried_elim.sigma_min_rel, "batch-carried", note, carried_elim.null_basis)
    if proof is not None:  # rank [K; F] = unknowns whatever K is: F alone has full column rank
        rels.append(proof.rel)
        solution = _forward_solution(spec, fwd, rhs, proof, known_np, n) if solving else None
        return result(
            unknowns, unknowns, unknowns, "sparse-ldl", torch.zeros(total_x, 0, dtype=torch.float64) if want_null else None, solution
        )

    tied_upper = unknowns  # an upper bound on the rank the forward-first route proved without the exact rank
    if forward_first_route:
        from rgap_audit.batchrank import TiedBound, forward_first

        assert fwd.entries is not None
        elim = forward_first(spec, k_np, fwd.entries[0], known_np, want_null=want_null, exact_limit=exact_limit)
        if isinstance(elim, str):
            notes.append(f"forward-first elimination: {elim}")
        elif isinstance(elim, TiedBound):
            notes.append(f"forward-first elimination: {elim.why}; rank <= {elim.upper}")
            tied_upper = elim.upper
        else:
            note = (
                f"batch elimination, forward rows first: sum over samples of rank(F_n) = {elim.rank_forward} "
                f"({elim.patterns} distinct per-sample block(s)), rank(K Z_F) = {elim.rank_reduced}"
            )
            return eliminated(elim.rank, elim.sigma_min_rel, "batch-elimination", note, elim.null_basis)

    if not k_exact or rank_k is None:
        hi = rank_k_hi if fwd.none else min(unknowns, rank_k_hi + fwd_rows, tied_upper)
        return result(None, rank_k_lo, hi, "bounds")

    # ---- Z: per channel, the null vectors of its residue blocks in (n, t) coordinates
    pieces: list[tuple[int, list[int], np.ndarray]] = []
    if z_ok:
        by_key: dict[tuple, int] = {}
        for c in range(cin):
            ckeys = chan_keys[c]
            if ckeys not in by_key:
                nulls = [(blocks[key].cols, blocks[key].null) for key in ckeys]
                d_c = sum(nb.shape[1] for _, nb in nulls if nb is not None)
                z = np.zeros((n * s_sp, d_c))
                off = 0
                for cols_b, nb in nulls:
                    assert nb is not None
                    z[cols_b, off : off + nb.shape[1]] = nb
                    off += nb.shape[1]
                by_key[ckeys] = len(pieces)
                pieces.append((c // cig, [], z))
            pieces[by_key[ckeys]][1].append(c)
    d_total = unknowns - rank_k
    # null vectors of a block with relative gap g are accurate to ~eps / g: widen F Z's tolerance by that
    z_rels = [b.rel for b in blocks.values() if b.rel is not None and b.null is not None and b.null.shape[1] > 0]
    z_amp = 1.0 / min(z_rels) if z_rels else 1.0

    def null_to_x(colmap, pieces_, null_f: np.ndarray) -> torch.Tensor:
        out = np.zeros((n, cin, s_sp, null_f.shape[1]))
        for c, pi, j0, j1, col in colmap:
            z = pieces_[pi][2]
            out[:, c] += (z[:, j0:j1] @ null_f[col : col + (j1 - j0)]).reshape(n, s_sp, -1)
        return torch.from_numpy(out.reshape(total_x, -1))

    if fwd.none:
        null = None
        if want_null and z_ok and total_x * d_total <= exact_limit:
            out = np.zeros((n, cin, s_sp, d_total))
            col = 0
            for _g, chans, z in pieces:
                for c in chans:
                    out[:, c, :, col : col + z.shape[1]] = z.reshape(n, s_sp, -1)
                    col += z.shape[1]
            null = torch.from_numpy(out.reshape(total_x, d_total))
        return result(rank_k, rank_k, rank_k, "structured-svd", null, x_k)

    if d_total == 0:
        return result(
            rank_k, rank_k, rank_k, "structured-svd", torch.zeros(total_x, 0, dtype=torch.float64) if want_null else None, x_k
        )

    hi = min(unknowns, rank_k + fwd_rows, tied_upper)
    if not z_ok:
        return result(None, rank_k, hi, "bounds")

    grouped = None
    if _grouped_route(spec, fwd, solving):
        grouped = _grouped_forward_rank(
            spec, pieces, fwd, n, big_d, want_null, _f_scale(spec, fwd, n, big_d, known_np), z_amp, exact_limit
        )

    def reduced(r_f: int, rel_f: float | None, null_f: np.ndarray | None, colmap, solution=None) -> LayerRank:
        """The layer's result from the rank of its reduced forward system F Z (and its null basis in x)."""
        if rel_f is not None:
            rels.append(rel_f)
        rank = rank_k + r_f
        null = None
        if want_null and null_f is not None and total_x * null_f.shape[1] <= exact_limit:
            null = null_to_x(colmap, pieces, null_f)
        return result(rank, rank, rank, "structured-svd", null, solution)

    if grouped is not None:
        return reduced(*grouped)

    if d_total * big_d > exact_limit and batch_rows and d_total * d_total <= 2 * exact_limit:
        # a batch whose F Z is too large to hold: its Gram from the per-sample forward Grams (batchrank)
        from rgap_audit.batchrank import forward_null_gram

        assert fwd.entries is not None  # batch_rows
        h_mat, f_norm, m_rows = forward_null_gram(spec, n, fwd.entries[0], pieces)
        rel_h = _gram_full_rank(np.empty((0, 0)), f_norm, z_amp, gram=h_mat, shape=(m_rows, d_total))
        if rel_h is not None:
            rels.append(rel_h)
            notes.append(f"batch: F Z ({m_rows} x {d_total}) proven full column rank from its Gram, summed over the samples")
            return result(unknowns, unknowns, unknowns, "batch-gram", torch.zeros(total_x, 0, dtype=torch.float64) if want_null else None)
        notes.append(f"batch: the Gram of F Z ({m_rows} x {d_total}) does not prove full column rank; bounds")
    if d_total * big_d > exact_limit and lost_above is not None and d_total <= lost_above:
        return result(None, rank_k, hi, "bounds")
    if d_total * big_d > exact_limit:
        # a subset of the null directions: rank(F Z_S) <= rank(F Z), so rank(K) + rank(F Z_S) is a lower bound
        n_sel = max(1, exact_limit // max(1, big_d))
        all_cols = [(pi, c, j) for pi, (_g, chans, z) in enumerate(pieces) for c in chans for j in range(z.shape[1])]
        pick = np.unique(np.linspace(0, len(all_cols) - 1, min(n_sel, len(all_cols))).round().astype(np.int64))
        sub: dict[tuple[int, int], list[int]] = {}
        for i in pick:
            pi, c, j = all_cols[i]
            sub.setdefault((pi, c), []).append(j)
        sel_pieces = [(pieces[pi][0], [c], pieces[pi][2][:, js]) for (pi, c), js in sub.items()]
        m_sel, _ = _forward_columns(spec, sel_pieces, fwd, n, len(pick), big_d)
        r_sel, _rel, _ = _rank_null(m_sel, False, _f_scale(spec, fwd, n, big_d, known_np), z_amp)
        return result(None, min(hi, rank_k + r_sel), hi, "bounds")

    m_mat, colmap = _forward_columns(spec, pieces, fwd, n, d_total, big_d)
    rows_kept = np.any(m_mat != 0, axis=1)
    m_mat = m_mat[rows_kept]
    scale = _f_scale(spec, fwd, n, big_d, known_np)
    solution = None
    if solving:
        assert x_k is not None and rhs is not None
        r_f, rel_f, null_f, y = _reduced_solve(m_mat, _forward_residual(spec, fwd, rhs, x_k, big_d)[rows_kept], want_null, scale, z_amp)
        solution = x_k + null_to_x(colmap, pieces, y[:, None]).numpy().reshape(x_k.shape)
    else:
        r_f, rel_f, null_f = _rank_null(m_mat, want_null, scale, z_amp)
    return reduced(r_f, rel_f, null_f, colmap, solution)


def _forward_solution(
    spec: ConvSpec, fwd: ForwardInfo, rhs: SystemRHS | None, proof: ForwardProof, known_np: np.ndarray | None, n: int
) -> np.ndarray:
    """The least-squares x of the forward rows alone (carried directions projected out), by the proof's
    factors (ForwardProof.solve), placed among the known inputs."""
    assert rhs is not None and rhs.z is not None and fwd.entries is not None
    rows_idx, _ = fwd.entries
    zr = rhs.z.detach().to(torch.float64).reshape(-1).cpu().numpy()[rows_idx]
    x = proof.solve(zr)
    full = np.zeros(n * spec.n_in)
    if known_np is None:
        full[:] = x
    else:
        full[np.flatnonzero(~known_np.reshape(-1))] = x
    return full.reshape(n, spec.in_channels, -1)


def _gradient_solution(spec: ConvSpec, rhs: SystemRHS, blocks: dict, chan_keys: list, classes: list, n: int) -> np.ndarray:
    """K^+ dW, block by block (each residue block's rank-r SVD): the part of x the gradient rows fix,
    as (N, C_in, S) with the entries outside every block's columns (known inputs) at 0. Channels that
    share a block are solved together (one product with all their right-hand sides)."""
    cin, g_cnt = spec.in_channels, spec.groups
    cig, cog = cin // g_cnt, spec.out_channels // g_cnt
    s_sp = int(np.prod(spec.in_spatial, dtype=np.int64))
    dw = rhs.dw.detach().to(torch.float64).reshape(spec.out_channels, cig, *spec.kernel).cpu().numpy()
    xc = np.zeros((cin, n * s_sp))
    sharing: dict[tuple, list[int]] = {}
    for c in range(cin):
        for ci, key in enumerate(chan_keys[c]):
            sharing.setdefault((ci, key), []).append(c)
    for (ci, key), chans in sharing.items():
        b = blocks[key]
        assert b.pinv is not None
        u, sv, vt = b.pinv
        if not sv.size:
            continue
        g = chans[0] // cig
        local = np.asarray(chans) - g * cig
        wg = dw[g * cog : (g + 1) * cog][:, local]  # (cog, nch, *kernel)
        cl = classes[ci]
        if cl.us:
            wg = wg[(slice(None), slice(None), *np.ix_(*cl.us))]
        rows = np.moveaxis(wg, 1, -1).reshape(-1, len(chans)) / b.scale  # (rows of the block, nch)
        sol = vt.T @ ((u.T @ rows) / sv[:, None])  # (cols of the block, nch)
        xc[np.ix_(chans, b.cols)] = sol.T
    return xc.reshape(cin, n, s_sp).transpose(1, 0, 2).copy()


def _apply_c(fwd: ForwardInfo, v: torch.Tensor, big_d: int) -> np.ndarray:
    """C v for one z-shaped v: the forward rows' operator (the link's Jacobian, then the unknown
    directions projected out), flattened to the D entries of x'."""
    xp = v[None] if fwd.jac is None else fwd.jac(v[None])
    out = xp.detach().reshape(big_d).cpu().numpy()
    if fwd.unknown is not None:
        u = fwd.unknown.detach().to(torch.float64).cpu().numpy().reshape(big_d, -1)
        out = out - u @ (u.T @ out)
    return out


def _forward_residual(spec: ConvSpec, fwd: ForwardInfo, rhs: SystemRHS, x_k: np.ndarray, big_d: int) -> np.ndarray:
    """C (z - W x_K): what the forward rows still have to explain once the gradient rows' part is taken."""
    assert rhs.z is not None
    n = x_k.shape[0]
    xk = torch.from_numpy(x_k.reshape(n, *spec.in_shape))
    with torch.no_grad():
        dz = rhs.z.detach().to(torch.float64).reshape(n, *spec.out_shape) - spec.forward(xk, with_bias=False)
    return _apply_c(fwd, dz, big_d)


def _reduced_solve(
    a: np.ndarray, r: np.ndarray, want_null: bool, scale: float, amp: float
) -> tuple[int, float | None, np.ndarray | None, np.ndarray]:
    """_rank_null of the reduced block and its minimum-norm solution of a y = r (rank-r SVD, the rank
    by the same rule; a Cholesky with two refinement steps when the Gram route proved full column rank)."""
    m, n = a.shape
    if n == 0:
        return 0, None, np.zeros((0, 0)), np.zeros(0)
    if m == 0 or not np.any(a):
        return 0, None, (np.eye(n) if want_null else None), np.zeros(n)
    top = float(np.abs(a).max())
    a_s, r_s, scale = a / top, r / top, scale / top
    if m >= n >= _GRAM_MIN:
        g = a_s.T @ a_s
        rel = _gram_full_rank(a_s, scale, amp, gram=g)
        if rel is not None:
            factor = sla.cho_factor(g, lower=True, check_finite=False)
            y = sla.cho_solve(factor, a_s.T @ r_s, check_finite=False)
            for _ in range(2):
                y = y + sla.cho_solve(factor, a_s.T @ (r_s - a_s @ y), check_finite=False)
            return n, rel, np.zeros((n, 0)), y
        gap = _gram_gap(a_s, scale, amp, gram=g)
        if gap is not None:
            vk, lk = gap.kept, gap.kept_lam
            y = vk @ ((vk.T @ (a_s.T @ r_s)) / lk)
            for _ in range(2):
                y = y + vk @ ((vk.T @ (a_s.T @ (r_s - a_s @ y))) / lk)
            return gap.rank, gap.rel, (gap.null if want_null else None), y
    u, sv, vt = np.linalg.svd(a_s, full_matrices=want_null and m < n)
    rk, rel = _tol_rank(sv, (m, n), scale, amp)
    y = vt[:rk].T @ ((u[:, :rk].T @ r_s) / sv[:rk])
    null = np.ascontiguousarray(vt[rk:].T) if want_null else None
    return rk, rel, null, y


def _transposed_layer_rank(
    spec: ConvTransposeSpec,
    k: torch.Tensor,
    fwd: ForwardInfo,
    *,
    want_null: bool,
    exact_limit: int,
    known: torch.Tensor | None,
) -> LayerRank:
    """layer_rank of a transposed convolution, in its actual input coordinates (N, *spec.in_shape).

    Solved as the equivalent stride-1 convolution (convtranspose.py) whose inserted and appended zeros
    are known inputs; z, k and fwd are the same tensors for both. Actual entries that reach no output
    (cropped: d*(k-1) < padding) are unknowns without any constraint: each adds one to the deficit and
    one unit vector to the null basis.
    """
    t0 = time.perf_counter()
    emb = spec.embedding()
    k = k.detach().to(torch.float64).reshape(-1, *spec.out_shape)
    n = k.shape[0]
    res = layer_rank(emb.spec, k, fwd, want_null=want_null, exact_limit=exact_limit, known=emb.known_mask(n, known))
    free = emb.cropped_unknowns(n, known)
    unknowns = res.unknowns + int(free.numel())
    null = res.null_basis
    if null is not None:
        null = emb.pull_back(null, n)
        if free.numel():
            if n * spec.n_in * (null.shape[1] + free.numel()) > exact_limit:
                null = None
            else:
                unit = torch.zeros(n * spec.n_in, int(free.numel()), dtype=null.dtype)
                unit[free, torch.arange(free.numel())] = 1.0
                null = torch.cat([null, unit], dim=1)
    return dataclasses.replace(
        res,
        unknowns=unknowns,
        rank_grad_counting=gradient_rank_counting(spec, n),
        rank_upper=min(res.rank_upper, unknowns),
        deficit=None if res.rank is None else unknowns - res.rank,
        null_basis=null,
        seconds=time.perf_counter() - t0,
    )


# ====================================================================== dense reference (tests)
def dense_system(
    spec: ConvSpec, k: torch.Tensor, fwd: ForwardInfo, known: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Dense K (n_weight x N*n_in) and F = C W, built independently of the block code, for tests.

    K is torch.autograd.functional.jacobian of x -> dL/dW = grad_W <k, W x>, the map of
    spec.weight_grad written with create_graph=True (spec.weight_grad detaches its result, so the
    jacobian of spec.weight_grad itself is zero; the tests check K x == spec.weight_grad(x, k)).
    W is torch.autograd.functional.jacobian of x -> spec.forward(x, with_bias=False); C is fwd.jac
    applied to the identity, with fwd.unknown projected out (C = V^T J, V an orthonormal
    complement of fwd.unknown). Columns of `known` entries are dropped.
    """
    kk = k.detach().to(torch.float64).reshape(-1, *spec.out_shape)
    n = kk.shape[0]
    total_x = n * spec.n_in
    x0 = torch.zeros(n, *spec.in_shape, dtype=torch.float64)
    if isinstance(spec, ConvTransposeSpec):  # its weight field is weight_t (see convtranspose.py)
        w = spec.weight_t.detach().to(torch.float64).clone().requires_grad_(True)
        spec_w = dataclasses.replace(spec, weight_t=w, bias=None)
    else:
        w = spec.weight.detach().to(torch.float64).clone().requires_grad_(True)
        spec_w = dataclasses.replace(spec, weight=w, bias=None)

    def grad_w(x: torch.Tensor) -> torch.Tensor:
        z = spec_w.forward(x, with_bias=False)
        return torch.autograd.grad((z * kk).sum(), w, create_graph=True)[0]

    kmat = torch.autograd.functional.jacobian(grad_w, x0, vectorize=True).reshape(spec.n_weight, total_x).detach().numpy()
    if fwd.none:
        fmat = np.zeros((0, total_x))
    else:
        wmat = torch.autograd.functional.jacobian(lambda x: spec.forward(x, with_bias=False), x0, vectorize=True)
        wmat = wmat.reshape(n * spec.n_out, total_x).numpy()
        e_out = torch.eye(n * spec.n_out, dtype=torch.float64).reshape(n * spec.n_out, n, *spec.out_shape)
        jt = e_out if fwd.jac is None else fwd.jac(e_out)
        jmat = jt.detach().reshape(n * spec.n_out, -1).numpy().T  # (D, N*n_out)
        if fwd.unknown is not None and fwd.unknown.shape[1] > 0:
            u = fwd.unknown.detach().to(torch.float64).numpy()
            q, _ = np.linalg.qr(u, mode="complete")
            jmat = q[:, u.shape[1] :].T @ jmat
        fmat = jmat @ wmat
    if known is not None:
        keep = ~known.detach().reshape(-1).numpy().astype(bool)
        kmat, fmat = kmat[:, keep], fmat[:, keep]
    return kmat, fmat

