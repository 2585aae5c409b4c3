"""The system of a joint segment: every weighted layer between two cuts, ranked over the segment's input.

Once the activation patterns are fixed at the instance (R-GAP's assumption), each inner layer's input
a_i is a linear function of the segment input u (through BatchNorm, ReLU masks, pooling, shortcuts,
sums and concatenations), so its weight gradient dL/dW_i = k_i (x) a_i(u) is linear in u too. Stacked
with the forward rows from what is known of the segment's output, they form one linear system in u:

    M u = [ G_1 J_1 ; ... ; G_m J_m ; C J_end ] u

(G_i: the layer's gradient map for its instance dL/dz, J_i: the Jacobian of a_i in u, C: the forward
rows of the link above the segment's end). M is built column by column with forward-mode Jacobian
products (torch.func.jvp over the segment's own computation, linearised at the instance) and ranked
with the same rule as a single layer (rgap_audit.rank). Row blocks are scaled to unit norm: the rank
does not change, and a block of small gradients is not lost below the tolerance of a large one.
Where M is too large to form, the result is proven bounds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from rgap_audit.convspec import ConvSpec
from rgap_audit.instance import Instance
from rgap_audit.links import region_function
from rgap_audit.rank import ForwardInfo, LayerRank, _rank_null
from rgap_audit.segments import Segment

TANGENT_CHUNK = 128  # tangents pushed through the segment at once
SUBBLOCK = "joint-subblock"  # rank = unknowns because one inner layer's own gradient rows have full column rank


@dataclass
class InnerLayer:
    """A weighted layer inside a segment: where its input is, its layer description and its dL/dz."""

    node: str
    input_node: str
    spec: object  # ConvSpec | ConvTransposeSpec
    k: torch.Tensor  # (samples, *out_shape)
    frozen: bool


def gradient_map(spec, k: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> dL/dW = the layer's weight gradient for input x and output gradient k (linear in x),
    written so that it composes with jvp and vmap (ConvSpec.weight_grad; torch.func.vjp otherwise)."""
    w0 = spec.weight.detach().to(torch.float64)
    kk = k.detach().to(torch.float64)
    if isinstance(spec, ConvSpec):
        return lambda x: spec.weight_grad(x, kk)

    def grad_w(x: torch.Tensor) -> torch.Tensor:
        def fw(w: torch.Tensor) -> torch.Tensor:
            return replace(spec, weight=w, bias=None).forward(x, with_bias=False)

        return torch.func.vjp(fw, w0)[1](kk)[0]

    return grad_w


