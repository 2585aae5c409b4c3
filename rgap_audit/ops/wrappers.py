"""Call-site wrappers: rgap_audit.tracing rewrites call sites whose meaning depends on their operands
into these functions, each of which computes exactly what the original call computed and has its own
entry in the op table.

``x @ W`` is a Linear layer when W is a Parameter and a bilinear merge when both operands are data;
``x + c`` is an invertible shift when c does not depend on the input.
"""

from __future__ import annotations

from typing import Any

import torch


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
