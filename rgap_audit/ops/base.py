"""The op table's building blocks: `OpInfo` (what rgap-audit knows about one operation), the table
itself (`OPS`), `register` to fill it, and `lookup` to read it.

Every other module reads an operation's behaviour from its `OpInfo` fields only: the walk, the
attack and the tracer never test module classes or op names themselves. Supporting a new operation
means one `register(OpInfo(...), targets...)` call in the family module it belongs to.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from rgap_audit.convspec import ConvSpec
    from rgap_audit.convtranspose import ConvTransposeSpec

aten = torch.ops.aten

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
SEGMENT = "segment"  # not an op: a record for the joint system of a branching segment (rgap_audit.segments)
KINDS = (LAYER, ACTIVATION, RESHAPE, PERMUTE, IDENTITY, POOL, NORM, MERGE, AFFINE, EMBEDDING, IO, UNKNOWN)

# what an op's Jacobian (for back-propagating dL/dz) depends on
CONSTANT = "constant"  # linear ops: weighted layers, reshapes, sums, eval BatchNorm, average pools
FROM_OUTPUT = "output"  # monotone elementwise activations: the derivative is a function of the output
FROM_INPUT = "input"  # anything else: max-pool arg-max, norms over a slice, products, unknown ops

# how an op sits between two weighted layers (rgap_audit.links): what the attack can do with it
PASS = "pass"  # same entries (reshape, identity): z passes unchanged in memory order
REORDER = "reorder"  # same entries, permuted (transpose, permute)
INVERT = "invert"  # elementwise and invertible: z = inverse(output)
CLIP = "clip"  # elementwise, clipped to a range (ReLU): z known strictly inside the range
SLICE = "slice"  # this input is a slice of the output (cat, stack): passes, the other branches fixed
LOSSY = "lossy"  # anything else: the forward value is only partly known (pools, norms, unknown ops)
CUT = "cut"  # joins branches (add, products): the path from one input stops here

# call-site families rewritten by rgap_audit.tracing into the wrappers of rgap_audit.ops.wrappers
MATMUL, ADD, SUB, MUL, DIV = "matmul", "add", "sub", "mul", "div"


@dataclass(frozen=True)
class Leak:
    """What an op's own gradient gives away at once, with no solve (rgap_audit.ops.weighted/embeddings)."""

    reason: str  # one line for the report
    exact: bool = True  # False: measured, and the op does not give its input away here
    tokens_used: int | None = None  # embeddings: distinct token ids in the input
    rows_nonzero: int | None = None  # embeddings: rows of the table with a non-zero gradient


@dataclass(frozen=True)
class LeakContext:
    """What `OpInfo.leak` looks at: the op's module, its normalised spec, input value and output gradient."""

    module: nn.Module | None
    spec: Any  # ConvSpec / ConvTransposeSpec for weighted layers, None otherwise
    value_in: torch.Tensor  # the op's data input on the instance
    k: torch.Tensor  # dL/d(output) on the instance
    samples: int  # rows the layer treats as separate samples


@dataclass(frozen=True)
class ParamRows:
    """Rows an op's own parameter gradient gives on its data input (OpInfo.param_rows)."""

    parameter: str  # what the report calls the parameter ("gamma")
    rows: torch.Tensor  # shaped like the op input: one row per channel, its coefficients on that channel


