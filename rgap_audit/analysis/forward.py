"""Forward rows: what the attacker knows of a weighted layer's output z when the walk reaches it, and
which of the layer's input entries are known constants (a ReLU's zeros, given the pattern)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import torch
from scipy.sparse import csgraph

from rgap_audit import ops
from rgap_audit.analysis.bounds import span_text
from rgap_audit.analysis.state import WalkState
from rgap_audit.convspec import ConvSpec
from rgap_audit.instance import Instance
from rgap_audit.links import Link
from rgap_audit.rank import AboveRows, CarriedDirections, ForwardInfo
from rgap_audit.records import Chain
from rgap_audit.structure import entry_map


@dataclass
class ForwardSide:
    """The forward constraints of one layer and why they are what they are."""

    info: ForwardInfo
    chain: Chain
    why: str
    uncertain: tuple[int, int] | None  # bounds on the directions the layer above left undetermined (no basis)


def forward_side(inst: Instance, state: WalkState, name: str, gen: torch.Generator, z0: torch.Tensor | None = None) -> ForwardSide:
    """What the attacker knows about this layer's output z, and why; `uncertain` carries the (lower,
    upper) count of directions the layer above left undetermined when only bounds are known (then
    ForwardInfo.rows is an upper bound and the caller turns the rank into bounds). `name` may be a
    joint segment (its link above starts at the segment's end, whose value is z0)."""
    lg = inst.graph
    link = state.above[name]
    z0 = inst.values[name] if z0 is None else z0
    n_samples_z = z0.shape[0]
    if link.upper is None:
        return ForwardSide(ForwardInfo(none=True, rows=0), Chain.NONE, f"no forward constraints: {link.cut}", None)
    lossy = [s.name for s in link.steps if not s.info.invertible]
    unknown_ops = [s.name for s in link.steps if s.info.kind == ops.UNKNOWN]
    fn = link.fn()
    uncertain: tuple[int, int] | None = None
    unknown: torch.Tensor | None = None
    if link.upper == lg.output_node:
        if inst.batch > 1 or n_samples_z != inst.batch:
            why = f"output layer: the {inst.loss} loss of a batch of {inst.batch} does not reveal each sample's output"
            return ForwardSide(ForwardInfo(none=True, rows=0), Chain.NONE, why, None)
        why = f"output layer: the {inst.loss} loss reveals the output"
        end_dims = fn(z0).numel()
        if inst.loss == "cross-entropy":
            unknown = torch.full((end_dims, 1), 1.0 / math.sqrt(end_dims), dtype=torch.float64)
            why = "output layer: cross-entropy reveals the logits up to a constant"
    elif link.upper in state.failed:
        why = f"no forward constraints: the layer above ({link.upper}) could not be analysed"
        return ForwardSide(ForwardInfo(none=True, rows=0), Chain.NONE, why, None)
    else:
        upper = state.nulls.get(link.upper)
        unknown = upper if (upper is not None and upper.shape[1] > 0) else None
        end_dims = state.unit_size.get(link.upper) or ops.numel(lg.node(link.upper).in_shape or ())
        uncertain = state.carried.get(link.upper)
        if uncertain is not None:
            unknown = None
            why = f"layer above ({link.upper}) left {span_text(*uncertain)} directions undetermined (bounds)"
        elif unknown is not None:
            why = f"layer above ({link.upper}) left {unknown.shape[1]} directions undetermined"
        else:
            why = f"layer above ({link.upper}) recovered"
    d = 0 if unknown is None else unknown.shape[1]
    if link.steps:  # the entries that reach the next tensor, capped by its size
        rows = max(0, min(link.reach(z0, gen), end_dims) - d)
    else:  # z itself is the next tensor: every entry reaches it
        rows = max(0, min(z0.numel(), end_dims) - d)
    if uncertain is not None:
        # at most (its unknowns - lower bound) directions of the next input are known beyond its known constants,
        # which z does not reach (a ReLU's zeros): the rows z reaches lie among those unknowns
        among = state.carried_among.get(link.upper, end_dims)
        rows = max(0, min(rows, end_dims - uncertain[0], among - uncertain[0]))
        why += f": at most {rows} forward rows"
    info = ForwardInfo(jac=link.jvp_batch(z0) if link.steps else None, unknown=unknown, rows=rows)
    if uncertain is None:
        info.entries = entry_rows(link, z0, unknown)
    elif n_samples_z > 1:
        info.above_rows = above_rows(state, link, z0)
    if lossy:
        why += f"; through non-invertible {', '.join(lossy)}: forward constraints on {rows} of {z0.numel()} entries"
    if unknown_ops:
        why += f"; through not-understood {', '.join(unknown_ops)} (treated as known to the attacker)"
    exact_above = d == 0 and (uncertain is None or uncertain[1] == 0)
    chain = Chain.FULL if not lossy and exact_above else Chain.PARTIAL
    return ForwardSide(info, chain, why, uncertain if uncertain is not None and uncertain[1] > 0 else None)


def above_rows(state: WalkState, link: Link, z0: torch.Tensor) -> AboveRows | None:
    """B > 1, the layer above kept no basis of what it left undetermined: its own rows, when its system is
    exactly null([K_j; F_j]) (ranked exactly, per-sample forward rows or none, nothing carried into it) and the link
    moves entries one by one (so that the composed forward rows stay per sample)."""
    above = state.systems.get(link.upper) if link.upper is not None else None
    if above is None or above.result.rank is None or above.forward.unknown is not None:
        return None
    # an output layer of a batch has no forward rows (the loss does not reveal each sample's output): K_j alone
    entries = (np.zeros(0, dtype=np.int64), None) if above.forward.none else above.forward.entries
    if entries is None or entries[1] is not None or not isinstance(above.spec, ConvSpec) or above.spec.groups != 1:
        return None
    if not _entrywise(link):
        return None
    if link.steps:
        emap = _entry_map(link, z0)
        if emap is None:
            return None
        idx, fac = emap
    else:
        idx, fac = np.arange(z0.numel()), np.ones(z0.numel())
    k = above.k.detach().to(torch.float64).cpu().numpy()
    return AboveRows(spec=above.spec, k=k, rows_idx=entries[0], idx=idx, fac=fac)


ENTRYWISE = (ops.PASS, ops.REORDER, ops.SLICE)  # link roles that move each entry of z to one entry of x'


def _entrywise(link: Link) -> bool:
    """Every op of the link maps entries of z one by one (elementwise ops, reshapes, permutations, slices)."""
    return all(s.info.elementwise or s.role in ENTRYWISE for s in link.steps)


def _entry_map(link: Link, z0: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """Per entry of x', the entry of z it reads and its factor, for a link with steps (structure.entry_map
    on the link's Jacobian at z0), or None when the link is not of that kind."""
    push = link.jvp_batch(z0)
    return entry_map(lambda t: push(t.reshape(1, *z0.shape))[0], tuple(z0.shape))


def entry_rows(link: Link, z0: torch.Tensor, unknown: torch.Tensor | None) -> tuple[np.ndarray, CarriedDirections | None] | None:
    """When every op of the link maps entries of z one by one (elementwise ops, reshapes, permutations,
    a slice of a concatenation), the forward rows are the entries of z that reach x', scaled: their
    indices, and the directions left undetermined above in z coordinates (J^T S / d^2 for J = P diag(d)).
    None for any other link (pools, norms over a slice, unknown ops).

    The directions come as CarriedDirections: a raw basis, orthonormalised on first use. When each entry of
    x' reads its own entry of z and S is orthonormal, the raw basis is S scaled row by row, so its singular
    values lie between the smallest and the largest scale, and the batch routes below (batchrank's angle
    proof and carried elimination) use it without orthonormalising it."""
    if not _entrywise(link):
        return None
    if link.steps:
        end = link.fn()(z0)
        d = link.vjp(z0, torch.ones_like(end)).detach().reshape(-1)
    else:
        d = torch.ones(z0.numel(), dtype=z0.dtype)
    rows = torch.nonzero(d != 0).reshape(-1)
    if unknown is None:
        return rows.numpy(), None

    def carried(raw, sv_bounds: tuple[float, float] | None = None) -> CarriedDirections:
        return CarriedDirections(raw=raw, sv_bounds=sv_bounds, orthonormalise=_orthonormal_by_blocks)

    if link.steps:
        emap = _entry_map(link, z0)
        if emap is not None:  # J^T S as a scatter: each entry of x' reads one entry of z
            idx, fac = emap
            s_np = unknown.detach().to(z0.dtype).numpy().reshape(idx.size, -1)
            if np.count_nonzero(s_np) < 0.05 * s_np.size:  # sparse (one channel each below a depthwise layer)
                r_nz, c_nz = np.nonzero(s_np)
                src = idx[r_nz]
                keep = src >= 0
                d_np = d.numpy()
                vals = fac[r_nz[keep]] * s_np[r_nz[keep], c_nz[keep]] / np.maximum(d_np[src[keep]] ** 2, 1e-300)
                # duplicates (an entry of z read twice, e.g. by two slices) are summed, as J^T sums them
                t_sp = sp.csr_matrix((vals, (src[keep], c_nz[keep])), shape=(z0.numel(), s_np.shape[1]))
                return rows.numpy(), carried(t_sp[rows.numpy()])
            live = idx >= 0
            cols_np = np.zeros((z0.numel(), s_np.shape[1]))
            src = idx[live]
            d2 = (d * d).clamp_min(1e-300).numpy()
            bounds = None
            if np.unique(src).size == src.size:  # one entry of x' per entry of z (no slice read twice): a plain scatter
                # scaled in one pass (the division by d^2 folded into the factors: no second copy of t)
                s_live = s_np if bool(live.all()) else s_np[live]
                w = fac[live] / d2[src]
                cols_np[src] = s_live * w[:, None]
                if bool(live.all()) and w.size and float(np.abs(w).min()) > 0 and bool(np.all(d.numpy()[src] != 0)) and _orthonormal_columns(s_np):
                    bounds = (float(np.abs(w).min()), float(np.abs(w).max()))  # every row of S kept, scaled by w, among the rows
            else:
                np.add.at(cols_np, src, fac[live, None] * s_np[live])
                cols_np /= d2[:, None]
            if rows.numel() == z0.numel():  # every entry reaches x': t is the scatter itself
                return rows.numpy(), carried(cols_np, bounds)
            return rows.numpy(), carried(cols_np[rows.numpy()], bounds)
        cols = link.vjp_batch(z0, unknown.T.to(z0.dtype)).reshape(unknown.shape[1], -1)  # (d, n_z)
        t = (cols / (d * d).clamp_min(1e-300)).T
        return rows.numpy(), carried(t[rows].detach().numpy())
    t = unknown.to(z0.dtype)
    whole = rows.numel() == z0.numel()
    return rows.numpy(), carried(t[rows].detach().numpy(), (1.0, 1.0) if whole and _orthonormal_columns(t.detach().numpy()) else None)


def _orthonormal_columns(s: np.ndarray, tol: float = 1e-10) -> bool:
    """A randomised check that S^T S = I (two probes, O(size of S)): the contract of the null bases the
    walk carries, checked before bounds on a scaled basis are derived from it."""
    if s.shape[1] == 0:
        return True
    v = np.random.default_rng(0).standard_normal((s.shape[1], 2))
    return bool(np.abs(s.T @ (s @ v) - v).max() <= tol * np.abs(v).max())


def _orthonormal_by_blocks(t: np.ndarray | sp.spmatrix) -> np.ndarray:
    """An orthonormal basis of t's columns (QR, as a whole), computed per group of columns that share no
    row with any other group: directions a grouped (depthwise) layer left undetermined live on one
    channel each, and a dense QR of all of them together costs seconds where the blocks cost
    milliseconds. t dense or sparse (the blocks are read from its nonzeros); the result is dense, with
    the same column space."""
    m, d = t.shape
    sparse = isinstance(t, sp.spmatrix)
    if d < 64:
        return np.linalg.qr(_dense(t))[0]
    if not sparse and int(np.count_nonzero(t != 0, axis=1).max(initial=0)) == d:
        return _orthonormal(_dense(t))  # one row meets every column: one group
    coo = sp.coo_matrix(t)
    nz = coo.data != 0
    r_nz, c_nz, v_nz = coo.row[nz], coo.col[nz], coo.data[nz]
    n_comp, label = _column_groups(sp.csr_matrix((np.ones(r_nz.size, dtype=np.int8), (r_nz, c_nz)), shape=(m, d)))
    if n_comp == 1:
        return _orthonormal(_dense(t))
    q = np.zeros((m, d))
    col_order = np.argsort(label, kind="stable")
    col_starts = np.searchsorted(label[col_order], np.arange(n_comp + 1))
    comp_nz = label[c_nz]
    nz_order = np.argsort(comp_nz, kind="stable")
    nz_starts = np.searchsorted(comp_nz[nz_order], np.arange(n_comp + 1))
    width = np.diff(col_starts)
    alone = width[label[c_nz]] == 1  # nonzeros of one-column components: each column is just normalised
    norm2 = np.bincount(c_nz[alone], weights=v_nz[alone] ** 2, minlength=d)
    q[r_nz[alone], c_nz[alone]] = v_nz[alone] / np.sqrt(norm2[c_nz[alone]])
    for c in np.flatnonzero(width > 1):
        cols = col_order[col_starts[c] : col_starts[c + 1]]
        sel = nz_order[nz_starts[c] : nz_starts[c + 1]]
        if sel.size == 0:
            continue
        rows = np.unique(r_nz[sel])  # the rows these columns touch, from the sparsity pattern
        block = np.zeros((rows.size, cols.size))
        block[np.searchsorted(rows, r_nz[sel]), np.searchsorted(cols, c_nz[sel])] = v_nz[sel]
        qc = np.linalg.qr(block)[0]  # (len(rows), min(len(rows), len(cols)))
        q[np.ix_(rows, cols[: qc.shape[1]])] = qc
    return q[:, np.any(q != 0, axis=0)]  # a component with fewer rows than columns spans only its rows


def _dense(t: np.ndarray | sp.spmatrix) -> np.ndarray:
    return t.toarray() if isinstance(t, sp.spmatrix) else t


def _column_groups(nz: sp.csr_matrix) -> tuple[int, np.ndarray]:
    """Connected components of the columns of a sparsity pattern, two columns linked when they share a
    row: each row links its first column to its others (nnz edges; the column Gram nz^T nz would cost
    sum over rows of nnz(row)^2, 1e11 for a dense pattern)."""
    d = nz.shape[1]
    counts = np.diff(nz.indptr)
    firsts = np.repeat(nz.indices[nz.indptr[:-1][counts > 0]], counts[counts > 0])
    links = sp.csr_matrix((np.ones(firsts.size, dtype=np.int8), (firsts, nz.indices)), shape=(d, d))
    n_comp, label = csgraph.connected_components(links, directed=False)
    return int(n_comp), label


_CHOLQR_RCOND = 1e-3  # one Cholesky-QR pass loses ~eps / rcond(t^T t) of orthogonality: 2e-13 at this bound


def _orthonormal(t: np.ndarray) -> np.ndarray:
    """An orthonormal basis of t's columns: Cholesky QR (t^T t = R^T R, Q = t R^-1, two BLAS-3 products,
    about 4x cheaper than Householder QR for a tall t) when LAPACK's condition estimate of t^T t keeps the
    loss of orthogonality at rounding level, a second pass when it is moderate (CholeskyQR2), Householder
    QR when t^T t is not numerically positive definite (rank-deficient or ill-conditioned t)."""
    q = t
    for _pass in range(2):
        g = q.T @ q
        try:
            r = sla.cholesky(g, lower=False, check_finite=False)
        except np.linalg.LinAlgError:
            return np.linalg.qr(t)[0]
        rcond, info = sla.lapack.dpocon(r, float(np.abs(g).sum(axis=0).max()))
        if info != 0 or not rcond > 1e-12:
            return np.linalg.qr(t)[0]
        if rcond >= _CHOLQR_RCOND or _pass == 0:
            q = sla.solve_triangular(r, q.T, trans="T", lower=False, check_finite=False).T  # (R^-T t^T)^T: t's layout read as is
        if rcond >= _CHOLQR_RCOND:
            return q
    return np.linalg.qr(t)[0]  # the second pass did not reach rounding level


def known_inputs(inst: Instance, state: WalkState, name: str, n_samples: int, in_shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor | None:
    """Entries of this layer's input that do not depend on the layer below (a ReLU's zeros, given the
    activation pattern): known constants to the attacker, so not unknowns."""
    link = state.below.get(name)
    if link is None or not link.steps or link.lower is None:
        return None
    if link.joins:
        # other branches feed this input too: entries this branch leaves constant are not known
        # constants (a conservative choice: ReLU zeros inside a branch are counted as unknowns)
        return None
    known = link.constant_entries(inst.values[link.lower], gen).reshape(n_samples, *in_shape)
    return known if bool(known.any()) else None
