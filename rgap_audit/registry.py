"""Per-operation knowledge, in one registry keyed by operation.

Supporting a new layer type means adding one `OpInfo` entry here. The analysis and the attack read
nothing about an operation that is not in its entry; an operation with no entry is reported as not
understood and never counted as safe.

Keys are module classes (matched through the class hierarchy), functions (``torch.relu``,
``F.conv2d``, the aten overloads a ``torch.export`` graph holds) and method names (``"view"``).
Jacobians are not stored: the analysis differentiates the traced op itself (``torch.func.jvp``) at
the instance, so only facts that autograd cannot know (invertibility, how to normalise a weighted
layer, the inverse map the attack needs, warnings about the module's mode) live here.

Some decisions depend on the call site, not on the function: ``x @ W`` is a Linear layer when W is a
Parameter and a bilinear merge when both operands are data; ``x + c`` is an invertible shift when c
does not depend on the input. `rgap_audit.tracing` rewrites such call sites to the wrapper functions
defined here (`linear_matmul`, `shift_add`, ...), which compute exactly what the original call did and
carry their own entries. Decisions that depend on a module's state (BatchNorm with a zero gamma,
PReLU with a negative slope) are made by `OpInfo.instance` when `lookup` is given the module.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.convspec import ConvSpec
from rgap_audit.convtranspose import ConvTransposeSpec

# kinds of operation
LAYER = "layer"  # has weights; contributes gradient and forward constraints (a ConvSpec or ConvTransposeSpec)
ACTIVATION = "activation"  # elementwise nonlinearity (softmax: per slice)
RESHAPE = "reshape"  # same entries in the same memory order: flatten, view, reshape, (un)squeeze, unflatten
PERMUTE = "permute"  # same entries, reordered: transpose, permute (x.reshape(out_shape) does NOT undo it)
IDENTITY = "identity"  # output equals input in eval mode: Identity, Dropout, dtype casts
POOL = "pool"  # pooling and reductions (mean, sum, selection)
NORM = "norm"  # normalisation layers
MERGE = "merge"  # joins several data inputs: add, cat, bilinear products
AFFINE = "affine"  # a fixed invertible affine map of one data input: x + c, c * x (c constant, non-zero)
EMBEDDING = "embedding"  # integer token ids -> rows of a weight matrix
IO = "io"  # the model's input placeholder and output
UNKNOWN = "unknown"

aten = torch.ops.aten


@dataclass(frozen=True)
class OpInfo:
    """What rgap-audit knows about one operation type."""

    name: str  # short name shown in reports
    kind: str
    invertible: bool  # can the op's input be recovered from its output (elementwise / bijective)?
    why: str  # one line: what this op does to the R-GAP chain
    # weighted layers: build the normalised ConvSpec from (module or None, node args, one sample's input shape)
    conv_spec: Callable[[nn.Module | None, tuple, dict, tuple[int, ...]], ConvSpec | ConvTransposeSpec] | None = None
    # activations the attack inverts: z = inverse(module, node kwargs, y)
    inverse: Callable[[nn.Module | None, dict, torch.Tensor], torch.Tensor] | None = None
    # module state the analysis cannot see in eval mode (BatchNorm in train mode): a warning or None.
    # Call it on the user's module before any .eval(); `check_model` runs it over a whole model.
    check: Callable[[nn.Module], str | None] | None = None
    # per-module refinement of this entry (a BatchNorm with a zero gamma is not invertible); lookup applies it
    instance: Callable[[nn.Module, "OpInfo"], "OpInfo"] | None = None


# ----------------------------------------------------------------------------- call-site wrappers
# tracing.py rewrites call sites to these; each computes exactly what the original call computed.
def linear_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W`` with W a Parameter of shape (in, out): a Linear layer with weight W^T."""
    return torch.matmul(x, weight)


def linear_matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with W a Parameter of shape (out, in): a Linear layer with weight W."""
    return torch.matmul(x, weight.t())


def param_matmul_left(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W @ x`` with W a Parameter: acts on x's second-to-last dimension."""
    return torch.matmul(weight, x)


def constant_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A product where one operand is a constant (a buffer, no gradient)."""
    return torch.matmul(a, b)


def computed_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A product of data with a matrix computed in forward from Parameters (a derived weight)."""
    return torch.matmul(a, b)


