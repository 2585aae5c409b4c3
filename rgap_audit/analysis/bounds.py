"""Bounds carried down the walk when a layer's rank is only bounded or its undetermined directions are
too many to keep as a basis: the layer below learns how many directions were lost, not which."""

from __future__ import annotations

from dataclasses import replace

import torch

from rgap_audit.rank import LayerRank


def span_text(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}..{hi}"


def rank_given_uncertain_above(res: LayerRank, uncertain: tuple[int, int], rows_hi: int) -> LayerRank:
    """Bounds on a layer's rank when the layer above left between d_lo and d_hi directions of z's
    image undetermined but no basis of them is known. res was computed as if all of z were known,
    so it bounds the true rank from above; dropping d_hi rows lowers a rank by at most d_hi, and the
    forward block has at most rows_hi rows (the caller capped them by end_dims - d_lo):
        max(rank K, rank_full_lower - d_hi) <= rank <= min(rank_full_upper, rank K + rows_hi)."""
    _d_lo, d_hi = uncertain
    full_lo = res.rank if res.rank is not None else res.rank_lower
    full_hi = res.rank if res.rank is not None else res.rank_upper
    base = res.rank_grad if res.rank_grad is not None else res.rank_lower
    lo = max(base, full_lo - d_hi)
    hi = min(full_hi, base + rows_hi) if res.rank_grad is not None else full_hi
    exact = lo == hi
    null = None
    if exact and lo == res.unknowns and res.null_basis is not None:
        null = torch.zeros(res.null_basis.shape[0], 0, dtype=torch.float64)
    return replace(
        res,
        rank=lo if exact else None,
        rank_lower=lo,
        rank_upper=hi,
        deficit=res.unknowns - lo if exact else None,
        method=res.method if exact else "bounds",
        null_basis=null,
    )
