"""Per-operation knowledge, in one registry keyed by operation.

Supporting a new layer type means adding one `OpInfo` entry here. The analysis and the attack read
nothing about an operation that is not in its entry; an operation with no entry is reported as not
understood and never counted as safe.

Keys are module classes (matched through the class hierarchy), functions (``torch.relu``,
``F.conv2d``) and method names (``"view"``). Jacobians are not stored: the analysis differentiates
the traced op itself (``torch.func.jvp``) at the instance, so only facts that autograd cannot know
(invertibility, how to normalise a weighted layer, the inverse map the attack needs) live here.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.convspec import ConvSpec

# kinds of operation
LAYER = "layer"  # has weights; contributes gradient and forward constraints (normalised to a ConvSpec)
ACTIVATION = "activation"  # elementwise nonlinearity
RESHAPE = "reshape"  # a permutation of entries: flatten, view, reshape
IDENTITY = "identity"  # output equals input in eval mode: Identity, Dropout
POOL = "pool"  # pooling
NORM = "norm"  # normalisation layers
MERGE = "merge"  # joins several inputs: add, cat
IO = "io"  # the model's input placeholder and output
UNKNOWN = "unknown"


@dataclass(frozen=True)
class OpInfo:
    """What rgap-audit knows about one operation type."""

    name: str  # short name shown in reports
    kind: str
    invertible: bool  # can the op's input be recovered from its output (elementwise / bijective)?
    why: str  # one line: what this op does to the R-GAP chain
    # weighted layers: build the normalised ConvSpec from (module or None, node args, one sample's input shape)
    conv_spec: Callable[[nn.Module | None, tuple, dict, tuple[int, ...]], ConvSpec] | None = None
    # activations the attack inverts: z = inverse(module, node kwargs, y)
    inverse: Callable[[nn.Module | None, dict, torch.Tensor], torch.Tensor] | None = None


# ----------------------------------------------------------------------------- weighted layers
def _module_conv_spec(module: nn.Module | None, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    assert module is not None
    return ConvSpec.from_module(module, in_shape)


def _functional_linear_spec(module, args, kwargs, in_shape) -> ConvSpec:
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
    return ConvSpec.linear(weight, bias, in_shape)


def _functional_conv_spec(module, args, kwargs, in_shape) -> ConvSpec:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    vals = {**defaults, **dict(zip(names, args)), **kwargs}
    if isinstance(vals["padding"], str):
        raise ValueError(f"string padding {vals['padding']!r} is not supported")
    return ConvSpec.conv(
        vals["weight"], vals["bias"], in_shape, vals["stride"], vals["padding"], vals["dilation"], vals["groups"]
    )


# ----------------------------------------------------------------------------- activation inverses
def _leaky_slope(module: nn.Module | None, kwargs: dict) -> float:
    if module is not None:
        return float(module.negative_slope)
    return float(kwargs.get("negative_slope", 0.01))


def _inv_leaky(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    slope = _leaky_slope(module, kwargs)
    return torch.where(y >= 0, y, y / slope)


def _inv_sigmoid(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(1e-15, 1 - 1e-15)
    return torch.log(y) - torch.log1p(-y)


def _inv_tanh(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    return torch.atanh(y.clamp(-1 + 1e-15, 1 - 1e-15))


def _inv_identity(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    return y


def _inv_elu(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    alpha = float(module.alpha) if module is not None else float(kwargs.get("alpha", 1.0))
    return torch.where(y > 0, y, torch.log1p((y / alpha).clamp(min=-1 + 1e-15)))


def _inv_softplus(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    beta = float(module.beta) if module is not None else float(kwargs.get("beta", 1.0))
    return torch.log(torch.expm1(beta * y)) / beta


_LAYER_WHY = "weighted layer: its weight gradient constrains its input (gradient rows) and its output z, once known, does too (forward rows)"
_RELU_WHY = "not invertible: where the output is 0 the input is only known to be <= 0, so the layer below gets forward constraints only on active units"
_RESHAPE_WHY = "a permutation of entries: passes the chain unchanged"
_IDENTITY_WHY = "identity in eval mode: passes the chain unchanged"


def _invertible(name: str, inverse) -> OpInfo:
    return OpInfo(name, ACTIVATION, True, "invertible elementwise map: z = inverse(output) is known exactly", inverse=inverse)


_leaky = _invertible("LeakyReLU", _inv_leaky)
_sigmoid = _invertible("Sigmoid", _inv_sigmoid)
_tanh = _invertible("Tanh", _inv_tanh)
_elu = _invertible("ELU", _inv_elu)
_softplus = _invertible("Softplus", _inv_softplus)
_relu = OpInfo("ReLU", ACTIVATION, False, _RELU_WHY)
_relu6 = OpInfo("ReLU6", ACTIVATION, False, "not invertible: clipped at 0 and 6, forward constraints only where 0 < output < 6")
_gelu = OpInfo("GELU", ACTIVATION, False, "not monotone on (-inf, -0.75): the input is not unique given the output")
_identity = OpInfo("Identity", IDENTITY, True, _IDENTITY_WHY, inverse=_inv_identity)
_dropout = OpInfo("Dropout", IDENTITY, True, _IDENTITY_WHY + " (train mode would randomise it)", inverse=_inv_identity)
_flatten = OpInfo("flatten", RESHAPE, True, _RESHAPE_WHY)
_reshape = OpInfo("reshape", RESHAPE, True, _RESHAPE_WHY)
_linear = OpInfo("Linear", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec)
_maxpool = OpInfo(
    "MaxPool", POOL, False, "not invertible: only the arg-max entries of its input are known; the chain below is partial"
)

OPS: dict[Any, OpInfo] = {
    # weighted layers
    nn.Linear: _linear,
    nn.Conv1d: OpInfo("Conv1d", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec),
    nn.Conv2d: OpInfo("Conv2d", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec),
    nn.Conv3d: OpInfo("Conv3d", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec),
    F.linear: OpInfo("linear", LAYER, True, _LAYER_WHY, conv_spec=_functional_linear_spec),
    F.conv1d: OpInfo("conv1d", LAYER, True, _LAYER_WHY, conv_spec=_functional_conv_spec),
    F.conv2d: OpInfo("conv2d", LAYER, True, _LAYER_WHY, conv_spec=_functional_conv_spec),
    F.conv3d: OpInfo("conv3d", LAYER, True, _LAYER_WHY, conv_spec=_functional_conv_spec),
    # activations
    nn.LeakyReLU: _leaky,
    F.leaky_relu: _leaky,
    nn.Sigmoid: _sigmoid,
    torch.sigmoid: _sigmoid,
    F.sigmoid: _sigmoid,
    "sigmoid": _sigmoid,
    nn.Tanh: _tanh,
    torch.tanh: _tanh,
    F.tanh: _tanh,
    "tanh": _tanh,
    nn.ELU: _elu,
    F.elu: _elu,
    nn.Softplus: _softplus,
    F.softplus: _softplus,
    nn.ReLU: _relu,
    F.relu: _relu,
    torch.relu: _relu,
    "relu": _relu,
    nn.ReLU6: _relu6,
    F.relu6: _relu6,
    nn.GELU: _gelu,
    F.gelu: _gelu,
    # identities and reshapes
    nn.Identity: _identity,
    nn.Dropout: _dropout,
    nn.Dropout1d: _dropout,
    nn.Dropout2d: _dropout,
    nn.Dropout3d: _dropout,
    F.dropout: _dropout,
    nn.Flatten: _flatten,
    torch.flatten: _flatten,
    "flatten": _flatten,
    "view": _reshape,
    "reshape": _reshape,
    torch.reshape: _reshape,
    "contiguous": OpInfo("contiguous", IDENTITY, True, _IDENTITY_WHY, inverse=_inv_identity),
    # pooling
    nn.MaxPool1d: _maxpool,
    nn.MaxPool2d: _maxpool,
    nn.MaxPool3d: _maxpool,
    F.max_pool1d: _maxpool,
    F.max_pool2d: _maxpool,
    F.max_pool3d: _maxpool,
    # merges: the walk knows they join branches; the chain does not pass them in closed form yet
    operator.add: OpInfo("add", MERGE, False, "joins branches: each input's forward value is not known separately"),
    torch.add: OpInfo("add", MERGE, False, "joins branches: each input's forward value is not known separately"),
    torch.cat: OpInfo("cat", MERGE, False, "concatenates branches"),
    # the graph's ends
    "input": OpInfo("input", IO, True, "the client's private input: what the attack recovers"),
    "output": OpInfo("output", IO, True, "the model output, seen by the loss"),
}

NOT_UNDERSTOOD = OpInfo(
    "unknown", UNKNOWN, False, "rgap-audit has no entry for this operation: its effect on the chain is not analysed"
)


def lookup(target: Any, module: nn.Module | None = None) -> OpInfo:
    """The registry entry for a call target (function, method name) or module; NOT_UNDERSTOOD if none."""
    if module is not None:
        for cls in type(module).__mro__:
            if cls in OPS:
                return OPS[cls]
            if cls is nn.Module:
                break
        return OpInfo(type(module).__name__, UNKNOWN, False, NOT_UNDERSTOOD.why)
    try:
        hit = OPS.get(target)
    except TypeError:  # unhashable target
        hit = None
    if hit is not None:
        return hit
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return OpInfo(str(name), UNKNOWN, False, NOT_UNDERSTOOD.why)


def numel(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(int(s) for s in shape)