def shift_add(a: Any, b: Any) -> Any:
    """``a + b`` where exactly one operand depends on the input."""
    return a + b


def shift_sub(a: Any, b: Any) -> Any:
    """``a - b`` where exactly one operand depends on the input."""
    return a - b


def scale_mul(a: Any, b: Any) -> Any:
    """``a * b`` where one operand is a constant with no zero entry."""
    return a * b


def scale_div(a: Any, b: Any) -> Any:
    """``a / b`` with the data operand a and a constant b with no zero entry."""
    return a / b


# ----------------------------------------------------------------------------- weighted layers
def _module_conv_spec(module: nn.Module | None, args: tuple, kwargs: dict, in_shape: tuple[int, ...]) -> ConvSpec:
    assert module is not None
    return ConvSpec.from_module(module, in_shape)


def _functional_linear_spec(module, args, kwargs, in_shape) -> ConvSpec:
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("the weight of this linear call is computed in forward, not a Parameter")
    return ConvSpec.linear(weight, bias if isinstance(bias, torch.Tensor) else None, in_shape)


def _functional_conv_spec(module, args, kwargs, in_shape) -> ConvSpec:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    vals = {**defaults, **dict(zip(names, args)), **kwargs}
    if isinstance(vals["padding"], str):
        raise ValueError(f"string padding {vals['padding']!r} is not supported")
    if not isinstance(vals["weight"], torch.Tensor):
        raise ValueError("the weight of this convolution is computed in forward, not a Parameter")
    bias = vals["bias"] if isinstance(vals["bias"], torch.Tensor) else None
    return ConvSpec.conv(vals["weight"], bias, in_shape, vals["stride"], vals["padding"], vals["dilation"], vals["groups"])


def _module_conv_transpose_spec(module, args, kwargs, in_shape) -> ConvTransposeSpec:
    """nn.ConvTranspose{1,2,3}d called as module(x) or module(x, output_size)."""
    assert module is not None
    output_size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
    return ConvTransposeSpec.from_module(module, in_shape, output_size)


def _functional_conv_transpose_spec(module, args, kwargs, in_shape) -> ConvTransposeSpec:
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


def _matmul_spec(module, args, kwargs, in_shape) -> ConvSpec:
    w = _matmul_weight(args)
    weight = w[None, :] if w.dim() == 1 else w.t()  # x @ W = linear(x, W^T)
    return ConvSpec.linear(weight, None, in_shape)


def _matmul_t_spec(module, args, kwargs, in_shape) -> ConvSpec:
    w = _matmul_weight(args)
    return ConvSpec.linear(w[None, :] if w.dim() == 1 else w, None, in_shape)


# ----------------------------------------------------------------------------- inverses
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


