"""Attention and torch's transformer layers, decomposed into the ops the analysis knows.

nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerEncoder run fused kernels
(in_proj_weight shared by q/k/v, scaled_dot_product_attention, a fast path for inference) that
torch.fx keeps as leaves and forward-mode AD cannot go through. Before tracing, tracing.py replaces
each by an equivalent module written with nn.Linear projections (weights copied: q/k/v get their own
Linear, so each is a weighted layer whose gradient rows stack on the shared input), reshapes,
matrix products and softmax; `math_attention()` makes F.scaled_dot_product_attention trace as the
same explicit ops. The copies hold the same values, so the traced model computes what the user's
model computes (tests/test_attention.py compares outputs); parameter names inside them differ
(`self_attn.q.weight` for a slice of `self_attn.in_proj_weight`).

Where a configuration is not covered (bias_kv, zero-attention, decoder layers with a memory input,
the full nn.Transformer), the module is left as it is and reported as not understood with that reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.ops.base import UNKNOWN, OpInfo, register


def sdpa_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with explicit ops (dropout is ignored: the audit runs in eval mode)."""
    scores = query @ key.transpose(-2, -1)
    scores = scores * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """While tracing: F.scaled_dot_product_attention is `sdpa_math`, so fx records its ops."""
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa_math
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight.detach())
        if bias is not None and lin.bias is not None:
            lin.bias.copy_(bias.detach())
    lin.weight.requires_grad_(weight.requires_grad)
    return lin.to(weight.dtype)


class AttentionMath(nn.Module):
    """nn.MultiheadAttention as explicit ops: separate q/k/v Linear layers, heads by reshape, sdpa_math."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.heads, self.batch_first = h, mha.batch_first
        bias = mha.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        self.q, self.k, self.v = _linear(wq, bq), _linear(wk, bk), _linear(wv, bv)
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.embed_dim = e

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self.q(query), self.k(key), self.v(value)
        q = q.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = k.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = v.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
        if is_causal and attn_mask is None:
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = self.out_proj((weights @ v).transpose(1, 2).flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


class EncoderLayerMath(nn.Module):
    """nn.TransformerEncoderLayer as explicit ops (post-norm or pre-norm, ReLU/GELU or a module activation)."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = AttentionMath(layer.self_attn)
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.norm_first = layer.norm_first
        act: Any = layer.activation
        self.activation = act if isinstance(act, nn.Module) else _Activation(act)

    def _sa(self, x: torch.Tensor, mask: torch.Tensor | None, padding: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        return self.self_attn(x, x, x, key_padding_mask=padding, attn_mask=mask, need_weights=False, is_causal=is_causal)[0]

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(x)))

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor | None = None, src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff(x))


class EncoderMath(nn.Module):
    """nn.TransformerEncoder as a loop over decomposed layers (no nested-tensor fast path), then its norm."""

    def __init__(self, enc: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayerMath(layer) for layer in enc.layers])
        self.norm = enc.norm

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor | None = None, src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None
    ) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, mask, src_key_padding_mask, bool(is_causal))
        return self.norm(out) if self.norm is not None else out


class _Activation(nn.Module):
    """A functional activation (F.relu, F.gelu) held as a module so the traced call keeps its meaning."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _mha_covered(m: nn.Module) -> str | None:
    assert isinstance(m, nn.MultiheadAttention)
    if m.bias_k is not None or m.add_zero_attn:
        return "MultiheadAttention with add_bias_kv or add_zero_attn is not decomposed"
    return None


def _layer_covered(m: nn.Module) -> str | None:
    assert isinstance(m, nn.TransformerEncoderLayer)
    return _mha_covered(m.self_attn)


def _encoder_covered(m: nn.Module) -> str | None:
    assert isinstance(m, nn.TransformerEncoder)
    return next((why for why in (_layer_covered(layer) for layer in m.layers) if why), None)


# class -> (whether it is covered: None or why not, the decomposition)
DECOMPOSE: dict[type, tuple[Any, Any]] = {
    nn.MultiheadAttention: (_mha_covered, AttentionMath),
    nn.TransformerEncoderLayer: (_layer_covered, EncoderLayerMath),
    nn.TransformerEncoder: (_encoder_covered, EncoderMath),
}


def decompose(model: nn.Module) -> list[str]:
    """Replace, in place, every covered attention / encoder module by its decomposition (outermost
    first); returns one line per replacement or per module left fused (with the reason)."""
    notes: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            entry = DECOMPOSE.get(type(child))
            if entry is not None:
                covered, build = entry
                why = covered(child)
                if why is None:
                    setattr(parent, name, build(child).to(next(child.parameters()).dtype))
                    notes.append(f"{path}: {type(child).__name__} decomposed into nn.Linear projections and explicit attention ops")
                    continue
                notes.append(f"{path}: {why}")
            visit(child, path)

    visit(model, "")
    return notes


_DECODER_WHY = (
    "decoder layer with a memory input (cross-attention on a second tensor): not decomposed; the audit follows one "
    "private input"
)
register(OpInfo("TransformerDecoderLayer", UNKNOWN, False, _DECODER_WHY), nn.TransformerDecoderLayer)
register(OpInfo("TransformerDecoder", UNKNOWN, False, _DECODER_WHY), nn.TransformerDecoder)
register(OpInfo("Transformer", UNKNOWN, False, _DECODER_WHY), nn.Transformer)
