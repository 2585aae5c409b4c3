"""Ops with several data inputs (sums, concatenations, products) and the fixed affine maps of one data
input (x + c, c * x, x / c with c constant), which tracing.py tells apart at each call site.

A concatenation holds each input as a slice of its output, so what is known of the output passes to
each branch; a sum does not give its terms, and a product of two data tensors is bilinear.
"""

from __future__ import annotations

import operator

import torch

from rgap_audit.ops import wrappers
from rgap_audit.ops.base import (
    ADD,
    AFFINE,
    CONSTANT,
    CUT,
    DIV,
    INVERT,
    MATMUL,
    MERGE,
    MUL,
    SLICE,
    SUB,
    UNKNOWN,
    OpInfo,
    aten,
    register,
)

_SHIFT_WHY = "adds a constant (or a Parameter) that does not depend on the input: an invertible shift, passes the chain"
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


def _affine(name: str, why: str) -> OpInfo:
    # no stored inverse: an affine map is inverted from its own map (rgap_audit.links)
    return OpInfo(name, AFFINE, True, why, link=INVERT, jacobian=CONSTANT, elementwise=True)


register(_affine("add", _SHIFT_WHY), wrappers.shift_add)
register(_affine("sub", _SHIFT_WHY), wrappers.shift_sub)
register(_affine("mul", _SCALE_WHY), wrappers.scale_mul)
register(_affine("div", _SCALE_WHY), wrappers.scale_div)

register(
    OpInfo("add", MERGE, False, _ADD_WHY, link=CUT, jacobian=CONSTANT, rewrite=ADD),
    operator.add, torch.add, "add", aten.add.Tensor, operator.iadd,
)
register(
    OpInfo(
        "sub", MERGE, False, "joins branches (a difference): each input's forward value is not known separately",
        link=CUT, jacobian=CONSTANT, rewrite=SUB,
    ),
    operator.sub, torch.sub, "sub", aten.sub.Tensor, operator.isub,
)
register(
    OpInfo(
        "cat", MERGE, True,
        "concatenates branches: each input is a slice of the output, so knowing the output gives every input",
        link=SLICE, jacobian=CONSTANT,
    ),
    torch.cat, torch.concat, torch.concatenate, aten.cat.default,
)
register(
    OpInfo("stack", MERGE, True, "stacks branches: each input is a slice of the output", link=SLICE, jacobian=CONSTANT),
    torch.stack, aten.stack.default,
)
register(
    OpInfo("matmul", MERGE, False, _PRODUCT_WHY, link=CUT, rewrite=MATMUL),
    operator.matmul, torch.matmul, torch.mm, "matmul", "mm", aten.matmul.default, aten.mm.default,
)
register(OpInfo("matmul", MERGE, False, _PRODUCT_WHY, link=CUT), torch.bmm, "bmm", aten.bmm.default)
register(
    OpInfo("mul", MERGE, False, _MUL_WHY, link=CUT, rewrite=MUL),
    operator.mul, torch.mul, "mul", aten.mul.Tensor, operator.imul,
)
register(
    OpInfo(
        "div", UNKNOWN, False,
        "division by a tensor that depends on the input (or by a constant with zero entries): not analysed",
        rewrite=DIV,
    ),
    operator.truediv, torch.div, "div", aten.div.Tensor, operator.itruediv,
)