def joint_rank(
    inst: Instance,
    seg: Segment,
    layers: list[InnerLayer],
    fwd: ForwardInfo,
    known: torch.Tensor | None,
    fwd_width: int,
    exact_limit: int,
    rank_grad_bounds: tuple[int, int],
) -> LayerRank:
    """Rank of the segment's system over its input (known entries excluded), exact where M fits
    `exact_limit` entries, else bounds. fwd_width: entries at the end of the link above the segment
    (the forward block's columns); rank_grad_bounds: (lower, upper) bounds on the rank of the
    gradient rows alone, from the inner layers' own ranks (used only for the bounds)."""
    t0 = time.perf_counter()
    u0 = inst.values[seg.start].detach().to(torch.float64)
    n_full = u0.numel()
    free = torch.arange(n_full) if known is None else torch.nonzero(~known.reshape(-1)).reshape(-1)
    unknowns = int(free.numel())
    live = [lay for lay in layers if not lay.frozen]
    grad_rows = 0
    for lay in live:
        grad_rows += int(lay.spec.weight.numel())  # type: ignore[attr-defined]
    fwd_rows = 0 if fwd.none else int(fwd.rows or 0)
    rows_total = grad_rows + (0 if fwd.none else fwd_width)
    lo_g, hi_g = rank_grad_bounds
    if unknowns == 0:
        return _result(0, 0, grad_rows, fwd_rows, 0, 0, 0, "joint-dense", None, torch.zeros(n_full, 0, dtype=torch.float64), t0)
    if rows_total * unknowns > exact_limit:
        lower = min(unknowns, lo_g)
        upper = min(unknowns, hi_g + fwd_rows)
        if lower == unknowns:  # a sub-block of M (a layer reading the cut directly) has full column rank already
            none = torch.zeros(n_full, 0, dtype=torch.float64)
            return _result(unknowns, unknowns, grad_rows, fwd_rows, unknowns, unknowns, None, SUBBLOCK, None, none, t0)
        return _result(unknowns, None, grad_rows, fwd_rows, lower, upper, None, "bounds", None, None, t0)
    m = _system_matrix(inst, seg, live, fwd, u0, free)
    blocks = m["blocks"]
    grad_only = np.hstack([b for name, b in blocks if name != "forward"]) if live else np.zeros((unknowns, 0))
    r_g, _, _ = _rank_null(grad_only.T, False) if grad_only.size else (0, None, None)
    full = np.hstack([b for _n, b in blocks]) if blocks else np.zeros((unknowns, 0))
    # a basis of the undetermined directions is handed down only when it fits the limit (as rank.layer_rank's);
    # otherwise the unit below learns their count. Fewer rows than unknowns bound the deficit from below, so a
    # basis that cannot fit is not computed (a batch's summed gradient: 16384 unknowns, 1200 rows, a 2 GB basis)
    def fits(deficit: int) -> bool:
        return n_full * deficit <= 2 * exact_limit  # as batchrank keeps a reduced system's basis

    null_f: np.ndarray | None
    if full.size == 0:
        rank, rel, null_f = 0, None, (np.eye(unknowns) if fits(unknowns) else None)
    elif fits(max(0, unknowns - full.shape[1])):
        rank, rel, null_f = _rank_null(full.T, True)
    else:
        rank, rel, null_f = _rank_null(full.T, False)
    null: torch.Tensor | None = None
    if null_f is not None and fits(unknowns - rank):
        null = torch.zeros(n_full, unknowns - rank, dtype=torch.float64)
        if null_f.shape[1]:
            null[free] = torch.from_numpy(np.ascontiguousarray(null_f))
    return _result(unknowns, rank, grad_rows, fwd_rows, rank, rank, r_g, "joint-dense", rel, null, t0)


def _result(unknowns, rank, grad_rows, fwd_rows, lower, upper, rank_grad, method, rel, null, t0) -> LayerRank:
    return LayerRank(
        unknowns=unknowns, grad_rows=grad_rows, fwd_rows=fwd_rows, rank_grad=rank_grad, rank_grad_counting=grad_rows,
        rank=rank, rank_lower=lower, rank_upper=upper, deficit=None if rank is None else unknowns - rank,
        method=method, sigma_min_rel=rel, null_basis=null, seconds=time.perf_counter() - t0,
    )


