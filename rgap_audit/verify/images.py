"""The pictures of --verify: per compared reconstruction one `Panel` (original, reconstruction on the
original's range, rescaled reconstruction on its own range, absolute difference), kept in the report as
small 8-bit PNGs so that the HTML report renders from the JSON alone; --save-images draws them as one
labelled figure (rgap_audit.figures, matplotlib)."""

from __future__ import annotations

import base64
import os
import re
import struct
import zlib
from collections.abc import Callable

import torch

from rgap_audit.errors import AuditError
from rgap_audit.options import LoadedModel
from rgap_audit.records import Metrics, Panel, Tile, plain

MAX_SIDE = 256  # tiles larger than this (pixels on the longer side) are kept block-averaged to it


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def image_shaped(shape: tuple[int, ...] | list[int]) -> bool:
    """(1 or 3, H, W): a picture a person can look at."""
    return len(shape) == 3 and shape[0] in (1, 3)


def encode_png(pixels: torch.Tensor) -> bytes:
    """An 8-bit PNG (grey for H x W, RGB for H x W x 3) from a uint8 tensor: the format's signature, IHDR,
    one zlib-compressed IDAT with filter type 0 per row, IEND (PNG specification, ISO/IEC 15948)."""
    if pixels.dtype != torch.uint8 or pixels.dim() not in (2, 3) or (pixels.dim() == 3 and pixels.shape[2] != 3):
        raise ValueError(f"encode_png: expected uint8 H x W or H x W x 3, got {pixels.dtype} {tuple(pixels.shape)}")
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    color_type = 0 if pixels.dim() == 2 else 2
    rows = pixels.reshape(h, -1).contiguous().numpy()
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _shrink(t: torch.Tensor) -> torch.Tensor:
    """C x H x W block-averaged so that the longer side is at most MAX_SIDE."""
    side = max(t.shape[-2:])
    if side <= MAX_SIDE:
        return t
    f = -(-side // MAX_SIDE)
    return torch.nn.functional.avg_pool2d(t.unsqueeze(0), f, ceil_mode=True).squeeze(0)


def tile(kind: str, t: torch.Tensor, lo: float, hi: float) -> Tile:
    """A C x H x W tensor (C in 1, 3) mapped from [lo, hi] to 0..255 (clipped), as a PNG tile."""
    span = hi - lo if hi > lo else 1.0
    u8 = ((_shrink(t.to(torch.float64)) - lo) / span).clamp(0, 1).mul(255).round().to(torch.uint8)
    pixels = u8[0] if u8.shape[0] == 1 else u8.permute(1, 2, 0)
    return Tile(kind=kind, png=base64.b64encode(encode_png(pixels)).decode("ascii"), lo=lo, hi=hi)


def panel(label: str, x: torch.Tensor, x_rec: torch.Tensor, metrics: Metrics | None) -> Panel:
    """Original and reconstruction (same range), the reconstruction on its own range, and |x' - x| (largest
    over channels) on [0, its maximum]."""
    shape = x.shape[-3:]
    x = x.reshape(shape).to(torch.float64)
    r = x_rec.reshape(shape).to(torch.float64)
    lo, hi = float(x.min()), float(x.max())
    rlo, rhi = float(r.min()), float(r.max())
    diff = (r - x).abs().amax(dim=0, keepdim=True)
    dmax = float(diff.max())
    return Panel(
        label=label,
        rel_error=None if metrics is None else metrics.rel_error,
        psnr_db=None if metrics is None else metrics.psnr_db,
        tiles=[
            tile("original", x, lo, hi),
            tile("reconstruction", r, lo, hi),
            tile("rescaled", r, rlo, rhi),
            tile("difference", diff, 0.0, dmax),
        ],
    )


def figure_path(directory: str, loaded: LoadedModel, suffix: str) -> str:
    """DIR/<file stem>.<model><suffix>.png: where --save-images writes a model's figure."""
    stem = os.path.splitext(os.path.basename(loaded.file or "model"))[0]
    return os.path.join(directory, f"{safe_name(stem)}.{safe_name(loaded.name)}{suffix}.png")


def write_png(directory: str, path: str, draw: Callable[[], bytes | None], model: str) -> bool:
    """Draw a figure (figures.py, matplotlib: rgap-audit[report]) and write it to `path`; False when there was
    nothing to draw. A missing extra or an unwritable directory is the run's error (AuditError), one line."""
    from rgap_audit import figures

    try:
        png = draw()
    except figures.MissingExtra as exc:
        raise AuditError(f"--save-images: {exc}", model=model) from exc
    if png is None:
        return False
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(png)
    except OSError as exc:
        raise AuditError(f"--save-images: cannot write {path!r}: {exc.strerror or exc}", model=model) from exc
    return True


def write_figure(directory: str, loaded: LoadedModel, suffix: str, panels: list[Panel], title: str) -> str:
    """The labelled figure of `panels` to DIR/<file stem>.<model><suffix>.png (matplotlib: rgap-audit[report])."""
    from rgap_audit import figures

    path = figure_path(directory, loaded, suffix)
    write_png(directory, path, lambda: figures.reconstruction_png([plain(p) for p in panels], title), loaded.name)
    return path
