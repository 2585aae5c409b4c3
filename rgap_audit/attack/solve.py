"""Per-layer solve of R-GAP's linear system [K; F] x = [vec dL/dW; z], on the audit's own decomposition.

The system is the one the audit ranks (rgap_audit.rank.layer_rank), with the attacker's data: its
dL/dz (derived from the layers above), the entries of z it knows, the directions of z it carried down
as undetermined. layer_rank decides the rank and returns the minimum-norm solution from the same
factorisations, so the nullity reported here is the audit's by construction (one rule, one tolerance):

* ``gradient-blocks``: K alone has full column rank (residue blocks of K, one SVD each).
* ``forward (sparse LDL^T ...)``: the forward rows alone have full column rank, proven by a sparse
  factorisation of F^T F - tau I (CNN6 conv1); the solution is their least-squares solution.
* ``null(K)+forward (dense reduced)``: the rest of x lies in null(K) = block-diag(Z); F Z is a dense
  block whose SVD gives the rank, the solution and the undetermined directions.
* ``forward (Fourier-preconditioned CGLS)``: a large ungrouped convolution whose output is fully known
  (ImageNet-resolution layers): CG on the forward rows' normal equations, preconditioned by the inverse
  of the circulant Gram over the stride phases (fourier.py); nullity 0 only when a random probe comes
  back (the audit's forward probe uses the same solver and threshold).
* ``lsqr (matrix-free)``: the fallback when the exact decomposition is too large (the audit then has
  bounds only): LSQR on the scaled stacked operator; no nullity is claimed.

Undetermined directions T of z carried from the layer above (the projected variant) are projected out
of the forward rows: only the components of z orthogonal to them constrain x.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse.linalg as spl
import torch

from rgap_audit import fourier, rank
from rgap_audit.convspec import ConvSpec
from rgap_audit.structure import as_numpy, n_samples
from rgap_audit.tolerances import PROBE_TOL

EXACT_LIMIT = 40_000_000  # entries of a block or reduced system decomposed exactly (the audit's default)
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
        # Cholesky of the Gram first (several times cheaper than a QR for tall blocks), when well conditioned
        g = cols.T @ cols
        L, info = torch.linalg.cholesky_ex(g)
        dg = L.diagonal() if int(info) == 0 else None
        if dg is not None and float(dg.min()) > 1e-4 * float(dg.max()):
            q = torch.linalg.solve_triangular(L, cols.T, upper=False).T
            q, _ = torch.linalg.qr(q) if float(dg.min()) < 1e-2 * float(dg.max()) else (q, None)
            return q
        q, r = torch.linalg.qr(cols)
        dg = r.diagonal().abs()
        if dg.numel() and float(dg.min()) > 1e-8 * float(dg.max()):
            return q
    u, s, _ = torch.linalg.svd(cols, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return cols.new_zeros(cols.shape[0], 0)
    return u[:, s > rel_tol * s[0]]


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


def _residuals(spec, x, k, dw, zb, known, Tk, Qk=None):
    """Relative residuals of the gradient rows and of the forward rows with the carried directions projected
    out (through Qk, an orthonormal basis of Tk's span, when the caller has it)."""
    g = spec.weight_grad(x, k.reshape(x.shape[: x.dim() - len(spec.in_shape)] + spec.out_shape))
    rg = float((g - dw).norm() / dw.norm().clamp_min(1e-300))
    if zb is None or not bool(known.any()):
        return rg, None
    fx = spec.forward(x, with_bias=False).reshape(-1)
    d = (fx - zb)[known]
    ref = zb[known]
    if Tk is not None:
        both = torch.stack([d, ref], 1)
        both = both - Qk @ (Qk.T @ both) if Qk is not None else _project_out(Tk, both)
        d, ref = both[:, 0], both[:, 1]
    return rg, float(d.norm() / ref.norm().clamp_min(1e-300))


def _project_out(T: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v (a vector or columns) minus its least-squares component in span(T) (Cholesky of T^T T; QR when that fails)."""
    G = T.T @ T
    L, info = torch.linalg.cholesky_ex(G + 1e-13 * float(G.diagonal().max()) * torch.eye(G.shape[0], dtype=G.dtype))
    cols = v if v.dim() == 2 else v[:, None]
    if int(info) == 0:
        out = cols - T @ torch.cholesky_solve(T.T @ cols, L)
    else:
        Q = _orthonormal(T)
        out = cols - Q @ (Q.T @ cols)
    return out if v.dim() == 2 else out[:, 0]


def solve_layer(
    spec: ConvSpec,
    x_shape: tuple[int, ...],
    k: torch.Tensor,
    dw: torch.Tensor,
    z_target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    T: torch.Tensor | None = None,
    *,
    a_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    gradient_rows: str = "use",
    cache: dict | None = None,
) -> LayerSolution:
    """Recover a weighted layer's input x from its gradient dW (given dL/dz = k) and what is known of z.

    z_target: the layer output z (bias included), full shape; None when nothing is known of it.
    mask: which entries of z are known (None: all). T: (d, *z.shape) directions of z left undetermined
    above (projected variant); only the components of z orthogonal to them are used.
    a_rows: (E, f), constraints E a = f on the carried coordinates alone (ReLU units that are off above:
    there x' + S a must vanish).
    gradient_rows: "use" (default), or "check": when the forward rows alone have enough rows, solve with
    them and only check the gradient rows (used while k itself is uncertain: it depends on an activation
    pattern that is still being estimated).
    cache: a dict kept across calls on the same layer (factorisations that depend on the weights only).
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

    # ---- the system the audit ranks, solved from the factorisations that decide its rank (rgap_audit.rank)
    fwd, z_rows, q_t = _forward_info(spec, n, zb, known, Tk, a_rows, cache)
    z_full = None
    if z_rows is not None:
        assert known is not None
        z_full = torch.zeros(known.numel(), dtype=torch.float64)
        z_full[known] = z_rows
    res = rank.layer_rank(
        spec, k.reshape(n, *spec.out_shape), fwd, want_null=True, exact_limit=EXACT_LIMIT,
        rhs=rank.SystemRHS(dw, None if z_full is None else z_full.reshape(n, *spec.out_shape)),
    )
    notes.extend(res.notes)
    if res.solution is None:  # only bounds: too large for the exact decomposition
        sol = _lsqr(spec, x_shape, k, dw, zb, known, Tk, n, a_rows)
        sol.grad_rank, sol.fwd_rows, sol.seconds = res.rank_grad, fwd_rows, time.perf_counter() - t0
        sol.notes.insert(0, f"the exact decomposition is too large (rank {res.rank_lower}..{res.rank_upper} of {res.unknowns})")
        return sol
    x = res.solution.reshape(x_shape)
    null = res.null_basis
    if res.method == "sparse-ldl":
        method = "forward (sparse LDL^T, proven full column rank); gradient rows as check"
    elif fwd.none:
        method = "gradient-blocks (nothing known of z)"
        if res.deficit:
            notes.append(f"{res.deficit} directions of the input are not constrained by the gradient and z is unknown")
    elif res.rank_grad == res.unknowns:
        method = "gradient-blocks"
    else:
        method = "null(K)+forward (dense reduced)"
    return _finish(
        spec, x, k, dw, zb, known, Tk, method, null, res.rank_grad, unknowns, fwd_rows, res.sigma_min_rel, notes, t0, q_t
    )


def _forward_info(
    spec: ConvSpec,
    n: int,
    zb: torch.Tensor | None,
    known: torch.Tensor | None,
    Tk: torch.Tensor | None,
    a_rows: tuple[torch.Tensor, torch.Tensor] | None,
    cache: dict | None = None,
) -> tuple[rank.ForwardInfo, torch.Tensor | None, torch.Tensor | None]:
    """The attack's forward rows as the audit's ForwardInfo: the known entries of z (a selection), with
    the carried directions projected out. Rows E a = f on the carried coordinates restrict them to
    a_p + null(E): the directions left are T null(E), and z moves by T a_p. Returns (info, z on the rows,
    an orthonormal basis of span T for the residuals)."""
    if zb is None or known is None or not bool(known.any()):
        return rank.ForwardInfo(none=True, rows=0), None, None
    rows = torch.nonzero(known).reshape(-1)
    z_rows = zb[known]
    q = q_t = None
    if Tk is not None and Tk.shape[1]:
        t_eff = Tk
        q_t = _orthonormal(Tk)
        if a_rows is not None:
            E, f = a_rows
            u, sv, vt = torch.linalg.svd(E, full_matrices=True)
            r, _ = rank._tol_rank(sv.numpy(), (int(E.shape[0]), int(E.shape[1])))
            a_p = vt[:r].T @ ((u[:, :r].T @ f) / sv[:r])
            z_rows = z_rows + Tk @ a_p
            t_eff = Tk @ vt[r:].T
        if t_eff is Tk:
            q = q_t
        elif t_eff.shape[1]:
            q = _orthonormal(t_eff)
    select = known.reshape(-1)
    unknown = None if q is None or q.shape[1] == 0 else q

    def jac(dz: torch.Tensor) -> torch.Tensor:
        return dz.reshape(dz.shape[0], -1)[:, select]

    info = rank.ForwardInfo(
        jac=jac, unknown=unknown, rows=int(select.sum()), entries=(rows.numpy(), None if unknown is None else unknown.numpy()),
        cache=cache, measure=False,
    )
    return info, z_rows, q_t


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


def _finish(spec, x, k, dw, zb, known, Tk, method, null, grad_rank, unknowns, fwd_rows, smin, notes, t0, Qk=None) -> LayerSolution:
    """The LayerSolution of a solved layer, with its residuals."""
    rg, rf = _residuals(spec, x, k, dw, zb, known, Tk, Qk)
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
