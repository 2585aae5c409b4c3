"""Forward as the audit calls it: one batch-first private input in, one tensor out.

Model files call `forward` in many ways: `forward(tokens, hidden)` for an RNN language model, a
sequence-first input, `return logits, features` or a dict or dataclass of outputs. The rest of the
pipeline needs a function of the private input alone whose value is the tensor the loss sees. This
module builds it from the model's `ForwardCall` (options.py), declared in RGAP_MODELS:

* `example_inputs(model)` (or `(model, batch_size)`) returns forward's positional arguments; the one
  named by `private_input` is replaced by the audit's seeded input, the others are held fixed at
  their example values (they become constants of the traced graph, as an initial hidden state is);
* `batch_dim` says where that argument's batch dimension is: the audit's input is batch-first and is
  permuted into place inside the traced graph (a permutation: it passes the chain unchanged);
* `output` picks one of several outputs by index, key or attribute; by default the first tensor.

`adapt` returns the (already copied) model with its class swapped for a subclass whose forward does
exactly this, so torch.fx and torch.export trace through it with the module paths unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from rgap_audit.errors import AuditError
from rgap_audit.options import ForwardCall, LoadedModel


def positional_params(module: nn.Module) -> list[inspect.Parameter]:
    """forward's positional parameters (self excluded); empty when the signature cannot be read."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def required_params(module: nn.Module) -> list[str]:
    """Names of forward's positional parameters without a default."""
    return [p.name for p in positional_params(module) if p.default is inspect.Parameter.empty]


def arity_error(module: nn.Module, call: ForwardCall) -> str | None:
    """Why the audit cannot call forward with the private input alone, or None when it can."""
    required = required_params(module)
    if call.example_inputs is not None or len(required) <= 1:
        return None
    return (
        f"forward takes {len(required)} arguments ({', '.join(required)}): declare example_inputs in RGAP_MODELS "
        "(a function of the model returning forward's arguments, e.g. lambda m: (tokens, m.init_hidden(1))) and "
        "private_input if the private input is not the first (see README)"
    )


def private_index(module: nn.Module, call: ForwardCall, n_args: int) -> int:
    """The position of the private input among forward's `n_args` positional arguments."""
    key = call.private_input
    if isinstance(key, str):
        names = [p.name for p in positional_params(module)]
        if key not in names:
            raise ValueError(f"private_input {key!r} is not a parameter of forward ({', '.join(names) or 'no parameters'})")
        index = names.index(key)
    else:
        index = int(key)
    if not 0 <= index < n_args:
        raise ValueError(f"private_input {key!r}: forward is called with {n_args} argument(s)")
    return index


def _calls_with_batch(fn: Callable[..., Any]) -> bool:
    """Whether example_inputs takes a second parameter (the batch size)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def example_args(loaded: LoadedModel, batch: int | None) -> tuple[list[Any], int] | None:
    """forward's positional arguments from `example_inputs` and the private one's position; None
    when none are declared. Called with the batch size when example_inputs takes one."""
    call = loaded.call
    if call.example_inputs is None:
        try:
            private_index(loaded.module, call, 1)
        except ValueError as exc:
            raise AuditError(f"{exc}; a private input other than forward's first argument needs example_inputs", loaded.file, loaded.name) from exc
        return None
    fn = call.example_inputs
    try:
        with torch.no_grad():
            args = fn(loaded.module, batch or 1) if _calls_with_batch(fn) else fn(loaded.module)
    except Exception as exc:
        raise AuditError(f"example_inputs failed: {type(exc).__name__}: {' '.join(str(exc).split())}", loaded.file, loaded.name) from exc
    args = list(args) if isinstance(args, (tuple, list)) else [args]
    try:
        index = private_index(loaded.module, call, len(args))
    except ValueError as exc:
        raise AuditError(str(exc), loaded.file, loaded.name) from exc
    if not isinstance(args[index], torch.Tensor):
        raise AuditError(f"example_inputs: the private input (argument {index}) is a {type(args[index]).__name__}, not a tensor", loaded.file, loaded.name)
    if call.batch_dim >= args[index].dim():
        raise AuditError(f"batch_dim {call.batch_dim}: the private input has {args[index].dim()} dimensions", loaded.file, loaded.name)
    return args, index


def sample_shape(example: torch.Tensor, batch_dim: int) -> tuple[int, ...]:
    """One sample's shape: the example's without its batch dimension."""
    shape = list(example.shape)
    del shape[batch_dim]
    return tuple(int(s) for s in shape)


def _as_float64(value: Any) -> Any:
    """Floating tensors (nested in tuples and lists) in float64, as the traced copy of the model is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64) if value.is_floating_point() else value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_as_float64(v) for v in value)
    return value


# ----------------------------------------------------------------------------- outputs
def _is_value(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, fx.Proxy))


def _items(out: Any) -> list[tuple[Any, str, Any]]:
    """(key, label, value) of each output of a tuple, list, dict or dataclass, in order."""
    if isinstance(out, Mapping):
        return [(k, f"[{k!r}]", v) for k, v in out.items()]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, f".{f.name}", getattr(out, f.name)) for f in dataclasses.fields(out)]
    if isinstance(out, (tuple, list)):
        names = getattr(out, "_fields", None)  # a namedtuple: its fields are keys too
        return [(names[i] if names else i, f"[{i}]", v) for i, v in enumerate(out)]
    return []


def select_output(out: Any, key: int | str | None) -> tuple[Any, str | None]:
    """The output the loss sees, and how the report names it (None when forward returns one tensor).

    Raises ValueError naming what forward returned when nothing matches.
    """
    if _is_value(out) and key is None:
        return out, None
    items = _items(out)
    kind = type(out).__name__
    if not items:
        raise ValueError(f"forward returns a {kind}, not a tensor or a tuple, list, dict or dataclass of outputs")
    if key is None:
        for _, label, value in items:
            if _is_value(value):
                return value, f"{label} of the {kind} of {len(items)} that forward returns (its first tensor)"
        raise ValueError(f"forward returns a {kind} of {len(items)} with no tensor in it: declare `output`")
    for k, label, value in items:
        if k == key or (isinstance(key, int) and not isinstance(key, bool) and label == f"[{key}]"):
            return value, f"{label} of the {kind} of {len(items)} that forward returns (declared output {key!r})"
    available = ", ".join(repr(k) for k, _, _ in items)
    raise ValueError(f"output {key!r} is not among the outputs of forward (a {kind} with {available})")


# ----------------------------------------------------------------------------- the adapted module
def adapt(model: nn.Module, call: ForwardCall, fixed: list[Any] | None, index: int, ndim: int, record: dict[str, Any]) -> nn.Module:
    """`model` (a copy the caller owns) with forward(x): x batch-first, the other arguments fixed,
    the declared (or first tensor) output returned. `ndim` is x's number of dimensions; `record`
    receives `output`, the name of the output used."""
    original = type(model).forward
    args = _as_float64(list(fixed)) if fixed is not None else None
    bd = call.batch_dim
    perm = [*range(1, bd + 1), 0, *range(bd + 1, ndim)] if bd else None
    key = call.output

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        arg = x.permute(*perm) if perm is not None else x
        if args is None:
            out = original(self, arg)
        else:
            full = list(args)
            full[index] = arg
            out = original(self, *full)
        try:
            value, record["output"] = select_output(out, key)
        except ValueError as exc:
            raise AuditError(f"{exc}: declare which output is the logits with output = INDEX or KEY in RGAP_MODELS (see README)") from exc
        return value

    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return model
