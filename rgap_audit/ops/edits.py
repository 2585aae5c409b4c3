"""How a weighted layer can be edited (the --defences architecture search): its width, stride, kernel, the fan-in
attribute a layer above must follow, and the average pool that can be inserted after it.

Layer-type knowledge, so it lives in ops/ (tests/test_ops_boundary.py); the search in
rgap_audit.defence.architecture reads these entries only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Editable:
    """One editable module class."""

    width: str  # the attribute that sets the output width: out_channels / out_features
    fan_in: str  # the attribute a layer reading this one's output must match: in_channels / in_features
    spatial: int  # spatial dimensions (0: a Linear; stride, kernel and pooling edits need >= 1)
    build: Callable[[dict[str, Any]], nn.Module]  # a new module from its constructor arguments
    arguments: Callable[[nn.Module], dict[str, Any]]  # the constructor arguments of an existing module
    fan_in_of: Callable[[torch.Tensor], int]  # the fan-in an input tensor (batch first) calls for
    pool: Callable[[int], nn.Module] | None = None  # an average pool with this kernel over the spatial dims


def _conv_args(m: Any) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": tuple(m.kernel_size),
        "stride": tuple(m.stride), "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
        "dilation": tuple(m.dilation), "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode,
    }


def _linear_args(m: Any) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


_POOLS: dict[int, Callable[[int], nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}

EDITABLE: dict[type, Editable] = {nn.Linear: Editable("out_features", "in_features", 0, lambda a: nn.Linear(**a), _linear_args, lambda x: int(x.shape[-1]))}
for _dims, _cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
    EDITABLE[_cls] = Editable(
        "out_channels", "in_channels", _dims, (lambda c: (lambda a: c(**a)))(_cls), _conv_args, lambda x: int(x.shape[1]), _POOLS[_dims]
    )


def editable(module: nn.Module | None) -> Editable | None:
    """The entry of the module's class (exact class first, then its bases), or None when it is not editable."""
    if module is None:
        return None
    for cls in type(module).__mro__:
        if cls in EDITABLE:
            return EDITABLE[cls]
    return None


def rebuilt(module: nn.Module, changes: dict[str, Any]) -> nn.Module:
    """A fresh module of the same kind with some constructor arguments changed, on the old one's dtype and device
    (new weights: drawn by PyTorch's default initialisation under the caller's RNG state)."""
    entry = editable(module)
    if entry is None:
        raise ValueError(f"{type(module).__name__} is not an editable layer")
    args = {**entry.arguments(module), **changes}
    new = entry.build(args)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        new = new.to(dtype=weight.dtype, device=weight.device)
    return new.train(module.training)


def with_pool(module: nn.Module, kernel: int) -> nn.Module:
    """The layer followed by an average pool of this kernel (a Sequential of the two)."""
    entry = editable(module)
    if entry is None or entry.pool is None:
        raise ValueError(f"{type(module).__name__}: no pooling can be inserted after it")
    return nn.Sequential(module, entry.pool(kernel))
