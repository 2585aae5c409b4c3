"""Embeddings: integer token ids -> rows of a table. Injective for distinct rows (recovering the
output recovers the tokens), and the table's gradient is non-zero exactly on the rows of the tokens
used, so the set of tokens leaks from the gradient alone (measured on the instance).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.ops.base import EMBEDDING, FROM_INPUT, Leak, LeakContext, OpInfo, aten, register

_EMBEDDING_WHY = (
    "integer token ids -> rows of its weight: injective when rows are distinct, so recovering its output recovers "
    "the tokens; and its weight gradient is non-zero exactly on the rows of the tokens used, so the set of tokens "
    "(the union over a batch) leaks from the gradient alone; its input is integer, not a float unknown"
)


def token_leak(ctx: LeakContext) -> Leak | None:
    """dL/dW[t] = sum of k over the positions holding token t: compare its non-zero rows with the tokens used."""
    m: Any = ctx.module
    if m is None or not m.weight.requires_grad:
        return None
    k = ctx.k
    dim = k.shape[-1]
    tokens = ctx.value_in.reshape(-1)
    grad_w = torch.zeros(m.num_embeddings, dim, dtype=k.dtype).index_add_(0, tokens, k.reshape(-1, dim))
    used = set(tokens.tolist())
    nonzero = set(torch.nonzero(grad_w.abs().sum(dim=1)).reshape(-1).tolist())
    if nonzero != used:
        return Leak("", exact=False, tokens_used=len(used), rows_nonzero=len(nonzero))
    return Leak(
        f"the set of tokens used ({len(used)} distinct) leaks exactly: dL/dW is non-zero on exactly their rows",
        tokens_used=len(used),
        rows_nonzero=len(nonzero),
    )


def _vocabulary(m: Any) -> int:
    return int(m.num_embeddings)


EMBEDDING_OP = register(
    OpInfo("Embedding", EMBEDDING, True, _EMBEDDING_WHY, jacobian=FROM_INPUT, leak=token_leak, tokens=_vocabulary),
    nn.Embedding, F.embedding, aten.embedding.default,
)