@dataclass(frozen=True)
class OpInfo:
    """What rgap-audit knows about one operation type.

    Fields the walk and the attack dispatch on: `kind`, `invertible`, `link` (how the op sits in a
    chain), `jacobian`, `clip`, `homogeneous`, `leak`, `param_rows`. Fields the tracer, the loader
    and the instance read: `rewrite`, `kwarg_names`, `shape_hint`, `tokens`, `folds_into_cross_entropy`.
    """

    name: str  # short name shown in reports
    kind: str
    invertible: bool  # can the op's input be recovered from its output (elementwise / bijective)?
    why: str  # one line: what this op does to the R-GAP chain
    # weighted layers: build the normalised ConvSpec from (module or None, node args, one sample's input shape)
    conv_spec: Callable[[nn.Module | None, tuple, dict, tuple[int, ...]], ConvSpec | ConvTransposeSpec] | None = None
    # invertible elementwise ops the attack inverts: z = inverse(module, node kwargs, y)
    inverse: Callable[[nn.Module | None, dict, torch.Tensor], torch.Tensor] | None = None
    # module state the analysis cannot see in eval mode (BatchNorm in train mode): a warning or None.
    # Call it on the user's module before any .eval(); `check_model` runs it over a whole model.
    check: Callable[[nn.Module], str | None] | None = None
    # per-module refinement of this entry (a BatchNorm with a zero gamma is not invertible); lookup applies it
    instance: Callable[[nn.Module, OpInfo], OpInfo] | None = None
    link: str = LOSSY  # PASS, REORDER, INVERT, CLIP, SLICE, LOSSY, CUT
    jacobian: str = FROM_INPUT  # CONSTANT, FROM_OUTPUT, FROM_INPUT
    elementwise: bool = False  # each output entry depends on the same input entry only
    clip: tuple[float, float] | None = None  # CLIP ops: the output range; known strictly inside it
    homogeneous: bool = False  # op(c z) = c op(z) for every c > 0 (positively homogeneous)
    # the gradient gives the op's input (or its token set) away at once: a Leak, or None when it does not here
    leak: Callable[[LeakContext], Leak | None] | None = None
    # rows its own parameters' gradients give on its data input: (module, dL/d(output)) -> ParamRows (one
    # row per channel, BatchNorm's dL/dgamma_c), or None when they give none here
    param_rows: Callable[[nn.Module, torch.Tensor], ParamRows | None] | None = None
    rewrite: str | None = None  # call-site family tracing.py rewrites (MATMUL, ADD, SUB, MUL, DIV)
    kwarg_names: tuple[str, ...] = ()  # positional arguments the inverse reads, moved to keywords by tracing.py
    # the input shape (one sample) a first op of this type fixes, or a hint of what to pass (str)
    shape_hint: Callable[[nn.Module | None], tuple[int, ...] | str] | None = None
    tokens: Callable[[nn.Module], int] | None = None  # token-id inputs: how many ids the module accepts
    # transposes of a matrix (W.t(), W.transpose(0, 1)): given the call's arguments after the tensor, whether
    # this call swaps a 2-d tensor's two dimensions (tracing.py reads x @ W.t() as a Linear with weight W)
    transposes_matrix: Callable[[tuple], bool] | None = None
    param_transposed: bool = False  # the weight Parameter holds W^T of the normalised layer (x @ W)
    # a head op a cross-entropy loss absorbs, CE(op(z)) = CE(z) (log-softmax over the classes): given (module,
    # call args, kwargs, output shape), whether this call is one; instance.py then audits the logits z
    folds_into_cross_entropy: Callable[[nn.Module | None, tuple, dict, tuple[int, ...]], bool] | None = None
    on_tuple: OpInfo | None = None  # the entry when the call reads one item of a multi-output op's tuple (getitem)
    # the module's call as an explicit expression of its data input, for the linearisations (jvp) of links and
    # segments: eval BatchNorm as scale * x + shift, since torch's forward AD of batch_norm first loads
    # TorchDynamo's decompositions (about 2 s in every process); None: call the module itself
    evaluate: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


OPS: dict[Any, OpInfo] = {}


def register(info: OpInfo, *targets: Any) -> OpInfo:
    """Enter `info` in the table under every target (module class, function, aten overload, method name)."""
    for t in targets:
        if t in OPS and OPS[t] is not info:  # an alias (torch.concat is torch.cat) may be listed twice
            raise ValueError(f"{t!r} is registered twice ({OPS[t].name} and {info.name})")
        OPS[t] = info
    return info


# Entries for classes of optional libraries, registered once the user's code has imported that library
# (a model built from its layers imported it before we see it), so that an audit never imports it itself.
_WHEN_IMPORTED: dict[str, Callable[[Any], None]] = {}


def register_when_imported(module_name: str, enter: Callable[[Any], None]) -> None:
    """Call `enter(module)` the first time a table lookup finds `module_name` in sys.modules."""
    _WHEN_IMPORTED[module_name] = enter
    _register_imported()


def _register_imported() -> None:
    for name in [n for n in _WHEN_IMPORTED if n in sys.modules]:
        _WHEN_IMPORTED.pop(name)(sys.modules[name])


def renamed(info: OpInfo, name: str) -> OpInfo:
    """The same entry under another report name (conv1d / conv2d ...)."""
    return replace(info, name=name)


NOT_UNDERSTOOD_WHY = "rgap-audit has no entry for this operation: its effect on the chain is not analysed"
NOT_UNDERSTOOD = OpInfo("unknown", UNKNOWN, False, NOT_UNDERSTOOD_WHY)


def lookup(target: Any, module: nn.Module | None = None) -> OpInfo:
    """The table entry for a call target (function, method name) or module; NOT_UNDERSTOOD if none.

    With a module, the entry of its nearest registered class, refined for this instance (`OpInfo.instance`).
    """
    if _WHEN_IMPORTED:
        _register_imported()
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
        return OpInfo(type(module).__name__, UNKNOWN, False, NOT_UNDERSTOOD_WHY)
    try:
        hit = OPS.get(target)
    except TypeError:  # unhashable target
        hit = None
    if hit is not None:
        return hit
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return OpInfo(str(name), UNKNOWN, False, NOT_UNDERSTOOD_WHY)


def registered_module(module: nn.Module) -> bool:
    """Whether some class of `module` (other than nn.Module itself) has an entry."""
    if _WHEN_IMPORTED:
        _register_imported()
    return any(cls in OPS for cls in type(module).__mro__ if cls is not nn.Module)


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
