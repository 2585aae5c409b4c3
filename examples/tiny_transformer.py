"""A tiny pre-norm transformer encoder on float token vectors (tokens x dim, no Embedding): learned
positions, one block of two-head self-attention and an MLP, each written with nn.Linear layers and a
residual addition, mean pooling over tokens and a Linear classifier (cross-entropy).

Every projection is an nn.Linear, so rgap-audit analyses each one (its token positions are samples
that share one weight gradient); the attention products q k^T and (softmax) v are bilinear in the
data and are reported as merges.
"""

import math

import torch
import torch.nn as nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim // heads)

    def forward(self, x):  # x: (batch, tokens, dim)
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (batch, heads, tokens, dim/heads)
        k = self.k(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        y = (att @ v).transpose(1, 2).flatten(-2)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, tokens: int = 8, dim: int = 16, heads: int = 2, hidden: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, dim))
        self.block = Block(dim, heads, hidden)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # x: (batch, tokens, dim) floats
        x = self.block(x + self.pos)
        return self.head(self.ln(x).mean(dim=1))


RGAP_MODELS = {
    "TinyTransformer": {"factory": TinyTransformer, "input_shape": (8, 16), "loss": "cross-entropy"},
}
