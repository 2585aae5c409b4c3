"""R-GAP through a joint segment: one least-squares solve over the value of the segment's input cut.

The audit ranks a joint segment (rgap_audit.analysis.joint) as one linear system in its input u: once
the activation patterns are fixed, every inner layer's input a_i(u) is affine in u, so its weight
gradient dL/dW_i = G_i a_i(u) is too, and so is what the link above reads of the segment's end. The
attack solves that system with the attacker's data:

    rows(u) = [ G_1 a_1(u) / |dW_1| ; ... ; G_m a_m(u) / |dW_m| ; above(end(u)) / |x'| ]  =  target

(x': the recovered input of the unit above; G_i: the layer's gradient map for the dL/dz the walk carries
down; blocks scaled as the audit scales them). With the pattern fixed, rows(u) = J u + c, where J and
the offset c (biases, BatchNorm shifts, through the fixed masks) depend on the pattern only. The solve
is the minimum-norm u = J^+ (target - c) over the entries not known from the pattern (a ReLU's zeros
below the cut): dense SVD when J is small (with the audit's rank rule, so the nullity is the audit's),
LSQR on jvp/vjp products otherwise (no nullity claimed).

Two sources of the pattern:

* ``given``: the instance's own activation patterns (the audit's assumption, "given pattern"): J and c
  are formed at the true input's pattern; nothing else of the true input enters the solve.
* ``estimated``: from the gradient alone, by fixed-point passes: solve at the current pattern, re-read
  the pattern at the solution, until it settles (as the projected variant does for chains).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse.linalg as spl
import torch

from rgap_audit import ops
from rgap_audit.analysis.joint import gradient_map, unit_columns
from rgap_audit.convspec import ConvSpec
from rgap_audit.layergraph import LayerGraph
from rgap_audit.links import Link, region_function
from rgap_audit.rank import _tol_rank as rank_rule
from rgap_audit.segments import Segment

DENSE_LIMIT = 20_000_000  # entries of J formed and decomposed densely
TANGENT_CHUNK = 64
LSQR_ITERS = 3000
LSQR_SECONDS = 15.0  # per solve: a segment too large for the dense route gets at most this much LSQR
ESTIMATE_PASSES = 3


@dataclass
class SegmentSolution:
    """A segment's recovered input u, dL/du at it, and what the solve learnt."""

    u: torch.Tensor
    g: torch.Tensor  # dL/du at the solution (the walk carries it down)
    method: str
    unknowns: int
    rows: int
    fwd_rows: int
    nullity: int | None
    sigma_min_rel: float | None
    residual_grad: float
    residual_fwd: float | None
    null_basis: torch.Tensor | None
    ks: dict[str, torch.Tensor] = field(default_factory=dict)  # dL/dz of each inner layer at the solution
    passes: int = 1
    settled: bool = True
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def k_of(self, layer: str) -> torch.Tensor | None:
        """dL/dz of an inner layer at the solution (None when it is not one)."""
        return self.ks.get(layer)


