"""Ops that keep every entry: identities (Identity, Dropout in eval mode, casts), reshapes (same
memory order) and permutations (transpose, permute). They pass the chain unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.ops.base import CONSTANT, IDENTITY, PASS, PERMUTE, REORDER, RESHAPE, OpInfo, aten, register, register_when_imported

_RESHAPE_WHY = "a permutation of entries: passes the chain unchanged"
_IDENTITY_WHY = "identity in eval mode: passes the chain unchanged"
FLATTEN_HINT = " (the model starts with a flatten, so several shapes fit)"


def _inv_identity(module: nn.Module | None, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    return y


def _flatten_hint(module: nn.Module | None) -> str:
    return FLATTEN_HINT


def _same(name: str, kind: str, why: str, **kw) -> OpInfo:
    link = REORDER if kind == PERMUTE else PASS
    return OpInfo(name, kind, True, why, link=link, jacobian=CONSTANT, elementwise=kind == IDENTITY, homogeneous=True, **kw)


IDENTITY_OP = register(_same("Identity", IDENTITY, _IDENTITY_WHY, inverse=_inv_identity), nn.Identity)
register(
    _same("Dropout", IDENTITY, _IDENTITY_WHY + " (train mode would randomise it)", inverse=_inv_identity),
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, F.dropout,
    aten.dropout.default,
)
register(
    _same("contiguous", IDENTITY, _IDENTITY_WHY, inverse=_inv_identity),
    aten.clone.default, aten.alias.default, "contiguous", "clone",
)
register(
    _same("cast", IDENTITY, "a dtype or device cast: passes the chain unchanged", inverse=_inv_identity),
    "to", "float", "double",
)
register(
    _same("flatten", RESHAPE, _RESHAPE_WHY, shape_hint=_flatten_hint),
    nn.Flatten, torch.flatten, "flatten", aten.flatten.using_ints,
)
register(_same("unflatten", RESHAPE, _RESHAPE_WHY), nn.Unflatten, torch.unflatten, "unflatten", aten.unflatten.int)
register(
    _same("reshape", RESHAPE, _RESHAPE_WHY, shape_hint=_flatten_hint),
    "view", "reshape", torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
)
def _transposes_dims(args: tuple) -> bool:
    """x.transpose(d0, d1) of a matrix: d0 and d1 are 0 and 1 (or -2 and -1)."""
    return len(args) == 2 and {int(args[0]) % 2, int(args[1]) % 2} == {0, 1}


def _always(args: tuple) -> bool:
    return True


register(
    _same("transpose", PERMUTE, _RESHAPE_WHY, transposes_matrix=_transposes_dims),
    "transpose", torch.transpose, aten.transpose.int,
)
register(_same("transpose", PERMUTE, _RESHAPE_WHY, transposes_matrix=_always), "t", torch.t, aten.t.default)
register(_same("permute", PERMUTE, _RESHAPE_WHY), "permute", torch.permute, aten.permute.default)
register(
    _same("movedim", PERMUTE, _RESHAPE_WHY),
    "movedim", "moveaxis", "swapaxes", "swapdims", torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims,
    aten.movedim.int, aten.swapaxes.default,
)
register(_same("unsqueeze", RESHAPE, _RESHAPE_WHY), "unsqueeze", torch.unsqueeze, aten.unsqueeze.default)
register(
    _same("squeeze", RESHAPE, _RESHAPE_WHY),
    "squeeze", torch.squeeze, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
)


# einops (optional): Rearrange is a reshape and a permutation of entries, never a reduction or a repeat
# (those are einops' Reduce and Repeat layers). torch.fx traces through it only for some patterns; when it
# is kept as one opaque module this entry says what it does. Its functional form einops.rearrange is
# traced into view / permute calls (torch.export), which have their own entries above.
def _enter_rearrange(module: Any) -> None:
    register(
        _same("Rearrange", PERMUTE, "einops Rearrange: a reshape and permutation of entries (no reduction): passes the chain unchanged"),
        module.Rearrange,
    )


register_when_imported("einops.layers.torch", _enter_rearrange)  # never imported by us: a model using it did
