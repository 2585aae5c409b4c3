"""Trace a model with torch.fx and annotate every node with its shape (ShapeProp).

Trace failures become one-line AuditErrors that name the model, the cause and the line of the
user's forward that caused it.
"""

from __future__ import annotations

import copy
import traceback

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from rgap_audit.errors import AuditError


def _user_line(exc: BaseException, file: str | None) -> int | None:
    """Innermost traceback line inside the audited file, if any."""
    if not file:
        return None
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == file:
            line = frame.lineno
    return line


def trace(
    model: torch.nn.Module,
    example: torch.Tensor,
    *,
    file: str | None = None,
    name: str | None = None,
) -> fx.GraphModule:
    """Symbolically trace a float64 copy of `model` and propagate shapes from `example`.

    The copy keeps the caller's model untouched; float64 makes ranks and reconstructions exact
    enough to compare with dense SVDs.
    """
    model = copy.deepcopy(model).to(torch.float64).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError ...
        cause = " ".join(str(exc).split()) or type(exc).__name__
        if "symbolically traced variables cannot be used as inputs to control flow" in cause:
            cause = "forward has data-dependent control flow (an `if`/`while` on a tensor value), which torch.fx cannot trace"
        raise AuditError(f"cannot trace with torch.fx: {cause}", file=file, model=name, line=_user_line(exc, file)) from exc
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example.to(torch.float64))
    except Exception as exc:
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise AuditError(
            f"forward failed on an input of shape {tuple(example.shape)}: {type(exc).__name__}: {cause}",
            file=file,
            model=name,
            line=_user_line(exc, file),
        ) from exc
    return gm
