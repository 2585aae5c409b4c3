"""Elementwise activations (and softmax): which invert, with what inverse, and which cut the chain.

An invertible activation hands the layer below its output z exactly (z = inverse(output)); ReLU and
ReLU6 clip, so z is known only where the output lies strictly inside the range; the rest are not
invertible and say why (each "not invertible" has a witness in tests/test_registry.py).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.ops.base import (
    ACTIVATION,
    CLIP,
    FROM_INPUT,
    FROM_OUTPUT,
    INVERT,
    LOSSY,
    OpInfo,
    aten,
    register,
)

_RELU_WHY = (
    "not invertible: where the output is 0 the input is only known to be <= 0, so the layer below gets forward "
    "constraints only on active units"
)
_NOT_MONOTONE = "not monotone (minimum at a negative input): two inputs share each output below 0, not invertible"
_SOFTMAX_WHY = (
    "not invertible: softmax(z) = softmax(z + c) for a constant c per slice, so each slice of the input is known "
    "up to a shift"
)


# ----------------------------------------------------------------------------- inverses
def _leaky_slope(module: Any, kwargs: dict) -> float:
    if module is not None:
        return float(module.negative_slope)
    return float(kwargs.get("negative_slope", 0.01))


def _inv_leaky(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    slope = _leaky_slope(module, kwargs)
    return torch.where(y >= 0, y, y / slope)


def _inv_sigmoid(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(1e-15, 1 - 1e-15)
    return torch.log(y) - torch.log1p(-y)


def _inv_tanh(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    return torch.atanh(y.clamp(-1 + 1e-15, 1 - 1e-15))


def _inv_elu(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    alpha = float(module.alpha) if module is not None else float(kwargs.get("alpha", 1.0))
    return torch.where(y > 0, y, torch.log1p((y / alpha).clamp(min=-1 + 1e-15)))


def _inv_softplus(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    beta = float(module.beta) if module is not None else float(kwargs.get("beta", 1.0))
    return torch.log(torch.expm1(beta * y)) / beta


def _inv_softsign(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(-1 + 1e-15, 1 - 1e-15)
    return y / (1 - y.abs())


def _inv_logsigmoid(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    # y = -softplus(-z)  =>  z = -log(expm1(-y))
    return -torch.log(torch.expm1(-y.clamp(max=-1e-300)))


def channel_view(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over y (N, C, *spatial), or (C,) for 1-d y."""
    v = v.to(y.dtype)
    if y.dim() <= 1:
        return v
    return v.reshape(1, -1, *([1] * (y.dim() - 2)))