def _system_matrix(inst: Instance, seg: Segment, layers: list[InnerLayer], fwd: ForwardInfo, u0: torch.Tensor, free: torch.Tensor) -> dict:
    """M^T by blocks: for each inner layer (and the forward rows) a (unknowns, rows) array, scaled to norm 1."""
    nodes = tuple(seg.nodes)
    region = region_function(inst.graph, seg.start, nodes, inst.env)
    wanted = [lay.input_node for lay in layers]
    maps = [gradient_map(lay.spec, lay.k) for lay in layers]
    shapes = [(lay.k.shape[0], *lay.spec.in_shape) for lay in layers]  # type: ignore[attr-defined]

    def outputs(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vals = region(u)
        vals[seg.start] = u
        return tuple(vals[w] for w in wanted) + (vals[seg.end],)

    def pusher(u_p: torch.Tensor, maps_p: list, shapes_p: list) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        def columns(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
            tangents = torch.func.jvp(outputs, (u_p,), (t,))[1]
            rows = [g(a.reshape(shape)).reshape(-1) for g, a, shape in zip(maps_p, tangents[:-1], shapes_p)]
            return (*rows, tangents[-1])

        return columns

    per: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
    n_batch = int(u0.shape[0])
    end_shape = tuple(inst.values[seg.end].shape)
    whole = tuple(inst.values[w] for w in wanted) + (inst.values[seg.end],)
    if n_batch > 1 and _separable(outputs, u0, layers, whole):
        # the segment acts on each sample alone (eval mode): a tangent of sample n moves only sample n, and its
        # gradient rows are k_n's term of the summed gradient, so each sample's columns come from a one-sample
        # pass (B times less work than pushing every tangent through the whole batch)
        size = u0[0].numel()
        for n in range(n_batch):
            local = free[(free >= n * size) & (free < (n + 1) * size)] - n * size
            maps_n = [gradient_map(lay.spec, lay.k[n : n + 1]) for lay in layers]
            shapes_n = [(1, *shape[1:]) for shape in shapes]
            columns = pusher(u0[n : n + 1], maps_n, shapes_n)
            for idx, out in unit_columns(columns, local, (1, *u0.shape[1:])):
                for j, o in enumerate(out[:-1]):
                    per[j].append(o.detach().reshape(idx.numel(), -1))
                end = torch.zeros(idx.numel(), *end_shape, dtype=torch.float64)
                end[:, n] = out[-1].detach().reshape(idx.numel(), *end_shape[1:])
                per[-1].append(end.reshape(idx.numel(), -1))
    else:
        for idx, out in unit_columns(pusher(u0, maps, shapes), free, tuple(u0.shape)):
            for j, o in enumerate(out):
                per[j].append(o.detach().reshape(idx.numel(), -1))
    blocks: list[tuple[str, np.ndarray]] = []
    for lay, cols in zip(layers, per[:-1]):
        b = torch.cat(cols).numpy()
        blocks.append((lay.node, _unit(b)))
    if not fwd.none:
        dv = torch.cat(per[-1])
        v_shape = inst.values[seg.end].shape
        y = dv.reshape(dv.shape[0], *v_shape)
        if fwd.jac is not None:
            y = fwd.jac(y)
        y = y.reshape(dv.shape[0], -1)
        if fwd.unknown is not None:
            q = fwd.unknown.to(torch.float64)
            y = y - (y @ q) @ q.T
        blocks.append(("forward", _unit(y.detach().numpy())))
    return {"blocks": blocks}


def unit_columns(
    columns: Callable[[torch.Tensor], Any], idx_all: torch.Tensor, shape: tuple[int, ...], chunk: int = TANGENT_CHUNK
) -> Iterator[tuple[torch.Tensor, Any]]:
    """`columns` of the unit tangents at the flat indices idx_all into a value of `shape`, `chunk` at a time
    through vmap: (the chunk's indices, its outputs). The segment's columns here and in the attack."""
    size = math.prod(shape)
    for start in range(0, idx_all.numel(), chunk):
        idx = idx_all[start : start + chunk]
        t = torch.zeros(idx.numel(), size, dtype=torch.float64)
        t[torch.arange(idx.numel()), idx] = 1.0
        yield idx, torch.func.vmap(columns)(t.reshape(idx.numel(), *shape))


def _separable(
    outputs: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], u0: torch.Tensor, layers: list[InnerLayer], whole: tuple[torch.Tensor, ...]
) -> bool:
    """Whether the segment computes each sample from that sample alone: every inner layer sees one row per
    sample (not tokens), and a one-sample pass reproduces that sample's values of the whole-batch pass
    (`whole`, the instance's; no batch statistics, no shape arithmetic fixed to the batch size)."""
    n_batch = int(u0.shape[0])
    if any(int(lay.k.shape[0]) != n_batch for lay in layers):
        return False
    try:
        with torch.no_grad():
            for n in range(n_batch):
                one = outputs(u0[n : n + 1])
                for a, b in zip(one, whole):
                    ref = b[n : n + 1].to(a.dtype)
                    if a.shape != ref.shape or not torch.allclose(a, ref, rtol=1e-10, atol=1e-12 * (1.0 + float(ref.abs().max()))):
                        return False
    except (RuntimeError, ValueError, IndexError):  # a reshape to the batch size, an op that needs the whole batch
        return False
    return True


def _unit(b: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(b))
    return b / n if n > 0 else b
