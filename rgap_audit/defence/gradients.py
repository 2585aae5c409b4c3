"""What a client does to its gradient before sharing it: clip and noise (DP-SGD), top-k, quantise.

Every function maps {parameter name: gradient} to a new dict and leaves its argument untouched. At batch
size 1 the per-sample gradient is the shared one, so per-sample clipping is a clip of the whole gradient.
"""

from __future__ import annotations

import math

import torch

Grads = dict[str, torch.Tensor]


def global_norm(grads: Grads) -> float:
    """The l2 norm of all gradient entries together (what DP-SGD clips)."""
    return math.sqrt(sum(float((g.to(torch.float64) ** 2).sum()) for g in grads.values()))


def clip_and_noise(grads: Grads, clip_norm: float, sigma: float, generator: torch.Generator) -> Grads:
    """Clip to norm clip_norm, then add Gaussian noise of standard deviation sigma * clip_norm to every entry.

    This is DP-SGD's mechanism for one sample (Opacus: noise std = noise_multiplier * max_grad_norm).
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(grads)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for name, g in grads.items():
        noise = torch.randn(g.shape, generator=generator, dtype=torch.float64).to(g.dtype)
        out[name] = g * scale + (sigma * clip_norm) * noise
    return out


def top_k(grads: Grads, keep_fraction: float) -> Grads:
    """Keep the largest-magnitude ceil(keep_fraction * n) entries of each tensor, zero the rest (gradient pruning)."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    out = {}
    for name, g in grads.items():
        flat = g.reshape(-1)
        k = max(1, math.ceil(keep_fraction * flat.numel()))
        kept = torch.zeros_like(flat)
        idx = flat.abs().topk(k).indices
        kept[idx] = flat[idx]
        out[name] = kept.reshape(g.shape)
    return out


def to_fp16(grads: Grads) -> Grads:
    """Round every entry to IEEE half precision and back (what an fp16 update carries)."""
    return {name: g.to(torch.float16).to(g.dtype) for name, g in grads.items()}


def to_int8(grads: Grads) -> Grads:
    """Symmetric per-tensor int8: scale = max|g| / 127, entries rounded to integers in [-127, 127], then dequantised."""
    out = {}
    for name, g in grads.items():
        peak = float(g.abs().max()) if g.numel() else 0.0
        if peak == 0.0:
            out[name] = g.clone()
            continue
        scale = peak / 127.0
        out[name] = torch.clamp(torch.round(g / scale), -127, 127) * scale
    return out
