"""Per-layer solve of R-GAP's linear system [K; F] x = [vec dL/dW; z], exploiting its structure.

Strategy, cheapest first (the method name is reported per layer):

* ``gradient-blocks``: K is block-diagonal over input channels with one small block G per group
  (structure.py). One SVD of G gives the part of x the gradient determines (all of it when G has full
  column rank: CNN6 conv3..conv6, every bias-free Linear with a non-zero output gradient).
* ``null(K)+forward (dense reduced)``: the rest of x lies in null(K) = block-diag(Z); the forward rows
  restricted to it, F Z (built with one grouped convolution), form a small dense least-squares
  problem, solved through an eigendecomposition of its (column-scaled) Gram matrix. Its null space is
  the layer's undetermined directions (the numerical deficit).
* ``forward (sparse normal equations)``: when null(K) is large but the forward rows alone have full
  column rank (CNN6 conv1), F is built as a sparse matrix by index arithmetic and F^T F is factorised
  by SuperLU; the gradient rows then serve as a check.
* ``forward (Fourier-preconditioned CGLS)``: a large ungrouped convolution whose output is fully known
  (ImageNet-resolution layers, where F has up to ~1e8 non-zeros): CG on the forward rows' normal
  equations (CGLS form), preconditioned by the inverse of the circulant Gram over the stride phases
  (fourier.py); a random probe solved alongside measures whether the forward rows determine x. The
  gradient rows serve as a check; a layer deficient by counting gets a bounded-effort guess, flagged.
* ``lsqr (matrix-free)``: the general fallback, LSQR on the scaled stacked operator, applied with the
  layer's own convolution and autograd adjoints.

Undetermined directions T of z carried from the layer above (the projected variant) enter as extra
unknowns a:  F x - T a = z, i.e. only the components of z orthogonal to T constrain x.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse.linalg as spl
import torch

from rgap_audit import fourier
from rgap_audit.attack.structure import (
    as_numpy,
    channels_to_x,
    forward_on_channel_basis,
    gradient_blocks,
    gradient_rhs,
    n_samples,
    sparse_forward,
    window_index,
)
from rgap_audit.convspec import ConvSpec
from rgap_audit.tolerances import G_REL_TOL, PROBE_TOL, SIGMA_REL_TOL

DENSE_LIMIT = 1600  # largest reduced problem (columns, or rows when it is wide) solved densely
WIDE_LIMIT = 4000  # most columns of a wide reduced problem (its null basis is formed explicitly)
MAX_G_COLS = 4096  # per-channel positions above which the channel blocks are not formed
FOURIER_MAX_BYTES = 3 * 2**30  # largest preconditioner (fourier.memory_bytes) the attack builds
FOURIER_MIN_NNZ = 2_000_000  # non-zeros of F above which a fully known layer goes to the Fourier solver
DEFICIENT_ITERS = 60  # PCGLS iterations per pass for a layer deficient by counting: a guess, not a recovery


@dataclass
class LayerSolution:
    """A layer's recovered input and what the solve learnt about it."""

    x: torch.Tensor  # full shape of the layer input
    method: str
    null_basis: torch.Tensor | None  # (n_in, d) orthonormal undetermined directions of x; None = not computed
    grad_rank: int | None  # rank of the gradient constraints K
    unknowns: int
    fwd_rows: int  # forward rows used (known entries of z)
    residual_grad: float  # ||K x - dW|| / ||dW||
    residual_fwd: float | None  # ||P (W x + b - z)|| / ||P z|| on the known rows
    sigma_min_rel: float | None = None  # of the reduced problem, when solved densely
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def nullity(self) -> int | None:
        return None if self.null_basis is None else int(self.null_basis.shape[1])


