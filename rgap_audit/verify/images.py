"""The pictures --save-images writes: original, reconstruction and rescaled reconstruction side by side."""

from __future__ import annotations

import os
import re

import torch

from rgap_audit.errors import AuditError
from rgap_audit.options import LoadedModel


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def save_comparison(
    path: str, x: torch.Tensor, rows: list[tuple[str, torch.Tensor]], originals: list[torch.Tensor] | None = None
) -> str:
    """One PNG: per row original | reconstruction | rescaled reconstruction (pillow).

    x is the original shown on every row; `originals` (one per row) replaces it row by row, for a batch
    whose rows compare different samples. The first two tiles of a row share that row's original's range.
    """
    from PIL import Image

    x = x.reshape(x.shape[-3:]).to(torch.float64)
    origs = [x] * len(rows) if originals is None else [o.reshape(x.shape).to(torch.float64) for o in originals]
    if len(origs) != len(rows):
        raise ValueError(f"save_comparison: {len(rows)} rows but {len(origs)} originals")

    def to_img(t: torch.Tensor, a: float, s: float) -> Image.Image:
        u8 = (((t.reshape(x.shape) - a) / s).clamp(0, 1) * 255).round().to(torch.uint8)
        c, h, w = u8.shape
        arr = u8.permute(1, 2, 0).contiguous().numpy()
        img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
        scale = max(1, 128 // max(h, w))
        return img.convert("RGB").resize((w * scale, h * scale), Image.Resampling.NEAREST)

    tiles = []
    for (_, r), o in zip(rows, origs):
        lo, hi = float(o.min()), float(o.max())
        span = hi - lo if hi > lo else 1.0
        r = r.to(torch.float64)
        rlo, rhi = float(r.min()), float(r.max())
        tiles.append([to_img(o, lo, span), to_img(r, lo, span), to_img(r, rlo, rhi - rlo if rhi > rlo else 1.0)])
    tw, th = tiles[0][0].size
    gap = 4
    canvas = Image.new("RGB", (3 * tw + 2 * gap, len(tiles) * th + (len(tiles) - 1) * gap), "white")
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            canvas.paste(t, (j * (tw + gap), i * (th + gap)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    return path


def write_image(
    directory: str, loaded: LoadedModel, suffix: str, x: torch.Tensor, rows: list, originals: list | None = None
) -> str:
    """save_comparison to DIR/<file stem>.<model><suffix>.png; an unwritable path is an AuditError."""
    stem = os.path.splitext(os.path.basename(loaded.file or "model"))[0]
    path = os.path.join(directory, f"{safe_name(stem)}.{safe_name(loaded.name)}{suffix}.png")
    try:
        return save_comparison(path, x, rows, originals=originals)
    except OSError as exc:
        raise AuditError(f"--save-images: cannot write {path!r}: {exc.strerror or exc}", model=loaded.name) from exc
