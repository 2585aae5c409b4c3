"""Weighted layers: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, their functional and aten forms, and
``x @ W`` with W a Parameter. Each normalises to a ConvSpec (or ConvTransposeSpec) that the rank
analysis and the attack share; a Linear with a bias on one sample gives its input away exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.convspec import ConvSpec
from rgap_audit.convtranspose import ConvTransposeSpec
from rgap_audit.ops import wrappers
from rgap_audit.ops.base import (
    CONSTANT,
    LAYER,
    MATMUL,
    POOL,
    UNKNOWN,
    Leak,
    LeakContext,
    OpInfo,
    aten,
    register,
    renamed,
)

LAYER_WHY = (
    "weighted layer: its weight gradient constrains its input (gradient rows) and its output z, once known, "
    "does too (forward rows)"
)
_CONVT_WHY = (
    "transposed convolution: analysed as the equivalent stride-1 convolution (kernel flipped, channels swapped) "
    "of its input with stride-1 zeros inserted between entries; the inserted and output_padding zeros are known, "
    "not unknowns, and the results are mapped back to the layer's own input"
)
BIAS_LEAK = "Linear with bias: x = dL/dW[j] / dL/db[j] for any j with dL/db[j] != 0"


# ----------------------------------------------------------------------------- normalisation
def _linear_module_spec(module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    assert module is not None
    return ConvSpec.linear(module.weight, module.bias, in_shape)


def _conv_module_spec(module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    assert module is not None
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError(
            f"{type(module).__name__}: only numeric zero padding is supported "
            f"(got padding={module.padding!r}, padding_mode={module.padding_mode!r})"
        )
    return ConvSpec.conv(module.weight, module.bias, in_shape, module.stride, module.padding, module.dilation, module.groups)


def _functional_linear_spec(module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("the weight of this linear call is computed in forward, not a Parameter")
    return ConvSpec.linear(weight, bias if isinstance(bias, torch.Tensor) else None, in_shape)


def _functional_conv_spec(module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    vals = {**defaults, **dict(zip(names, args)), **kwargs}
    if isinstance(vals["padding"], str):
        raise ValueError(f"string padding {vals['padding']!r} is not supported")
    if not isinstance(vals["weight"], torch.Tensor):
        raise ValueError("the weight of this convolution is computed in forward, not a Parameter")
    bias = vals["bias"] if isinstance(vals["bias"], torch.Tensor) else None
    return ConvSpec.conv(vals["weight"], bias, in_shape, vals["stride"], vals["padding"], vals["dilation"], vals["groups"])


def _module_conv_transpose_spec(
    module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]
) -> ConvTransposeSpec:
    """nn.ConvTranspose{1,2,3}d called as module(x) or module(x, output_size)."""
    assert module is not None
    if module.padding_mode != "zeros":
        raise ValueError(f"{type(module).__name__}: only zero padding is supported (got {module.padding_mode!r})")
    output_size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
    return ConvTransposeSpec.make(
        module.weight, module.bias, in_shape, module.stride, module.padding, module.output_padding,
        module.groups, module.dilation, output_size,
    )


def _functional_conv_transpose_spec(
    module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]
) -> ConvTransposeSpec:
    """F.conv_transpose{1,2,3}d and aten.conv_transpose{1,2,3}d (note: groups comes before dilation)."""
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    defaults = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
    vals = {**defaults, **dict(zip(names, args)), **kwargs}
    if not isinstance(vals["weight"], torch.Tensor):
        raise ValueError("the weight of this transposed convolution is computed in forward, not a Parameter")
    bias = vals["bias"] if isinstance(vals["bias"], torch.Tensor) else None
    return ConvTransposeSpec.make(
        vals["weight"], bias, in_shape, vals["stride"], vals["padding"], vals["output_padding"], vals["groups"],
        vals["dilation"],
    )


def _matmul_weight(args: tuple) -> torch.Tensor:
    w = args[1]
    if not isinstance(w, torch.Tensor):
        raise ValueError("the right operand is not a Parameter")
    if w.dim() not in (1, 2):
        raise ValueError(f"x @ W with a {w.dim()}-d Parameter is not a Linear layer")
    return w


def _matmul_spec(module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    w = _matmul_weight(args)
    weight = w[None, :] if w.dim() == 1 else w.t()  # x @ W = linear(x, W^T)
    return ConvSpec.linear(weight, None, in_shape)


def _matmul_t_spec(module: Any, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    w = _matmul_weight(args)
    return ConvSpec.linear(w[None, :] if w.dim() == 1 else w, None, in_shape)


# ----------------------------------------------------------------------------- what the gradient gives away
def bias_leak(ctx: LeakContext) -> Leak | None:
    """A Linear with bias on one sample: dL/dW = k x^T and dL/db = k, so x = dL/dW[j] / dL/db[j]."""
    spec = ctx.spec
    if spec is None or spec.ndim != 0 or spec.bias is None or ctx.samples != 1:
        return None
    k = ctx.k.reshape(-1, spec.out_channels)
    if not bool((k.sum(dim=0) != 0).any()):
        return None
    return Leak(BIAS_LEAK)


def _linear_hint(module: Any) -> tuple[int, ...] | str:
    assert module is not None
    return (int(module.in_features),)


def _conv_hint(module: Any) -> tuple[int, ...] | str:
    assert module is not None
    dims = {1: "L", 2: "H,W", 3: "D,H,W"}[module.weight.dim() - 2]
    return f" (its first layer is {type(module).__name__} with {module.in_channels} input channels: {module.in_channels},{dims})"


def _layer(name: str, conv_spec, **kw) -> OpInfo:
    return OpInfo(name, LAYER, True, kw.pop("why", LAYER_WHY), conv_spec=conv_spec, jacobian=CONSTANT, **kw)


# ----------------------------------------------------------------------------- the entries
LINEAR = register(_layer("Linear", _linear_module_spec, leak=bias_leak, shape_hint=_linear_hint), nn.Linear)
_LINEAR_F = register(_layer("linear", _functional_linear_spec, leak=bias_leak), F.linear, aten.linear.default)
_CONV_TARGETS: tuple[tuple[int, Any, Any, Any], ...] = (
    (1, nn.Conv1d, F.conv1d, aten.conv1d.default),
    (2, nn.Conv2d, F.conv2d, aten.conv2d.default),
    (3, nn.Conv3d, F.conv3d, aten.conv3d.default),
)
for _dim, _mod, _f, _aten in _CONV_TARGETS:
    register(_layer(f"Conv{_dim}d", _conv_module_spec, shape_hint=_conv_hint), _mod)
    register(_layer(f"conv{_dim}d", _functional_conv_spec), _f, _aten)
_CONVT = _layer("ConvTranspose", _module_conv_transpose_spec, why=_CONVT_WHY)
_CONVT_F = _layer("conv_transpose", _functional_conv_transpose_spec, why=_CONVT_WHY)
_CONVT_TARGETS: tuple[tuple[int, Any, Any, Any], ...] = (
    (1, nn.ConvTranspose1d, F.conv_transpose1d, aten.conv_transpose1d.default),
    (2, nn.ConvTranspose2d, F.conv_transpose2d, aten.conv_transpose2d.input),
    (3, nn.ConvTranspose3d, F.conv_transpose3d, aten.conv_transpose3d.input),
)
for _dim, _mod, _f, _aten in _CONVT_TARGETS:
    register(renamed(_CONVT, f"ConvTranspose{_dim}d"), _mod)
    register(renamed(_CONVT_F, f"conv_transpose{_dim}d"), _f, _aten)

register(
    _layer(
        "matmul", _matmul_spec, rewrite=MATMUL,
        why=LAYER_WHY + " (x @ W with W a Parameter: a Linear with weight W^T; the shared gradient of W is transposed)",
        param_transposed=True,
    ),
    wrappers.linear_matmul,
)
register(
    _layer("matmul", _matmul_t_spec, rewrite=MATMUL, why=LAYER_WHY + " (x @ W.T with W a Parameter: a Linear with weight W)"),
    wrappers.linear_matmul_t,
)
register(
    OpInfo(
        "matmul", UNKNOWN, False,
        "W @ x with W a Parameter acts on x's second-to-last dimension; rgap-audit normalises x @ W only: "
        "write it as nn.Linear or x @ W.T",
    ),
    wrappers.param_matmul_left,
)
register(
    OpInfo(
        "matmul", UNKNOWN, False,
        "x @ (an expression of Parameters): a weighted layer whose weight is computed in forward; rgap-audit "
        "normalises x @ W and x @ W.T with W a Parameter only",
    ),
    wrappers.computed_matmul,
)
register(
    OpInfo(
        "matmul", POOL, False,
        "multiplies by a constant matrix (a buffer or frozen Parameter, no gradient): a fixed linear map, treated as not invertible",
    ),
    wrappers.constant_matmul,
)