def _orthonormal(cols: torch.Tensor, rel_tol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis of the span of the columns (rank-revealing through an SVD)."""
    if cols.numel() == 0 or cols.shape[1] == 0:
        return cols.new_zeros(cols.shape[0], 0)
    if cols.shape[1] <= cols.shape[0]:
        q, r = torch.linalg.qr(cols)
        dg = r.diagonal().abs()
        if dg.numel() and float(dg.min()) > 1e-8 * float(dg.max()):
            return q
    u, s, _ = torch.linalg.svd(cols, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return cols.new_zeros(cols.shape[0], 0)
    return u[:, s > rel_tol * s[0]]


def _gram_lstsq(
    A: torch.Tensor,
    r: torch.Tensor,
    blocks: list[int] | None = None,
    scales: list[float | None] | None = None,
    rel_tol: float = SIGMA_REL_TOL,
):
    """Minimum-norm least squares A y = r through the eigendecomposition of the block-scaled Gram matrix.

    blocks: column counts of the blocks of A (e.g. [F Z, -T]); scales: the natural magnitude of each block
    (None: its largest column norm). Scaling by the operator's own magnitude, not by the block's columns,
    keeps a block that is numerically zero (F Z when the forward rows add nothing) at zero.
    Returns (y, null basis of A (columns), smallest kept singular value / largest). Two steps of
    iterative refinement recover the accuracy the Gram matrix squares away.
    """
    blocks = blocks or [A.shape[1]]
    scales = scales or [None] * len(blocks)
    cn = torch.ones(A.shape[1], dtype=A.dtype)
    off = 0
    for b, sc in zip(blocks, scales):
        if b:
            m = float(A[:, off : off + b].norm(dim=0).max()) if sc is None else float(sc)
            cn[off : off + b] = m if m > 0 else 1.0
        off += b
    As = A / cn
    if As.shape[0] < As.shape[1]:
        return _wide_lstsq(As, r, cn, rel_tol)
    lam, Q = torch.linalg.eigh(As.T @ As)  # ascending
    # blocks are scaled to unit magnitude: a block that is numerically zero must not set the reference
    lam_max = max(float(lam[-1]) if lam.numel() else 0.0, 1.0)
    keep = lam > (rel_tol**2) * lam_max
    Qk, lk = Q[:, keep], lam[keep]
    y = Qk @ ((Qk.T @ (As.T @ r)) / lk)
    for _ in range(2):
        res = r - As @ y
        y = y + Qk @ ((Qk.T @ (As.T @ res)) / lk)
    null = Q[:, ~keep] / cn[:, None]
    smin = float(torch.sqrt(lk[0] / lam_max)) if lk.numel() else 0.0
    return y / cn, null, smin


def _wide_lstsq(As: torch.Tensor, r: torch.Tensor, cn: torch.Tensor, rel_tol: float):
    """A wide (scaled) system: eigendecomposition of the row Gram As As^T; null basis by a complete QR."""
    lam, U = torch.linalg.eigh(As @ As.T)
    lam_max = max(float(lam[-1]) if lam.numel() else 0.0, 1.0)
    keep = lam > (rel_tol**2) * lam_max
    Uk, lk = U[:, keep], lam[keep]
    Vr = (As.T @ Uk) / torch.sqrt(lk)  # orthonormal basis of the row space
    y = Vr @ ((Uk.T @ r) / torch.sqrt(lk))
    for _ in range(2):
        res = r - As @ y
        y = y + Vr @ ((Uk.T @ res) / torch.sqrt(lk))
    Vr, _ = torch.linalg.qr(Vr)
    Q, _ = torch.linalg.qr(Vr, mode="complete")
    null = Q[:, Vr.shape[1] :] / cn[:, None]
    smin = float(torch.sqrt(lk[0] / lam_max)) if lk.numel() else 0.0
    return y / cn, null, smin


def _n_rows(a_rows) -> int:
    return 0 if a_rows is None else int(a_rows[0].shape[0])


def _forward_parts(spec, z_target, mask, T, n):
    """Known rows of z - b as a flat vector, the row mask, and T restricted to those rows (n_known, d)."""
    zb = z_target.to(torch.float64).reshape(n, spec.out_channels, -1)
    if spec.bias is not None:
        zb = zb - spec.bias[None, :, None]
    zb = zb.reshape(-1)
    known = torch.ones_like(zb, dtype=torch.bool) if mask is None else mask.reshape(-1).to(torch.bool)
    Tk = None
    if T is not None and T.numel() > 0:
        Tk = T.reshape(T.shape[0], -1).T[known].contiguous()
    return zb, known, Tk


def _residuals(spec, x, k, dw, zb, known, Tk):
    """Relative residuals of the gradient rows and of the forward rows with the carried directions projected out."""
    g = spec.weight_grad(x, k.reshape(x.shape[: x.dim() - len(spec.in_shape)] + spec.out_shape))
    rg = float((g - dw).norm() / dw.norm().clamp_min(1e-300))
    if zb is None or not bool(known.any()):
        return rg, None
    fx = spec.forward(x, with_bias=False).reshape(-1)
    d = (fx - zb)[known]
    ref = zb[known]
    if Tk is not None:
        d, ref = _project_out(Tk, d), _project_out(Tk, ref)
    return rg, float(d.norm() / ref.norm().clamp_min(1e-300))


def _project_out(T: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v minus its least-squares component in span(T) (Cholesky of T^T T; QR when that fails)."""
    G = T.T @ T
    L, info = torch.linalg.cholesky_ex(G + 1e-13 * float(G.diagonal().max()) * torch.eye(G.shape[0], dtype=G.dtype))
    if int(info) == 0:
        return v - T @ torch.cholesky_solve((T.T @ v)[:, None], L)[:, 0]
    Q = _orthonormal(T)
    return v - Q @ (Q.T @ v)


def solve_layer(
    spec: ConvSpec,
    x_shape: tuple[int, ...],
    k: torch.Tensor,
    dw: torch.Tensor,
    z_target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    T: torch.Tensor | None = None,
    *,
    dense_limit: int = DENSE_LIMIT,
    cache: dict | None = None,
    cache_key: object = None,
    a_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    gradient_rows: str = "use",
) -> LayerSolution:
    """Recover a weighted layer's input x from its gradient dW (given dL/dz = k) and what is known of z.

    z_target: the layer output z (bias included), full shape; None when nothing is known of it.
    mask: which entries of z are known (None: all). T: (d, *z.shape) directions of z left undetermined
    above (projected variant); only the components of z orthogonal to them are used.
    a_rows: (E, f), constraints E a = f on the carried coordinates alone (ReLU units that are off above:
    there x' + S a must vanish).
    cache/cache_key: reuse factorisations between calls on the same layer (same weights and mask).
    gradient_rows: "use" (default), or "check": when the forward rows alone have enough rows, solve with
    them and only check the gradient rows (used while k itself is uncertain: it depends on an activation
    pattern that is still being estimated).
    """
    t0 = time.perf_counter()
    dw = dw.to(torch.float64)
    k = k.to(torch.float64)
    n = n_samples(spec, x_shape)
    unknowns = n * spec.n_in
    ci = spec.in_channels
    n_cols = n * spec.n_in // ci
    zb = known = Tk = None
    if z_target is not None:
        zb, known, Tk = _forward_parts(spec, z_target, mask, T, n)
    fwd_rows = int(known.sum()) if known is not None else 0
    d = 0 if Tk is None else Tk.shape[1]
    if Tk is None or a_rows is None or a_rows[0].numel() == 0:
        a_rows = None
    notes: list[str] = []

    if _fourier_eligible(spec, n, zb, known, Tk, a_rows, unknowns, dw.numel()):
        return _fourier_layer(spec, x_shape, k, dw, zb, known, unknowns, fwd_rows, t0)

    if n_cols > MAX_G_COLS:
        sol = _lsqr(spec, x_shape, k, dw, zb, known, Tk, n, a_rows)
        sol.fwd_rows, sol.seconds = fwd_rows, time.perf_counter() - t0
        sol.notes.insert(0, f"{n_cols} positions per channel: channel blocks not formed")
        return sol

    # ---- gradient rows: one SVD per group
    tmap = window_index(spec)
    blocks = gradient_blocks(spec, k)
    rhs = gradient_rhs(spec, dw)
    cig = ci // spec.groups
    nz_lower = sum(max(0, n_cols - G.shape[0]) for G in blocks) * cig
    forward_first = nz_lower + d > dense_limit or gradient_rows == "check"
    def sparse_forward_or_lsqr() -> tuple[torch.Tensor, torch.Tensor] | LayerSolution:
        """The forward rows carry the layer (SuperLU on the normal equations); LSQR when singular."""
        try:
            return _sparse_forward_solve(spec, n, tmap, zb, known, Tk, x_shape, cache, cache_key, a_rows)
        except _Singular as exc:
            sol = _lsqr(spec, x_shape, k, dw, zb, known, Tk, n, a_rows)
            sol.notes.insert(0, str(exc))
            sol.grad_rank, sol.fwd_rows, sol.seconds = grad_rank, fwd_rows, time.perf_counter() - t0
            return sol

    if zb is not None and forward_first and fwd_rows >= unknowns:
        # null(K) is large: the forward rows carry the layer (CNN6 conv1); the gradient rows check it
        grad_rank = None
        if gradient_rows != "check":
            svs = map(torch.linalg.svdvals, blocks)
            grad_rank = sum(int((sv > G_REL_TOL * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0 for sv in svs) * cig
        solved = sparse_forward_or_lsqr()
        if isinstance(solved, LayerSolution):
            return solved
        (x, null), smin = solved, None
        method = "forward (sparse normal equations, SuperLU); gradient rows as check"
        return _finish(spec, x, k, dw, zb, known, Tk, method, null, grad_rank, unknowns, fwd_rows, smin, notes, t0)

    xc = torch.zeros(ci, n_cols, dtype=torch.float64)
    Zs: list[torch.Tensor] = []
    grad_rank = 0
    for gi, (G, B) in enumerate(zip(blocks, rhs)):
        if G.abs().max() == 0:
            Zs.append(torch.eye(n_cols, dtype=torch.float64))
            continue
        U, S, Vh = torch.linalg.svd(G, full_matrices=G.shape[0] < G.shape[1])
        r = int((S > G_REL_TOL * S[0]).sum())
        grad_rank += r * cig
        X = Vh[:r].T @ ((U[:, :r].T @ B) / S[:r, None])  # (n_cols, cig)
        xc[gi * cig : (gi + 1) * cig] = X.T
        Zs.append(Vh[r:].T.contiguous())
    x_det = channels_to_x(spec, xc, x_shape)
    nz = sum(Z.shape[1] for Z in Zs) * cig

    if nz == 0:
        x, null, smin, method = x_det, torch.zeros(unknowns, 0, dtype=torch.float64), None, "gradient-blocks"
    elif zb is None or fwd_rows == 0:
        x, smin, method = x_det, None, "gradient-blocks (nothing known of z)"
        null = _null_from_blocks(spec, Zs, x_shape)
        notes.append(f"{nz} directions of the input are not constrained by the gradient and z is unknown")
    elif nz + d <= dense_limit or (fwd_rows + _n_rows(a_rows) <= dense_limit and nz + d <= WIDE_LIMIT):
        FZ = forward_on_channel_basis(spec, n, Zs)[known]
        r = zb[known] - spec.forward(x_det, with_bias=False).reshape(-1)[known]
        A = FZ if Tk is None else torch.cat([FZ, -Tk], dim=1)
        if a_rows is not None:
            E, f = a_rows
            A = torch.cat([A, torch.cat([torch.zeros(E.shape[0], nz, dtype=torch.float64), E], dim=1)])
            r = torch.cat([r, f])
        w_scale = float(spec.weight.transpose(0, 1).reshape(spec.in_channels // spec.groups, -1).norm(dim=1).max())
        y, null_y, smin = _gram_lstsq(A, r, [nz, d], [w_scale, None])
        x = x_det + _from_null_coords(spec, Zs, y[:nz], x_shape)
        null = _orthonormal(_from_null_coords_batch(spec, Zs, null_y[:nz], x_shape))
        method = "null(K)+forward (dense reduced)"
    elif fwd_rows >= unknowns:
        solved = sparse_forward_or_lsqr()
        if isinstance(solved, LayerSolution):
            return solved
        (x, null), smin = solved, None
        method = "forward (sparse normal equations, SuperLU); gradient rows as check"
    else:
        sol = _lsqr(spec, x_shape, k, dw, zb, known, Tk, n, a_rows)
        sol.grad_rank, sol.fwd_rows, sol.seconds = grad_rank, fwd_rows, time.perf_counter() - t0
        return sol

    return _finish(spec, x, k, dw, zb, known, Tk, method, null, grad_rank, unknowns, fwd_rows, smin, notes, t0)


def _fourier_eligible(spec, n, zb, known, Tk, a_rows, unknowns, n_grad) -> bool:
    """Large ungrouped convolution, one sample, output fully known, nothing carried, and either enough
    forward rows or too few rows altogether (deficient by counting): the Fourier solver's cases."""
    if zb is None or Tk is not None or a_rows is not None or n != 1 or not fourier.eligible(spec):
        return False
    if fourier.memory_bytes(spec) > FOURIER_MAX_BYTES:  # the preconditioner would not fit: LSQR instead
        return False
    if not bool(known.all()):
        return False
    nnz = int(known.numel()) * (spec.in_channels // spec.groups) * math.prod(spec.kernel)
    rows = int(known.numel())
    return nnz > FOURIER_MIN_NNZ and (rows >= unknowns or rows + n_grad < unknowns)


def _fourier_layer(spec, x_shape, k, dw, zb, known, unknowns, fwd_rows, t0) -> LayerSolution:
    """The forward rows by Fourier-preconditioned CGLS; nullity 0 is reported only when the probe comes back."""
    deficient = fwd_rows + dw.numel() < unknowns
    res = fourier.solve(spec, zb, x_shape, max_iters=DEFICIENT_ITERS if deficient else fourier.MAX_ITERS)
    state = "converged" if res.converged else "not converged"
    grid = "x".join(map(str, res.grid))
    first = f"PCGLS {res.iterations} iterations ({state}), circulant preconditioner on a {grid} grid; "
    notes = [first + f"random probe recovered to {res.probe_error:.1e}"]
    null = None
    if deficient:
        notes.append(
            f"deficient by counting: {fwd_rows} forward + {dw.numel()} gradient rows < {unknowns} unknowns, so at "
            f"least {unknowns - fwd_rows - dw.numel()} directions are undetermined (not computed); x is one input "
            "that fits the forward rows, not a recovery"
        )
    elif res.converged and res.probe_error <= PROBE_TOL:
        null = torch.zeros(unknowns, 0, dtype=torch.float64)
    else:
        notes.append(
            "the forward rows do not determine x numerically (the probe was not recovered): undetermined or "
            "ill-conditioned directions, not computed"
        )
    method = "forward (Fourier-preconditioned CGLS); gradient rows as check"
    return _finish(spec, res.x, k, dw, zb, known, None, method, null, None, unknowns, fwd_rows, None, notes, t0)


def _finish(spec, x, k, dw, zb, known, Tk, method, null, grad_rank, unknowns, fwd_rows, smin, notes, t0) -> LayerSolution:
    """The LayerSolution of a solved layer, with its residuals."""
    rg, rf = _residuals(spec, x, k, dw, zb, known, Tk)
    return LayerSolution(
        x=x,
        method=method,
        null_basis=null,
        grad_rank=grad_rank,
        unknowns=unknowns,
        fwd_rows=fwd_rows,
        residual_grad=rg,
        residual_fwd=rf,
        sigma_min_rel=smin,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def _from_null_coords(spec, Zs, y, x_shape) -> torch.Tensor:
    """x = Z y for coordinates ordered (group, channel in group, basis vector)."""
    cig = spec.in_channels // spec.groups
    n_cols = Zs[0].shape[0]
    xc = torch.zeros(spec.in_channels, n_cols, dtype=torch.float64)
    off = 0
    for gi, Z in enumerate(Zs):
        m = Z.shape[1]
        if m:
            Y = y[off : off + cig * m].reshape(cig, m)
            xc[gi * cig : (gi + 1) * cig] = (Z @ Y.T).T
        off += cig * m
    return channels_to_x(spec, xc, x_shape)


def _from_null_coords_batch(spec, Zs, Y, x_shape) -> torch.Tensor:
    """Columns Z y for every column y of Y: (n_in, m)."""
    cig = spec.in_channels // spec.groups
    m = Y.shape[1]
    n_cols = Zs[0].shape[0]
    xc = torch.zeros(spec.in_channels, n_cols, m, dtype=torch.float64)
    off = 0
    for gi, Z in enumerate(Zs):
        mz = Z.shape[1]
        if mz:
            Yg = Y[off : off + cig * mz].reshape(cig, mz, m)
            xc[gi * cig : (gi + 1) * cig] = torch.einsum("pj,cjm->cpm", Z, Yg)
        off += cig * mz
    cols = xc.permute(2, 0, 1)  # (m, C_in, n_cols)
    return torch.stack([channels_to_x(spec, c, x_shape).reshape(-1) for c in cols], 1) if m else xc.new_zeros(math.prod(x_shape), 0)


def _null_from_blocks(spec, Zs, x_shape) -> torch.Tensor:
    """Orthonormal basis (n_in, nz) of null(K): each channel's block null vectors, placed in that channel."""
    nz = sum(Z.shape[1] for Z in Zs) * (spec.in_channels // spec.groups)
    return _from_null_coords_batch(spec, Zs, torch.eye(nz, dtype=torch.float64), x_shape)


class _Singular(Exception):
    pass


def _factor_forward(spec, n, tmap, known):
    Fs = sparse_forward(spec, n, tmap)[known.numpy().astype(bool)]
    A = (Fs.T @ Fs).tocsc()
    try:
        lu = spl.splu(A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    except RuntimeError as exc:
        raise _Singular(f"forward rows are singular ({exc}); falling back to LSQR") from exc
    except MemoryError as exc:  # the factor's fill-in of a large 2-D conv (VGG at 224x224)
        raise _Singular("the sparse factorisation does not fit in memory; falling back to LSQR (matrix-free)") from exc
    piv = np.abs(lu.U.diagonal())
    if piv.min() <= 1e-13 * piv.max():
        raise _Singular("forward rows are (numerically) rank-deficient; falling back to LSQR")
    return Fs, lu


def _sparse_forward_solve(spec, n, tmap, zb, known, Tk, x_shape, cache=None, cache_key=None, a_rows=None):
    """min ||F x - T a - (z - b)|| with F sparse; SuperLU on F^T F, Schur complement for a."""
    if cache is not None:
        key = ("sparse-forward", cache_key, hash(known.numpy().tobytes()))
        if key not in cache:
            cache[key] = _factor_forward(spec, n, tmap, known)
        Fs, lu = cache[key]
    else:
        Fs, lu = _factor_forward(spec, n, tmap, known)
    r = as_numpy(zb[known])

    def ls(b):
        x = lu.solve(Fs.T @ b)
        for _ in range(2):
            x = x + lu.solve(Fs.T @ (b - Fs @ x))
        return x

    null = torch.zeros(Fs.shape[1], 0, dtype=torch.float64)
    if Tk is None:
        return torch.from_numpy(ls(r)).reshape(x_shape), null
    # carried directions T: F x = r + T a needs N^T (r + T a) = 0, N an orthonormal basis of range(F)^perp
    # (computed once per layer and mask); then x = F^+ (r + T a) is one more solve
    if cache is not None:
        key = ("left-null", cache_key, hash(known.numpy().tobytes()))
        if key not in cache:
            cache[key] = _left_null(Fs, lu)
        N = cache[key]
    else:
        N = _left_null(Fs, lu)
    Tn = Tk.numpy()
    NT = torch.from_numpy(N.T @ Tn)  # (q, d)
    Nr = -torch.from_numpy(N.T @ r)
    if a_rows is not None:
        NT = torch.cat([NT, a_rows[0]])
        Nr = torch.cat([Nr, a_rows[1]])
    if NT.shape[0]:
        U, sv, Vh = torch.linalg.svd(NT, full_matrices=True)
        keep = sv > SIGMA_REL_TOL * max(float(sv[0]) if sv.numel() else 0.0, 1e-300)
        nk = int(keep.sum())
        a = Vh[:nk].T @ ((U[:, :nk].T @ Nr) / sv[:nk])
        a_null = Vh[nk:].T
    else:
        a = torch.zeros(Tn.shape[1], dtype=torch.float64)
        a_null = torch.eye(Tn.shape[1], dtype=torch.float64)
    x = ls(r + Tn @ a.numpy())
    if a_null.shape[1]:
        null = _orthonormal(torch.from_numpy(lu.solve(np.asarray(Fs.T @ (Tn @ a_null.numpy())))))
    return torch.from_numpy(x).reshape(x_shape), null


def _left_null(Fs, lu) -> np.ndarray:
    """Orthonormal basis of range(F)^perp for a full-column-rank sparse F: (I - F (F^T F)^-1 F^T) R, R random."""
    m, n = Fs.shape
    q = m - n
    if q <= 0:
        return np.zeros((m, 0))
    R = np.random.default_rng(0).standard_normal((m, q))
    W = R - Fs @ lu.solve(np.asarray(Fs.T @ R))
    return _orthonormal(torch.from_numpy(W)).numpy()


def _power_norm(apply, adjoint, shape, iters: int = 12) -> float:
    """Largest singular value of a linear operator, by power iteration on its normal operator."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(shape, dtype=torch.float64, generator=g)
    s = 1.0
    for _ in range(iters):
        v = v / v.norm().clamp_min(1e-300)
        w = adjoint(apply(v))
        s = float(w.norm()) ** 0.5
        v = w
    return max(s, 1e-300)


def _lsqr(spec, x_shape, k, dw, zb, known, Tk, n, a_rows=None) -> LayerSolution:
    """Matrix-free LSQR on [alpha K; beta (F, -T)], both blocks scaled to unit spectral norm."""
    kk = k.reshape(n, *spec.out_shape) if spec.ndim else k.reshape(n, spec.out_channels)
    xs = (n, *spec.in_shape) if spec.ndim else (n, spec.in_shape[0])
    unknowns = n * spec.n_in
    d = 0 if Tk is None else Tk.shape[1]

    def K(x):
        return spec.weight_grad(x.reshape(xs), kk)

    def KT(u):
        x = torch.zeros(xs, dtype=torch.float64, requires_grad=True)
        us = ConvSpec(u.reshape(spec.weight.shape), spec.in_shape, spec.stride, spec.padding, spec.dilation, spec.groups)
        (g,) = torch.autograd.grad((us.forward(x, with_bias=False) * kk).sum(), x)
        return g

    def Fw(x):
        return spec.forward(x.reshape(xs), with_bias=False).reshape(-1)

    def FT(w):
        x = torch.zeros(xs, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad((spec.forward(x, with_bias=False).reshape(-1) * w).sum(), x)
        return g

    alpha = 1.0 / _power_norm(K, KT, xs)
    beta = 1.0 / _power_norm(Fw, FT, xs) if zb is not None else 0.0
    m_k = dw.numel()
    m_f = int(known.sum()) if zb is not None else 0
    if a_rows is not None and d:
        E, fe = a_rows
    else:
        E, fe = torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    m_e = E.shape[0]

    def matvec(v):
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
        x, a = v[:unknowns], v[unknowns:]
        out = [alpha * K(x).reshape(-1)]
        if m_f:
            f = Fw(x)[known]
            if d:
                f = f - Tk @ a
            out.append(beta * f)
        if m_e:
            out.append(beta * (E @ a))
        return torch.cat(out).numpy()

    def rmatvec(u):
        u = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64))
        gx = alpha * KT(u[:m_k]).reshape(-1)
        ga = torch.zeros(d, dtype=torch.float64)
        if m_f:
            w = torch.zeros(known.numel(), dtype=torch.float64)
            w[known] = u[m_k : m_k + m_f]
            gx = gx + beta * FT(w).reshape(-1)
            if d:
                ga = -beta * (Tk.T @ u[m_k : m_k + m_f])
        if m_e:
            ga = ga + beta * (E.T @ u[m_k + m_f :])
        return torch.cat([gx, ga]).numpy()

    op = spl.LinearOperator((m_k + m_f + m_e, unknowns + d), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    b = [alpha * as_numpy(dw)]
    if m_f:
        b.append(beta * as_numpy(zb[known]))
    if m_e:
        b.append(beta * fe.numpy())
    res = spl.lsqr(op, np.concatenate(b), atol=1e-15, btol=1e-15, iter_lim=min(20 * (unknowns + d), 20000))
    x = torch.from_numpy(res[0][:unknowns]).reshape(x_shape)
    rg, rf = _residuals(spec, x, k, dw, zb, known, Tk)
    notes = [f"LSQR stopped with flag {res[1]} after {res[2]} iterations; the undetermined directions are not computed"]
    return LayerSolution(
        x=x,
        method="lsqr (matrix-free)",
        null_basis=None,
        grad_rank=None,
        unknowns=unknowns,
        fwd_rows=m_f,
        residual_grad=rg,
        residual_fwd=rf,
        notes=notes,
    )