@dataclass
class SegmentProblem:
    """Everything of one segment that does not depend on the pattern: the segment's computation, the
    link above it and the attacker's data (gradients of the inner layers, the unit above's input x' and
    dL/dx')."""

    lg: LayerGraph
    seg: Segment
    above: Link
    below: Link
    env: dict
    specs: dict[str, ConvSpec]
    dws: dict[str, torch.Tensor]
    x_top: torch.Tensor
    g_top: torch.Tensor
    unknown: torch.Tensor | None = None  # (x'.numel(), d) orthonormal directions of x' left undetermined above

    def __post_init__(self) -> None:
        self.region = region_function(self.lg, self.seg.start, self.seg.nodes, self.env)
        self.read = self.above.fn()
        self.u_shape = tuple(self.lg.node(self.seg.start).out_shape or ())
        self.scales = [max(float(self.dws[n].norm()), 1e-300) for n in self.seg.layers]
        self.f_scale = max(float(self.x_top.norm()), 1e-300)
        parts = [(self.dws[n] / s).reshape(-1) for n, s in zip(self.seg.layers, self.scales)]
        parts.append(self._known(self.x_top / self.f_scale).reshape(-1))
        self.target = torch.cat(parts)
        self.n_grad = sum(int(self.dws[n].numel()) for n in self.seg.layers)

    def dldz(self, u: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """At the pattern of u: dL/dz of every inner layer's output and dL/du, from dL/dx' (every path from
        the segment to the loss passes through x', the input of the unit above)."""
        with torch.enable_grad():
            up = u.detach().clone().requires_grad_(True)
            vals = self.region(up)
            xt = self.read(vals[self.seg.end])
            zs = [vals[n] for n in self.seg.layers]
            gs = torch.autograd.grad((xt * self.g_top.reshape(xt.shape)).sum(), [*zs, up], allow_unused=True)
        ks = [torch.zeros_like(z) if g is None else g.detach() for z, g in zip(zs, gs[:-1])]
        g_u = torch.zeros_like(up) if gs[-1] is None else gs[-1].detach()
        return ks, g_u

    def rows_at(self, ks: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """u -> the scaled constraint rows for the inner layers' dL/dz `ks` (linear maps of their inputs)."""
        specs = [self.specs[n] for n in self.seg.layers]
        maps = [gradient_map(sp, k.reshape(1, *sp.out_shape)) for sp, k in zip(specs, ks)]
        inputs = [self.lg.data_args(n)[0] for n in self.seg.layers]

        def rows(u: torch.Tensor) -> torch.Tensor:
            vals = self.region(u)
            vals[self.seg.start] = u
            out = [
                (g(vals[a].reshape(1, *sp.in_shape)) / s).reshape(-1)
                for g, a, sp, s in zip(maps, inputs, specs, self.scales)
            ]
            out.append(self._known(self.read(vals[self.seg.end]) / self.f_scale).reshape(-1))
            return torch.cat(out)

        return rows

    def _known(self, v: torch.Tensor) -> torch.Tensor:
        """The part of a value of x' that the layers above determined (their undetermined directions projected out)."""
        if self.unknown is None:
            return v.reshape(-1)
        flat = v.reshape(-1)
        q = self.unknown.to(flat.dtype)
        return flat - q @ (q.T @ flat)

    def pattern(self, u: torch.Tensor) -> bytes:
        """Which piece of every clip (ReLU, hardtanh ...) in the segment and in the link above is active at u."""
        with torch.no_grad():
            vals = self.region(u)
        key = [self.above.pattern(vals[self.seg.end])]
        for n in self.seg.nodes:
            clip = self.lg.node(n).info.clip
            if clip is not None:
                v = vals[n]
                key.append(((v <= clip[0]) | (v >= clip[1])).numpy().tobytes())
        return b"".join(key)


def solve(prob: SegmentProblem, u_p: torch.Tensor, free: torch.Tensor, bound: torch.Tensor, limit: int = DENSE_LIMIT) -> SegmentSolution:
    """The minimum-norm solution at the pattern of u_p over the `free` entries (the others at `bound`)."""
    t0 = time.perf_counter()
    ks, _ = prob.dldz(u_p)
    rows = prob.rows_at(ks)
    u_p = u_p.detach().reshape(prob.u_shape)
    r0 = rows(u_p).detach()

    def lin(t: torch.Tensor) -> torch.Tensor:  # J t (torch.func.linearize trips over views in fx-traced graphs)
        return torch.func.jvp(rows, (u_p,), (t,))[1].detach()

    offset = r0 - lin(u_p)  # c: rows(u) = J u + c at this pattern
    fixed = torch.where(free, torch.zeros_like(bound), bound)
    rhs = prob.target - offset - lin(fixed)
    idx = torch.nonzero(free.reshape(-1)).reshape(-1)
    n, m = int(idx.numel()), int(rhs.numel())
    null_t: torch.Tensor | None = None
    nullity: int | None = None
    rel: float | None = None
    notes: list[str] = []
    if n * m <= limit:
        cols = [out.reshape(part.numel(), -1) for part, out in unit_columns(lin, idx, prob.u_shape, TANGENT_CHUNK)]
        jt = torch.cat(cols).numpy() if cols else np.zeros((0, m))
        left, sv, vt = np.linalg.svd(jt.T, full_matrices=False)
        r, rel = rank_rule(sv, (m, n))
        coef = (left[:, :r].T @ rhs.numpy()) / sv[:r]
        sol = vt[:r].T @ coef
        nullity = n - r
        if nullity:
            full_vt = np.linalg.svd(jt.T, full_matrices=True)[2] if m < n else vt
            basis = torch.zeros(u_p.numel(), nullity, dtype=u_p.dtype)
            basis[idx] = torch.from_numpy(np.ascontiguousarray(full_vt[r:].T))
            null_t = basis
        method = "joint least squares over the segment input (dense SVD)"
    else:
        back = torch.func.vjp(rows, u_p)[1]

        def mv(v: np.ndarray) -> np.ndarray:
            full = torch.zeros(u_p.numel(), dtype=u_p.dtype)
            full[idx] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
            return lin(full.reshape(prob.u_shape)).numpy()

        def rmv(y: np.ndarray) -> np.ndarray:
            (g,) = back(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64)))
            return g.detach().reshape(-1)[idx].numpy()

        op = spl.LinearOperator((m, n), matvec=mv, rmatvec=rmv, dtype=np.float64)
        t1 = time.perf_counter()
        rmv(mv(np.ones(n)))  # one product each way: the iteration budget follows from their cost
        per_iter = max(time.perf_counter() - t1, 1e-6)
        limit_iters = max(10, min(LSQR_ITERS, int(LSQR_SECONDS / per_iter)))
        out = spl.lsqr(op, rhs.numpy(), atol=1e-14, btol=1e-14, iter_lim=limit_iters)
        sol, iters = out[0], int(out[2])
        method = "joint least squares over the segment input (LSQR on jvp/vjp)"
        why = f"the {LSQR_SECONDS:g} s budget" if iters >= limit_iters and limit_iters < LSQR_ITERS else f"istop {int(out[1])}"
        notes.append(f"LSQR stopped after {iters} iterations ({why}); no nullity is claimed")
    u = fixed.reshape(-1).clone()
    u[idx] = torch.from_numpy(np.ascontiguousarray(sol))
    u = u.reshape(prob.u_shape)
    ks_at, g_u = prob.dldz(u)
    pred = rows(u).detach()
    res = pred - prob.target
    g_res = float(res[: prob.n_grad].norm() / prob.target[: prob.n_grad].norm().clamp_min(1e-300))
    f_res = float(res[prob.n_grad :].norm() / prob.target[prob.n_grad :].norm().clamp_min(1e-300))
    return SegmentSolution(
        u=u,
        g=g_u,
        method=method,
        unknowns=n,
        rows=m,
        fwd_rows=m - prob.n_grad,
        nullity=nullity,
        sigma_min_rel=rel,
        residual_grad=g_res,
        residual_fwd=f_res,
        null_basis=null_t,
        ks=dict(zip(prob.seg.layers, ks_at)),
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def known_entries(prob: SegmentProblem, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(free, bound): the entries of u that the clip below the cut sets to one of its bounds (a ReLU's
    zeros) are known from the pattern, and sit at that bound's value; the rest are free."""
    bound = torch.zeros(prob.u_shape, dtype=torch.float64)
    clipped = prob.below.clipped_entries(u)
    clip = _clip_below(prob)
    if clipped is None or clip is None:
        return torch.ones(prob.u_shape, dtype=torch.bool), bound
    clipped = clipped.reshape(prob.u_shape)
    lo, hi = clip
    u = u.reshape(prob.u_shape)
    at_lo = clipped & ((u - lo).abs() <= (u - hi).abs())
    bound = torch.where(at_lo, torch.full_like(bound, lo), torch.where(clipped, torch.full_like(bound, hi), bound))
    return ~clipped, bound


def solve_given(prob: SegmentProblem, u_true: torch.Tensor) -> SegmentSolution:
    """The system at the true input's activation pattern (the audit's assumption)."""
    free, bound = known_entries(prob, u_true)
    sol = solve(prob, u_true, free, bound)
    sol.method += ", at the instance's activation patterns (the audit's 'given pattern')"
    return sol


def solve_estimated(prob: SegmentProblem, passes: int = ESTIMATE_PASSES) -> SegmentSolution:
    """Fixed-point passes from u = 1 (every unit below the cut active): solve at the current pattern, re-read
    it at the solution, until it settles; entries the clip below sets to its bound are re-estimated from
    each solution. A heuristic: the pattern is a combinatorial unknown, and nothing guarantees it is found."""
    u = torch.ones(prob.u_shape, dtype=torch.float64)
    free = torch.ones(prob.u_shape, dtype=torch.bool)
    bound = torch.zeros(prob.u_shape, dtype=torch.float64)
    lo = _clip_low(prob)
    seen = prob.pattern(u)
    best: SegmentSolution | None = None
    t0 = time.perf_counter()
    for i in range(1, passes + 1):
        sol = solve(prob, u, free, bound)
        sol.passes = i
        score = sol.residual_grad + (sol.residual_fwd or 0.0)
        if best is None or score <= best.residual_grad + (best.residual_fwd or 0.0):
            best = sol
        u = sol.u if lo is None else sol.u.clamp_min(lo)
        if lo is not None:
            free = u > lo
            bound = torch.where(free, torch.zeros_like(u), torch.full_like(u, lo))
        new = prob.pattern(u)
        if new == seen and i > 1:
            sol.settled = True
            best = sol
            break
        seen = new
    else:
        assert best is not None
        best.settled = False
    assert best is not None
    best.seconds = time.perf_counter() - t0
    best.method += f", activation patterns estimated by {best.passes} fixed-point pass(es) from u = 1"
    if not best.settled:
        best.notes.append(f"the activation pattern did not settle in {passes} passes: kept the pass with the smallest residual")
    return best


def _clip_low(prob: SegmentProblem) -> float | None:
    """The lower bound of the clip right below the cut (0 for a ReLU), when nothing but reshapes follow it."""
    clip = _clip_below(prob)
    return None if clip is None or clip[0] is None or not math.isfinite(clip[0]) else float(clip[0])


def _clip_below(prob: SegmentProblem) -> tuple[float, float] | None:
    """The bounds of the clip right below the cut (a ReLU's (0, inf)), when nothing but reshapes follow it."""
    steps = list(prob.below.steps)
    while steps and steps[-1].role in (ops.PASS, ops.REORDER):
        steps.pop()
    if not steps or steps[-1].role != ops.CLIP or steps[-1].info.clip is None:
        return None
    lo, hi = steps[-1].info.clip
    return float(lo), float(hi)
