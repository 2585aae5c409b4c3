"""Normalisation layers. Eval-mode BatchNorm is a per-channel affine map (invertible when every
gamma != 0) whose own gamma gradient gives one row per channel on its input; the norms over a slice
(LayerNorm, GroupNorm, InstanceNorm, RMSNorm) lose each slice's mean and scale.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.ops.activations import channel_view
from rgap_audit.ops.base import CONSTANT, INVERT, LOSSY, NORM, OpInfo, ParamRows, aten, register

_BN_WHY = (
    "eval mode: a per-channel affine map (running statistics), invertible when every gamma != 0; "
    "its own gamma/beta gradient rows are not yet used as constraints"
)
_LN_WHY = (
    "normalises each sample over its last dimensions: the mean and the scale of every normalised slice are lost "
    "(not invertible); its own weight/bias gradient rows are not yet used as constraints"
)
_GN_WHY = (
    "normalises each sample per group of channels: the mean and the scale of every group are lost "
    "(not invertible); its own weight/bias gradient rows are not yet used as constraints"
)
_IN_WHY = "normalises each sample per channel: every channel's mean and scale are lost (not invertible)"


def bn_affine(module: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift, per channel."""
    var = module.running_var.detach().to(y.dtype)
    mean = module.running_mean.detach().to(y.dtype)
    scale = 1.0 / torch.sqrt(var + module.eps)
    shift = -mean * scale
    if module.affine:
        g = module.weight.detach().to(y.dtype)
        shift = shift * g + module.bias.detach().to(y.dtype)
        scale = scale * g
    return scale, shift


def _inv_batchnorm(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    assert module is not None
    scale, shift = bn_affine(module, y)
    return (y - channel_view(shift, y)) / channel_view(scale, y)


_CONV_BY_DIM = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _bn_evaluate(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The module's eval-mode output, scale * x + shift per channel, as a depthwise 1x1 convolution (or a
    diagonal matmul for (N, C) inputs): under vmap of jvp these have batching rules, where a plain
    broadcast multiply, like batch_norm itself, first loads TorchDynamo. Its own call in training mode
    or without running statistics, where the batch's statistics enter."""
    if module.training or _bn_uses_batch_stats(module) or (x.dim() != 2 and x.dim() not in _CONV_BY_DIM):
        return module(x)
    scale, shift = bn_affine(module, x)
    c = scale.numel()
    if x.dim() == 2:
        return x @ torch.diag(scale) + shift
    return _CONV_BY_DIM[x.dim()](x, scale.reshape(c, *([1] * (x.dim() - 1))), shift, groups=c)


def _bn_uses_batch_stats(m: Any) -> bool:
    return (not getattr(m, "track_running_stats", True)) or getattr(m, "running_mean", None) is None


def _bn_instance(m: Any, base: OpInfo) -> OpInfo:
    if _bn_uses_batch_stats(m):
        return replace(
            base,
            invertible=False,
            inverse=None,
            link=LOSSY,
            elementwise=False,
            why="track_running_stats=False: normalises by the batch's own statistics even in eval mode, so each "
            "channel's mean and scale over the batch are lost (like GroupNorm)",
        )
    if getattr(m, "affine", False) and m.weight is not None:
        zero = torch.nonzero(m.weight.detach() == 0).flatten().tolist()
        if zero:
            shown = ", ".join(str(c) for c in zero[:8]) + (" ..." if len(zero) > 8 else "")
            return replace(
                base,
                invertible=False,
                inverse=None,
                link=LOSSY,
                why=f"per-channel affine map with gamma = 0 on channel(s) {shown}: those outputs are constant and "
                "their inputs are lost",
            )
    return base


def _bn_check(m: Any) -> str | None:
    if _bn_uses_batch_stats(m):
        return (
            f"{type(m).__name__} has track_running_stats=False: it normalises by batch statistics in every mode; "
            "analysed as the non-invertible normalisation it is"
        )
    if m.training:
        return (
            f"{type(m).__name__} is in training mode: a client training with it normalises by the batch's own "
            "statistics, which removes each channel's mean and scale from what the gradient determines; "
            "rgap-audit analyses it in eval mode (running statistics, a per-channel affine map)"
        )
    return None


def bn_gamma_rows(m: Any, k_y: torch.Tensor) -> ParamRows | None:
    """dL/dgamma_c = sum_p k_y[c,p] (a[c,p] - mu_c) / sigma_c: one row per channel on the input a, with
    coefficients k_y / sigma on channel c (affine in a). None when gamma is not trained or there are
    no running statistics."""
    if not getattr(m, "affine", False) or m.weight is None or not m.weight.requires_grad or _bn_uses_batch_stats(m):
        return None
    k_y = k_y.detach()
    sigma = torch.sqrt(m.running_var.detach().to(k_y.dtype) + m.eps)
    return ParamRows("gamma", k_y / sigma.reshape(1, -1, *([1] * (k_y.dim() - 2))))


BATCHNORM = register(
    OpInfo(
        "BatchNorm", NORM, True, _BN_WHY, inverse=_inv_batchnorm, check=_bn_check, instance=_bn_instance,
        link=INVERT, jacobian=CONSTANT, elementwise=True, param_rows=bn_gamma_rows, evaluate=_bn_evaluate,
    ),
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, lazy variants
    nn.SyncBatchNorm,  # its own forward equals BatchNorm's in eval mode
)
register(
    OpInfo(
        "batch_norm", NORM, False,
        "functional batch_norm: its statistics and gamma are call arguments rgap-audit does not inspect; treated as "
        "not invertible",
    ),
    F.batch_norm, aten.batch_norm.default,
)
register(OpInfo("LayerNorm", NORM, False, _LN_WHY), nn.LayerNorm, F.layer_norm, aten.layer_norm.default)
register(OpInfo("GroupNorm", NORM, False, _GN_WHY), nn.GroupNorm, F.group_norm, aten.group_norm.default)
register(
    OpInfo("InstanceNorm", NORM, False, _IN_WHY),
    nn.modules.instancenorm._InstanceNorm, F.instance_norm, aten.instance_norm.default,
)
register(
    OpInfo("RMSNorm", NORM, False, "normalises each slice by its root mean square: its scale is lost (not invertible)"),
    nn.RMSNorm, F.rms_norm,
)