def _inv_softsign(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(-1 + 1e-15, 1 - 1e-15)
    return y / (1 - y.abs())


def _inv_logsigmoid(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    # y = -softplus(-z)  =>  z = -log(expm1(-y))
    return -torch.log(torch.expm1(-y.clamp(max=-1e-300)))


def _channel_view(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over y (N, C, *spatial), or (C,) for 1-d y."""
    v = v.to(y.dtype)
    if y.dim() <= 1:
        return v
    return v.reshape(1, -1, *([1] * (y.dim() - 2)))


def _inv_prelu(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    a = module.weight.detach()
    a = a if a.numel() == 1 else _channel_view(a, y)
    return torch.where(y >= 0, y, y / a.to(y.dtype))


def _bn_affine(module: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _inv_batchnorm(module, kwargs, y: torch.Tensor) -> torch.Tensor:
    scale, shift = _bn_affine(module, y)
    return (y - _channel_view(shift, y)) / _channel_view(scale, y)


# ----------------------------------------------------------------------------- instance refinements and checks
def _bn_uses_batch_stats(m: nn.Module) -> bool:
    return (not getattr(m, "track_running_stats", True)) or getattr(m, "running_mean", None) is None


def _bn_instance(m: nn.Module, base: OpInfo) -> OpInfo:
    if _bn_uses_batch_stats(m):
        return replace(
            base,
            invertible=False,
            inverse=None,
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
                why=f"per-channel affine map with gamma = 0 on channel(s) {shown}: those outputs are constant and "
                "their inputs are lost",
            )
    return base


def _bn_check(m: nn.Module) -> str | None:
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


def _prelu_instance(m: nn.Module, base: OpInfo) -> OpInfo:
    a = m.weight.detach()
    if bool((a > 0).all()):
        return base
    return replace(
        base,
        invertible=False,
        inverse=None,
        why="PReLU with a slope <= 0: negative inputs map onto the non-negative outputs (or to 0), not invertible",
    )


def _avgpool_instance(m: nn.Module, base: OpInfo) -> OpInfo:
    def ones(v) -> bool:
        return all(int(a) == 1 for a in (v if isinstance(v, (tuple, list)) else (v,)))

    stride = m.stride if m.stride is not None else m.kernel_size
    if ones(m.kernel_size) and ones(stride) and not any(
        int(p) for p in (m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,))
    ):
        return replace(base, invertible=True, inverse=_inv_identity, why="kernel 1, stride 1: the identity")
    return base


# ----------------------------------------------------------------------------- why lines
_LAYER_WHY = "weighted layer: its weight gradient constrains its input (gradient rows) and its output z, once known, does too (forward rows)"
_RELU_WHY = "not invertible: where the output is 0 the input is only known to be <= 0, so the layer below gets forward constraints only on active units"
_RESHAPE_WHY = "a permutation of entries: passes the chain unchanged"
_IDENTITY_WHY = "identity in eval mode: passes the chain unchanged"
_NOT_MONOTONE = "not monotone (minimum at a negative input): two inputs share each output below 0, not invertible"
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
_AVG_WHY = "linear: averages each window; the layer below gets forward constraints on window averages only (not invertible)"
_ADAPTIVE_AVG_WHY = (
    "linear: averages regions to a fixed output size; forward constraints on region averages only "
    "(not invertible unless every region is one entry)"
)
_MAXPOOL_WHY = "not invertible: only the arg-max entries of its input are known; the chain below is partial"
_MEAN_WHY = "a reduction (mean/sum over dimensions): linear, only the reduced values are known (not invertible)"
_SOFTMAX_WHY = (
    "not invertible: softmax(z) = softmax(z + c) for a constant c per slice, so each slice of the input is known "
    "up to a shift"
)
_EMBEDDING_WHY = (
    "integer token ids -> rows of its weight: injective when rows are distinct, so recovering its output recovers "
    "the tokens; and its weight gradient is non-zero exactly on the rows of the tokens used, so the set of tokens "
    "(the union over a batch) leaks from the gradient alone; its input is integer, not a float unknown"
)
_MHA_WHY = (
    "not decomposed: the query/key/value projections share in_proj_weight inside one fused call and the "
    "attention mixes tokens bilinearly; write the block with nn.Linear layers to have its projections analysed"
)
_TRANSFORMER_WHY = (
    "a whole transformer layer as one module (torch.fx keeps torch.nn modules as leaves): not decomposed; "
    "write the block with nn.Linear layers to have its projections analysed"
)
_RNN_WHY = "recurrent: one weight shared across time steps inside a fused kernel; not decomposed"
_CONVT_WHY = (
    "transposed convolution: analysed as the equivalent stride-1 convolution (kernel flipped, channels swapped) "
    "of its input with stride-1 zeros inserted between entries; the inserted and output_padding zeros are known, "
    "not unknowns, and the results are mapped back to the layer's own input"
)
_BILINEAR_WHY = "bilinear layer x1^T A x2: its gradient is quadratic in the input, not a linear system; not analysed"
_SHIFT_WHY = (
    "adds a constant (or a Parameter) that does not depend on the input: an invertible shift, passes the chain"
)
_SCALE_WHY = (
    "scales by a constant with no zero entry: invertible, passes the chain (when the constant is a Parameter, "
    "its own gradient rows are not yet used as constraints)"
)
_ADD_WHY = "joins branches: each input's forward value is not known separately"
_PRODUCT_WHY = (
    "product of two data tensors (e.g. attention scores q k^T, gating): bilinear, joins branches; neither factor "
    "is known separately from the product"
)
_MUL_WHY = (
    "elementwise product that is not a scaling by a non-zero constant (two data tensors, or a constant with zero "
    "entries): joins branches, the chain does not pass in closed form"
)


def _invertible(name: str, inverse) -> OpInfo:
    return OpInfo(name, ACTIVATION, True, "invertible elementwise map: z = inverse(output) is known exactly", inverse=inverse)


def _not_invertible(name: str, why: str) -> OpInfo:
    return OpInfo(name, ACTIVATION, False, why)


_leaky = _invertible("LeakyReLU", _inv_leaky)
_sigmoid = _invertible("Sigmoid", _inv_sigmoid)
_tanh = _invertible("Tanh", _inv_tanh)
_elu = _invertible("ELU", _inv_elu)
_softplus = _invertible("Softplus", _inv_softplus)
_softsign = _invertible("Softsign", _inv_softsign)
_logsigmoid = _invertible("LogSigmoid", _inv_logsigmoid)
_prelu = OpInfo(
    "PReLU", ACTIVATION, True, "invertible when every slope > 0 (decided per instance)", inverse=_inv_prelu,
    instance=_prelu_instance,
)
_relu = _not_invertible("ReLU", _RELU_WHY)
_relu6 = _not_invertible("ReLU6", "not invertible: clipped at 0 and 6, forward constraints only where 0 < output < 6")
_hardtanh = _not_invertible("Hardtanh", "not invertible: clipped, forward constraints only where the output is not at a bound")
_hardsigmoid = _not_invertible("Hardsigmoid", "not invertible: clipped at 0 and 1 outside [-3, 3]")
_gelu = _not_invertible("GELU", "not monotone on (-inf, -0.75): the input is not unique given the output")
_silu = _not_invertible("SiLU", _NOT_MONOTONE)
_mish = _not_invertible("Mish", _NOT_MONOTONE)
_hardswish = _not_invertible("Hardswish", "not monotone on [-3, -1.5] and constant 0 below -3: not invertible")
_softmax = _not_invertible("Softmax", _SOFTMAX_WHY)
_log_softmax = _not_invertible("LogSoftmax", _SOFTMAX_WHY)
_identity = OpInfo("Identity", IDENTITY, True, _IDENTITY_WHY, inverse=_inv_identity)
_dropout = OpInfo("Dropout", IDENTITY, True, _IDENTITY_WHY + " (train mode would randomise it)", inverse=_inv_identity)
_cast = OpInfo("cast", IDENTITY, True, "a dtype or device cast: passes the chain unchanged", inverse=_inv_identity)
_contiguous = OpInfo("contiguous", IDENTITY, True, _IDENTITY_WHY, inverse=_inv_identity)
_flatten = OpInfo("flatten", RESHAPE, True, _RESHAPE_WHY)
_unflatten = OpInfo("unflatten", RESHAPE, True, _RESHAPE_WHY)
_reshape = OpInfo("reshape", RESHAPE, True, _RESHAPE_WHY)
_transpose = OpInfo("transpose", PERMUTE, True, _RESHAPE_WHY)
_permute = OpInfo("permute", PERMUTE, True, _RESHAPE_WHY)
_unsqueeze = OpInfo("unsqueeze", RESHAPE, True, _RESHAPE_WHY)
_squeeze = OpInfo("squeeze", RESHAPE, True, _RESHAPE_WHY)
_linear = OpInfo("Linear", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec)
_maxpool = OpInfo("MaxPool", POOL, False, _MAXPOOL_WHY)
_adaptive_maxpool = OpInfo("AdaptiveMaxPool", POOL, False, _MAXPOOL_WHY)
_avgpool = OpInfo("AvgPool", POOL, False, _AVG_WHY, instance=_avgpool_instance)
_avgpool_f = OpInfo("avg_pool", POOL, False, _AVG_WHY)
_adaptive_avgpool = OpInfo("AdaptiveAvgPool", POOL, False, _ADAPTIVE_AVG_WHY)
_mean = OpInfo("mean", POOL, False, _MEAN_WHY)
_sum = OpInfo("sum", POOL, False, _MEAN_WHY)
_select = OpInfo("getitem", POOL, False, "indexing/slicing: a selection of entries, linear; the entries it drops are lost to the chain")
_batchnorm = OpInfo(
    "BatchNorm", NORM, True, _BN_WHY, inverse=_inv_batchnorm, check=_bn_check, instance=_bn_instance
)
_batchnorm_f = OpInfo(
    "batch_norm", NORM, False,
    "functional batch_norm: its statistics and gamma are call arguments rgap-audit does not inspect; treated as "
    "not invertible",
)
_layernorm = OpInfo("LayerNorm", NORM, False, _LN_WHY)
_groupnorm = OpInfo("GroupNorm", NORM, False, _GN_WHY)
_instancenorm = OpInfo("InstanceNorm", NORM, False, _IN_WHY)
_rmsnorm = OpInfo("RMSNorm", NORM, False, "normalises each slice by its root mean square: its scale is lost (not invertible)")
_embedding = OpInfo("Embedding", EMBEDDING, True, _EMBEDDING_WHY)
_add = OpInfo("add", MERGE, False, _ADD_WHY)
_sub = OpInfo("sub", MERGE, False, "joins branches (a difference): each input's forward value is not known separately")
_cat = OpInfo(
    "cat", MERGE, True,
    "concatenates branches: each input is a slice of the output, so knowing the output gives every input",
)
_stack = OpInfo("stack", MERGE, True, "stacks branches: each input is a slice of the output")
_matmul = OpInfo("matmul", MERGE, False, _PRODUCT_WHY)
_mul = OpInfo("mul", MERGE, False, _MUL_WHY)
_conv_f = OpInfo("conv", LAYER, True, _LAYER_WHY, conv_spec=_functional_conv_spec)
_linear_f = OpInfo("linear", LAYER, True, _LAYER_WHY, conv_spec=_functional_linear_spec)
_convt = OpInfo("ConvTranspose", LAYER, True, _CONVT_WHY, conv_spec=_module_conv_transpose_spec)
_convt_f = OpInfo("conv_transpose", LAYER, True, _CONVT_WHY, conv_spec=_functional_conv_transpose_spec)

OPS: dict[Any, OpInfo] = {
    # weighted layers
    nn.Linear: _linear,
    nn.Conv1d: OpInfo("Conv1d", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec),
    nn.Conv2d: OpInfo("Conv2d", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec),
    nn.Conv3d: OpInfo("Conv3d", LAYER, True, _LAYER_WHY, conv_spec=_module_conv_spec),
    F.linear: _linear_f,
    F.conv1d: replace(_conv_f, name="conv1d"),
    F.conv2d: replace(_conv_f, name="conv2d"),
    F.conv3d: replace(_conv_f, name="conv3d"),
    aten.linear.default: _linear_f,
    aten.conv1d.default: replace(_conv_f, name="conv1d"),
    aten.conv2d.default: replace(_conv_f, name="conv2d"),
    aten.conv3d.default: replace(_conv_f, name="conv3d"),
    nn.ConvTranspose1d: replace(_convt, name="ConvTranspose1d"),
    nn.ConvTranspose2d: replace(_convt, name="ConvTranspose2d"),
    nn.ConvTranspose3d: replace(_convt, name="ConvTranspose3d"),
    F.conv_transpose1d: replace(_convt_f, name="conv_transpose1d"),
    F.conv_transpose2d: replace(_convt_f, name="conv_transpose2d"),
    F.conv_transpose3d: replace(_convt_f, name="conv_transpose3d"),
    aten.conv_transpose1d.default: replace(_convt_f, name="conv_transpose1d"),
    aten.conv_transpose2d.input: replace(_convt_f, name="conv_transpose2d"),
    aten.conv_transpose3d.input: replace(_convt_f, name="conv_transpose3d"),
    linear_matmul: OpInfo(
        "matmul", LAYER, True,
        _LAYER_WHY + " (x @ W with W a Parameter: a Linear with weight W^T; the shared gradient of W is transposed)",
        conv_spec=_matmul_spec,
    ),
    linear_matmul_t: OpInfo(
        "matmul", LAYER, True, _LAYER_WHY + " (x @ W.T with W a Parameter: a Linear with weight W)", conv_spec=_matmul_t_spec
    ),
    param_matmul_left: OpInfo(
        "matmul", UNKNOWN, False,
        "W @ x with W a Parameter acts on x's second-to-last dimension; rgap-audit normalises x @ W only: "
        "write it as nn.Linear or x @ W.T",
    ),
    computed_matmul: OpInfo(
        "matmul", UNKNOWN, False,
        "x @ (an expression of Parameters): a weighted layer whose weight is computed in forward; rgap-audit "
        "normalises x @ W and x @ W.T with W a Parameter only",
    ),
    constant_matmul: OpInfo(
        "matmul", POOL, False,
        "multiplies by a constant matrix (a buffer or frozen Parameter, no gradient): a fixed linear map, treated as not invertible",
    ),
    # weighted layers not understood, with the precise reason
    nn.Bilinear: OpInfo("Bilinear", UNKNOWN, False, _BILINEAR_WHY),
    nn.MultiheadAttention: OpInfo("MultiheadAttention", UNKNOWN, False, _MHA_WHY),
    nn.TransformerEncoderLayer: OpInfo("TransformerEncoderLayer", UNKNOWN, False, _TRANSFORMER_WHY),
    nn.TransformerDecoderLayer: OpInfo("TransformerDecoderLayer", UNKNOWN, False, _TRANSFORMER_WHY),
    nn.TransformerEncoder: OpInfo("TransformerEncoder", UNKNOWN, False, _TRANSFORMER_WHY),
    nn.TransformerDecoder: OpInfo("TransformerDecoder", UNKNOWN, False, _TRANSFORMER_WHY),
    nn.Transformer: OpInfo("Transformer", UNKNOWN, False, _TRANSFORMER_WHY),
    nn.RNNBase: OpInfo("RNN", UNKNOWN, False, _RNN_WHY),
    nn.RNNCellBase: OpInfo("RNNCell", UNKNOWN, False, _RNN_WHY),
    # embeddings
    nn.Embedding: _embedding,
    F.embedding: _embedding,
    aten.embedding.default: _embedding,
    # activations
    nn.LeakyReLU: _leaky,
    F.leaky_relu: _leaky,
    aten.leaky_relu.default: _leaky,
    nn.Sigmoid: _sigmoid,
    torch.sigmoid: _sigmoid,
    F.sigmoid: _sigmoid,
    "sigmoid": _sigmoid,
    aten.sigmoid.default: _sigmoid,
    nn.Tanh: _tanh,
    torch.tanh: _tanh,
    F.tanh: _tanh,
    "tanh": _tanh,
    aten.tanh.default: _tanh,
    nn.ELU: _elu,
    F.elu: _elu,
    nn.Softplus: _softplus,
    F.softplus: _softplus,
    aten.softplus.default: _softplus,
    nn.Softsign: _softsign,
    F.softsign: _softsign,
    nn.LogSigmoid: _logsigmoid,
    F.logsigmoid: _logsigmoid,
    nn.PReLU: _prelu,
    nn.ReLU: _relu,
    F.relu: _relu,
    torch.relu: _relu,
    "relu": _relu,
    aten.relu.default: _relu,
    nn.ReLU6: _relu6,
    F.relu6: _relu6,
    nn.Hardtanh: _hardtanh,  # ReLU6 subclasses Hardtanh but is found first
    F.hardtanh: _hardtanh,
    aten.hardtanh.default: _hardtanh,
    nn.Hardsigmoid: _hardsigmoid,
    F.hardsigmoid: _hardsigmoid,
    nn.GELU: _gelu,
    F.gelu: _gelu,
    aten.gelu.default: _gelu,
    nn.SiLU: _silu,
    F.silu: _silu,
    aten.silu.default: _silu,
    nn.Mish: _mish,
    F.mish: _mish,
    aten.mish.default: _mish,
    nn.Hardswish: _hardswish,
    F.hardswish: _hardswish,
    aten.hardswish.default: _hardswish,
    nn.Softmax: _softmax,
    nn.Softmax2d: _softmax,
    F.softmax: _softmax,
    torch.softmax: _softmax,
    "softmax": _softmax,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    nn.LogSoftmax: _log_softmax,
    F.log_softmax: _log_softmax,
    torch.log_softmax: _log_softmax,
    "log_softmax": _log_softmax,
    aten.log_softmax.int: _log_softmax,
    # identities and reshapes
    nn.Identity: _identity,
    nn.Dropout: _dropout,
    nn.Dropout1d: _dropout,
    nn.Dropout2d: _dropout,
    nn.Dropout3d: _dropout,
    nn.AlphaDropout: _dropout,
    nn.FeatureAlphaDropout: _dropout,
    F.dropout: _dropout,
    aten.dropout.default: _dropout,
    aten.clone.default: _contiguous,
    aten.alias.default: _contiguous,
    "contiguous": _contiguous,
    "clone": _contiguous,
    "to": _cast,
    "float": _cast,
    "double": _cast,
    nn.Flatten: _flatten,
    torch.flatten: _flatten,
    "flatten": _flatten,
    aten.flatten.using_ints: _flatten,
    nn.Unflatten: _unflatten,
    torch.unflatten: _unflatten,
    "unflatten": _unflatten,
    aten.unflatten.int: _unflatten,
    "view": _reshape,
    "reshape": _reshape,
    torch.reshape: _reshape,
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape,
    "transpose": _transpose,
    "t": _transpose,
    torch.transpose: _transpose,
    torch.t: _transpose,
    aten.transpose.int: _transpose,
    aten.t.default: _transpose,
    "permute": _permute,
    torch.permute: _permute,
    aten.permute.default: _permute,
    "unsqueeze": _unsqueeze,
    torch.unsqueeze: _unsqueeze,
    aten.unsqueeze.default: _unsqueeze,
    "squeeze": _squeeze,
    torch.squeeze: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    # normalisation
    nn.modules.batchnorm._BatchNorm: _batchnorm,  # BatchNorm1d/2d/3d, lazy variants
    nn.SyncBatchNorm: _batchnorm,  # its own forward equals BatchNorm's in eval mode
    F.batch_norm: _batchnorm_f,
    aten.batch_norm.default: _batchnorm_f,
    nn.LayerNorm: _layernorm,
    F.layer_norm: _layernorm,
    aten.layer_norm.default: _layernorm,
    nn.GroupNorm: _groupnorm,
    F.group_norm: _groupnorm,
    aten.group_norm.default: _groupnorm,
    nn.modules.instancenorm._InstanceNorm: _instancenorm,
    F.instance_norm: _instancenorm,
    aten.instance_norm.default: _instancenorm,
    nn.RMSNorm: _rmsnorm,
    F.rms_norm: _rmsnorm,
    # pooling and reductions
    nn.MaxPool1d: _maxpool,
    nn.MaxPool2d: _maxpool,
    nn.MaxPool3d: _maxpool,
    F.max_pool1d: _maxpool,
    F.max_pool2d: _maxpool,
    F.max_pool3d: _maxpool,
    aten.max_pool1d.default: _maxpool,
    aten.max_pool2d.default: _maxpool,
    aten.max_pool3d.default: _maxpool,
    nn.AdaptiveMaxPool1d: _adaptive_maxpool,
    nn.AdaptiveMaxPool2d: _adaptive_maxpool,
    nn.AdaptiveMaxPool3d: _adaptive_maxpool,
    F.adaptive_max_pool1d: _adaptive_maxpool,
    F.adaptive_max_pool2d: _adaptive_maxpool,
    F.adaptive_max_pool3d: _adaptive_maxpool,
    nn.AvgPool1d: _avgpool,
    nn.AvgPool2d: _avgpool,
    nn.AvgPool3d: _avgpool,
    F.avg_pool1d: _avgpool_f,
    F.avg_pool2d: _avgpool_f,
    F.avg_pool3d: _avgpool_f,
    aten.avg_pool1d.default: _avgpool_f,
    aten.avg_pool2d.default: _avgpool_f,
    aten.avg_pool3d.default: _avgpool_f,
    nn.AdaptiveAvgPool1d: _adaptive_avgpool,
    nn.AdaptiveAvgPool2d: _adaptive_avgpool,
    nn.AdaptiveAvgPool3d: _adaptive_avgpool,
    F.adaptive_avg_pool1d: _adaptive_avgpool,
    F.adaptive_avg_pool2d: _adaptive_avgpool,
    F.adaptive_avg_pool3d: _adaptive_avgpool,
    aten.adaptive_avg_pool1d.default: _adaptive_avgpool,
    aten.adaptive_avg_pool2d.default: _adaptive_avgpool,
    aten.adaptive_avg_pool3d.default: _adaptive_avgpool,
    torch.mean: _mean,
    "mean": _mean,
    aten.mean.dim: _mean,
    aten.mean.default: _mean,
    torch.sum: _sum,
    "sum": _sum,
    aten.sum.dim_IntList: _sum,
    aten.sum.default: _sum,
    operator.getitem: _select,
    # constant shifts and scalings (call sites rewritten by tracing.py)
    shift_add: OpInfo("add", AFFINE, True, _SHIFT_WHY),
    shift_sub: OpInfo("sub", AFFINE, True, _SHIFT_WHY),
    scale_mul: OpInfo("mul", AFFINE, True, _SCALE_WHY),
    scale_div: OpInfo("div", AFFINE, True, _SCALE_WHY),
    # merges: the walk knows they join branches; the chain does not pass them in closed form yet
    operator.add: _add,
    torch.add: _add,
    "add": _add,
    aten.add.Tensor: _add,
    operator.sub: _sub,
    torch.sub: _sub,
    "sub": _sub,
    aten.sub.Tensor: _sub,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.concatenate: _cat,
    aten.cat.default: _cat,
    torch.stack: _stack,
    aten.stack.default: _stack,
    operator.matmul: _matmul,
    torch.matmul: _matmul,
    torch.mm: _matmul,
    torch.bmm: _matmul,
    "matmul": _matmul,
    "mm": _matmul,
    "bmm": _matmul,
    aten.matmul.default: _matmul,
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    operator.mul: _mul,
    torch.mul: _mul,
    "mul": _mul,
    aten.mul.Tensor: _mul,
    # the graph's ends
    "input": OpInfo("input", IO, True, "the client's private input: what the attack recovers"),
    "output": OpInfo("output", IO, True, "the model output, seen by the loss"),
}

NOT_UNDERSTOOD = OpInfo(
    "unknown", UNKNOWN, False, "rgap-audit has no entry for this operation: its effect on the chain is not analysed"
)


CONSTANT, FROM_OUTPUT, FROM_INPUT = "constant", "output", "input"


def jacobian_source(info) -> str:
    """What an op's Jacobian (for back-propagating dL/dz) depends on: CONSTANT (linear ops),
    FROM_OUTPUT (monotone elementwise activations: the derivative is a function of the output),
    FROM_INPUT (anything else: max-pool arg-max, norms over a slice, products, unknown ops)."""
    if info.kind in (LAYER, RESHAPE, PERMUTE, IDENTITY, IO, AFFINE):
        return CONSTANT
    if info.kind == MERGE and info.name in ("add", "sub", "cat", "stack"):
        return CONSTANT
    if info.kind == POOL and info.name in ("AvgPool", "AdaptiveAvgPool", "avg_pool", "mean", "sum", "getitem"):
        return CONSTANT
    if info.kind == NORM and info.name == "BatchNorm":
        return CONSTANT
    if info.kind == ACTIVATION and (info.invertible or info.name in ("ReLU", "ReLU6", "Softmax")):
        return FROM_OUTPUT
    return FROM_INPUT


def lookup(target: Any, module: nn.Module | None = None) -> OpInfo:
    """The registry entry for a call target (function, method name) or module; NOT_UNDERSTOOD if none.

    With a module, the entry of its nearest registered class, refined for this instance (`OpInfo.instance`).
    """
    if module is not None:
        mro = type(module).__mro__
        for i, cls in enumerate(mro):
            if cls in OPS:
                info = OPS[cls]
                own = [c.__name__ for c in mro[:i] if "forward" in vars(c)]
                if own and info.kind != UNKNOWN:  # a subclass that computes something else
                    return OpInfo(
                        type(module).__name__, UNKNOWN, False,
                        f"subclass of {cls.__name__} with its own forward ({own[0]}.forward): what it computes is "
                        f"not known to be a {cls.__name__}",
                    )
                return info.instance(module, info) if info.instance is not None else info
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


def check_model(model: nn.Module) -> list[tuple[str, str]]:
    """(module path, warning) for every submodule whose state the eval-mode analysis cannot see.

    Run it on the user's model before `.eval()` (tracing.trace does, and keeps the result in
    ``gm.meta["rgap_warnings"]``): a BatchNorm in training mode, say.
    """
    out = []
    for path, sub in model.named_modules():
        info = lookup(None, sub)
        if info.check is not None:
            msg = info.check(sub)
            if msg:
                out.append((path or "<model>", msg))
    return out


def numel(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(int(s) for s in shape)