def _inv_prelu(module: Any, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    assert module is not None
    a = module.weight.detach()
    a = a if a.numel() == 1 else channel_view(a, y)
    return torch.where(y >= 0, y, y / a.to(y.dtype))


def _prelu_instance(m: Any, base: OpInfo) -> OpInfo:
    a = m.weight.detach()
    if bool((a > 0).all()):
        return base
    return replace(
        base,
        invertible=False,
        inverse=None,
        link=LOSSY,
        jacobian=FROM_INPUT,
        why="PReLU with a slope <= 0: negative inputs map onto the non-negative outputs (or to 0), not invertible",
    )


# ----------------------------------------------------------------------------- entry builders
def _invertible(name: str, inverse, **kw) -> OpInfo:
    return OpInfo(
        name, ACTIVATION, True, kw.pop("why", "invertible elementwise map: z = inverse(output) is known exactly"),
        inverse=inverse, link=INVERT, jacobian=FROM_OUTPUT, elementwise=True, **kw,
    )


def _not_invertible(name: str, why: str, **kw) -> OpInfo:
    kw.setdefault("jacobian", FROM_INPUT)
    kw.setdefault("elementwise", True)
    return OpInfo(name, ACTIVATION, False, why, **kw)


def _with_kwargs(info: OpInfo, *names: str) -> OpInfo:
    """The same entry for a functional form whose positional arguments the inverse reads by keyword."""
    return replace(info, kwarg_names=names)


LEAKY_RELU = _invertible("LeakyReLU", _inv_leaky, homogeneous=True)
register(LEAKY_RELU, nn.LeakyReLU)
register(_with_kwargs(LEAKY_RELU, "negative_slope", "inplace"), F.leaky_relu)
register(_with_kwargs(LEAKY_RELU, "negative_slope"), aten.leaky_relu.default)
register(_invertible("Sigmoid", _inv_sigmoid), nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid", aten.sigmoid.default)
register(_invertible("Tanh", _inv_tanh), nn.Tanh, torch.tanh, F.tanh, "tanh", aten.tanh.default)
ELU = register(_invertible("ELU", _inv_elu), nn.ELU)
register(_with_kwargs(ELU, "alpha", "inplace"), F.elu)
register(_with_kwargs(ELU, "alpha", "scale", "input_scale"), aten.elu.default)
SOFTPLUS = register(_invertible("Softplus", _inv_softplus), nn.Softplus)
register(_with_kwargs(SOFTPLUS, "beta", "threshold"), F.softplus, aten.softplus.default)
register(_invertible("Softsign", _inv_softsign), nn.Softsign, F.softsign)
register(_invertible("LogSigmoid", _inv_logsigmoid), nn.LogSigmoid, F.logsigmoid)
register(
    _invertible("PReLU", _inv_prelu, why="invertible when every slope > 0 (decided per instance)", instance=_prelu_instance),
    nn.PReLU,
)
register(
    _not_invertible("ReLU", _RELU_WHY, link=CLIP, clip=(0.0, math.inf), jacobian=FROM_OUTPUT, homogeneous=True),
    nn.ReLU, F.relu, torch.relu, "relu", aten.relu.default,
)
register(
    _not_invertible(
        "ReLU6", "not invertible: clipped at 0 and 6, forward constraints only where 0 < output < 6",
        link=CLIP, clip=(0.0, 6.0), jacobian=FROM_OUTPUT,
    ),
    nn.ReLU6, F.relu6,
)
register(  # ReLU6 subclasses Hardtanh but is found first
    _not_invertible("Hardtanh", "not invertible: clipped, forward constraints only where the output is not at a bound"),
    nn.Hardtanh, F.hardtanh, aten.hardtanh.default,
)
register(_not_invertible("Hardsigmoid", "not invertible: clipped at 0 and 1 outside [-3, 3]"), nn.Hardsigmoid, F.hardsigmoid)
register(
    _not_invertible("GELU", "not monotone on (-inf, -0.75): the input is not unique given the output"),
    nn.GELU, F.gelu, aten.gelu.default,
)
register(_not_invertible("SiLU", _NOT_MONOTONE), nn.SiLU, F.silu, aten.silu.default)
register(_not_invertible("Mish", _NOT_MONOTONE), nn.Mish, F.mish, aten.mish.default)
register(
    _not_invertible("Hardswish", "not monotone on [-3, -1.5] and constant 0 below -3: not invertible"),
    nn.Hardswish, F.hardswish, aten.hardswish.default,
)
register(
    _not_invertible("Softmax", _SOFTMAX_WHY, jacobian=FROM_OUTPUT, elementwise=False),
    nn.Softmax, nn.Softmax2d, F.softmax, torch.softmax, "softmax", aten.softmax.int, aten._softmax.default,
)
def _over_classes(module: Any, args: tuple, kwargs: dict, out_shape: tuple[int, ...]) -> bool:
    """A log-softmax over the class dimension of an (N, C) output (torch's implicit dim for 2-d is 1)."""
    if module is not None:
        dim = module.dim
    else:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if kwargs.get("dtype") is not None or len(out_shape) != 2:
        return False
    return dim is None or (isinstance(dim, int) and dim % 2 == 1)


register(
    _not_invertible("LogSoftmax", _SOFTMAX_WHY, elementwise=False, folds_into_cross_entropy=_over_classes),
    nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax", aten.log_softmax.int,
)
