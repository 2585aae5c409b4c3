"""What --verify attacks: the instance itself, or another input (--input: a saved tensor or an image) or
other weights (--weights: a state dict read with weights_only=True), checked against the model."""

from __future__ import annotations

import torch

from rgap_audit import samples
from rgap_audit.errors import AuditError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_weights(model: torch.nn.Module, path: str, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, matched key by key and shape by shape against the user's model."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise AuditError(f"--weights: no such file {path!r}", model=name) from exc
    except Exception as exc:  # unpickling refused, corrupt file ...
        cause = " ".join(str(exc).split())[:200]
        raise AuditError(f"--weights: cannot load {path!r} with weights_only=True: {type(exc).__name__}: {cause}", model=name) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AuditError(f"--weights: {path!r} does not hold a state dict of tensors", model=name)
    own = model.state_dict()
    missing = [k for k in own if k not in obj]
    unexpected = [k for k in obj if k not in own]
    wrong = [f"{k} {tuple(obj[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in obj and obj[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        if wrong:
            parts.append(f"wrong shape {len(wrong)} ({'; '.join(wrong[:2])}{'; ...' if len(wrong) > 2 else ''})")
        raise AuditError(f"--weights: checkpoint {path!r} does not match the model: {', '.join(parts)}", model=name)
    return obj


def load_input(path: str, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """One sample: `sample[:SCENE]` (rgap_audit.samples), an image file, or a tensor of shape `shape` or (1, *shape)."""
    if samples.parse(path) is not None:
        return load_sample(path, shape, name).reshape(1, *shape)
    if path.lower().endswith(IMAGE_SUFFIXES):
        return load_image(path, shape, name)
    obj = load_tensor(path, name)
    if tuple(obj.shape) not in (shape, (1, *shape)):
        raise AuditError(f"--input: tensor of shape {tuple(obj.shape)}, the model takes {shape} (one sample)", model=name)
    return obj.detach().to(torch.float64).reshape(1, *shape)


def load_batch_input(path: str, shape: tuple[int, ...], batch: int, name: str) -> torch.Tensor:
    """--input for a batch: a saved tensor of shape (B, *shape); an image is one sample and is refused."""
    want = (batch, *shape)
    scene = samples.parse(path)
    if scene is not None:
        if path != samples.KEYWORD:
            raise AuditError(f"--input: {path!r} is one picture; with --batch-size {batch} use --input sample (B different pictures)", model=name)
        try:
            pics = [load_sample(f"sample:{n}", shape, name) for n, _ in samples.batch_names(batch)]
        except ValueError as exc:
            raise AuditError(f"--input: {exc}", model=name) from exc
        return torch.stack([p.flip(-1) if m else p for p, (_, m) in zip(pics, samples.batch_names(batch))])
    if path.lower().endswith(IMAGE_SUFFIXES):
        raise AuditError(f"--input: an image is one sample; with --batch-size {batch} give a saved tensor of shape {want}", model=name)
    obj = load_tensor(path, name)
    if tuple(obj.shape) != want:
        raise AuditError(f"--input: tensor of shape {tuple(obj.shape)}; with --batch-size {batch} the model takes {want}", model=name)
    return obj.detach().to(torch.float64)


def load_sample(spec: str, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """`sample` or `sample:SCENE`: a picture drawn at the model's input size (rgap_audit.samples)."""
    scene = samples.parse(spec)
    if scene not in samples.SAMPLES:
        raise AuditError(f"--input: no sample picture {scene!r} (one of {', '.join(samples.SAMPLES)})", model=name)
    try:
        return samples.sample_image(scene, shape)
    except ValueError as exc:
        raise AuditError(f"--input {spec}: {exc}", model=name) from exc


def load_tensor(path: str, name: str) -> torch.Tensor:
    """A tensor saved with torch.save (alone or as the only value of a dict), read with weights_only=True."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise AuditError(f"--input: no such file {path!r}", model=name) from exc
    except Exception as exc:
        cause = " ".join(str(exc).split())[:200]
        raise AuditError(f"--input: cannot load {path!r} as a tensor (weights_only=True): {type(exc).__name__}: {cause}", model=name) from exc
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise AuditError(f"--input: {path!r} holds a {type(obj).__name__}, not a tensor", model=name)
    return obj


def load_image(path: str, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """An image file resized to the model's (1 or 3, H, W) input, scaled to [0, 1]."""
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise AuditError(f"--input: an image needs a (1 or 3, H, W) model input, the model takes {shape}", model=name)
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a test dependency
        raise AuditError("--input: reading images needs pillow (pip install pillow)", model=name) from exc
    try:
        with Image.open(path) as im:
            small = im.convert("L" if shape[0] == 1 else "RGB").resize((shape[2], shape[1]), Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    except FileNotFoundError as exc:
        raise AuditError(f"--input: no such file {path!r}", model=name) from exc
    except Exception as exc:
        raise AuditError(f"--input: cannot read image {path!r}: {type(exc).__name__}: {exc}", model=name) from exc
    x = data.reshape(shape[1], shape[2], shape[0]).permute(2, 0, 1).to(torch.float64) / 255.0
    return x.reshape(1, *shape)
