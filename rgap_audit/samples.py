"""Sample pictures for `--input sample`: scenes a person recognises, drawn here at run time.

A demonstration on uniform noise shows nothing a reader can judge; a house or a face that comes back
(or does not) from the gradient does. The scenes are ours: flat-coloured geometric shapes drawn in
continuous coordinates (u to the right, v downwards, both in [0, 1]) and supersampled 4x per axis, so
they are the same picture at any resolution (a 28x28 grey FCN3 input and a 224x224 RGB one alike) and
no image file or licence comes with the package.

    --input sample          the house
    --input sample:face     another scene (SAMPLES lists them); with --batch-size B, `sample` gives B
                            different pictures (the scenes, then their mirror images)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SUPERSAMPLE = 4
KEYWORD = "sample"
Painter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rgb(*c: float) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float64).reshape(3, 1, 1)


def _paint(img: torch.Tensor, mask: torch.Tensor, color: torch.Tensor) -> None:
    img.copy_(torch.where(mask.unsqueeze(0), color.expand_as(img), img))


def house(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A house with a red roof and a door, a tree and the sun, on grass under a blue sky."""
    t = (v / 0.7).clamp(0, 1).unsqueeze(0)
    img = _rgb(0.30, 0.55, 0.90) * (1 - t) + _rgb(0.75, 0.88, 1.0) * t  # sky, lighter towards the horizon
    _paint(img, (u - 0.82) ** 2 + (v - 0.17) ** 2 < 0.09**2, _rgb(1.0, 0.85, 0.15))  # sun
    _paint(img, v > 0.70, _rgb(0.30, 0.62, 0.22))  # grass
    _paint(img, (u > 0.16) & (u < 0.58) & (v > 0.46) & (v < 0.84), _rgb(0.93, 0.86, 0.70))  # wall
    roof = (v > 0.22) & (v <= 0.46) & ((u - 0.37).abs() < (v - 0.22) / 0.24 * 0.26)
    _paint(img, roof, _rgb(0.75, 0.12, 0.10))
    _paint(img, (u > 0.32) & (u < 0.42) & (v > 0.62) & (v < 0.84), _rgb(0.40, 0.22, 0.08))  # door
    for x0 in (0.20, 0.46):
        _paint(img, (u > x0) & (u < x0 + 0.08) & (v > 0.52) & (v < 0.60), _rgb(0.35, 0.65, 0.95))  # windows
    _paint(img, (u > 0.735) & (u < 0.785) & (v > 0.52) & (v < 0.86), _rgb(0.45, 0.28, 0.12))  # trunk
    _paint(img, (u - 0.76) ** 2 + (v - 0.45) ** 2 < 0.12**2, _rgb(0.10, 0.42, 0.12))  # crown
    return img


def face(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A smiling face: a yellow disc with a dark rim, two eyes and a mouth, on a pale background."""
    img = _rgb(0.88, 0.92, 0.96).expand(3, *u.shape).clone()
    r = ((u - 0.5) ** 2 + (v - 0.5) ** 2).sqrt()
    _paint(img, r < 0.43, _rgb(0.20, 0.15, 0.10))  # rim
    _paint(img, r < 0.40, _rgb(1.0, 0.80, 0.10))
    for x0 in (0.36, 0.64):
        _paint(img, ((u - x0) / 0.05) ** 2 + ((v - 0.38) / 0.08) ** 2 < 1.0, _rgb(0.15, 0.10, 0.08))
    _paint(img, (r > 0.21) & (r < 0.27) & (v > 0.56), _rgb(0.60, 0.10, 0.10))  # mouth
    return img


SAMPLES: dict[str, Painter] = {"house": house, "face": face}


def render(name: str, height: int, width: int) -> torch.Tensor:
    """Scene `name` as a 3 x height x width float64 tensor in [0, 1] (4x4 supersampled per pixel)."""
    if name not in SAMPLES:
        raise KeyError(name)
    s = SUPERSAMPLE
    v = (torch.arange(height * s, dtype=torch.float64) + 0.5) / (height * s)
    u = (torch.arange(width * s, dtype=torch.float64) + 0.5) / (width * s)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    fine = SAMPLES[name](uu, vv)
    return torch.nn.functional.avg_pool2d(fine.unsqueeze(0), s).squeeze(0).clamp(0, 1)


def sample_image(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Scene `name` at a model's (1 or 3, H, W) input: RGB, or its luminance (ITU-R BT.601 weights) for one channel."""
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"sample images need a (1 or 3, H, W) input, the model takes {tuple(shape)}")
    img = render(name, shape[1], shape[2])
    if shape[0] == 1:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)
    return img


def batch_names(batch: int) -> list[tuple[str, bool]]:
    """B different pictures: each scene, then each scene mirrored (name, mirrored)."""
    out = [(n, m) for m in (False, True) for n in SAMPLES]
    if batch > len(out):
        raise ValueError(f"--input sample gives at most {len(out)} different pictures, not {batch}")
    return out[:batch]


def parse(spec: str) -> str | None:
    """`sample` -> the first scene, `sample:NAME` -> NAME; None for anything else (a file name)."""
    if spec == KEYWORD:
        return next(iter(SAMPLES))
    if spec.startswith(KEYWORD + ":"):
        return spec[len(KEYWORD) + 1 :]
    return None
