"""`--verify`: attack a loaded model with closed-form R-GAP and compare with the static verdict.

For one model: draw a seeded random input (or read --input: a saved tensor or an image), use the
weights as constructed (or --weights, loaded with weights_only=True), compute the gradient a client
would share, reconstruct its input, and report per layer the relative error of the recovered layer
input next to the static verdict, then MSE / PSNR / relative error / wall time and one plain
sentence saying whether the static verdict was confirmed.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from typing import Any

import torch

from rgap_audit.attack.engine import Reconstruction, reconstruct
from rgap_audit.errors import AuditError
from rgap_audit.losses import choose_loss, loss_value, make_labels
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import Basis, ModelReport

EXACT = 1e-6  # relative error up to which a recovery counts as exact (float64 recoveries reach ~1e-12)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- inputs and weights
def _load_weights(model: torch.nn.Module, path: str, name: str) -> None:
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
    model.load_state_dict(obj, strict=True)


def _load_input(path: str, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if path.lower().endswith(IMAGE_SUFFIXES):
        return _load_image(path, shape, name)
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
    if tuple(obj.shape) not in (shape, (1, *shape)):
        raise AuditError(f"--input: tensor of shape {tuple(obj.shape)}, the model takes {shape} (one sample)", model=name)
    if not obj.is_floating_point():
        obj = obj.to(torch.float64)
    return obj.detach().to(torch.float64).reshape(1, *shape)


def _load_image(path: str, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise AuditError(f"--input: an image needs a (1 or 3, H, W) model input, the model takes {shape}", model=name)
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a test dependency
        raise AuditError("--input: reading images needs pillow (pip install pillow)", model=name) from exc
    try:
        with Image.open(path) as im:
            im = im.convert("L" if shape[0] == 1 else "RGB").resize((shape[2], shape[1]), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except FileNotFoundError as exc:
        raise AuditError(f"--input: no such file {path!r}", model=name) from exc
    except Exception as exc:
        raise AuditError(f"--input: cannot read image {path!r}: {type(exc).__name__}: {exc}", model=name) from exc
    x = data.reshape(shape[1], shape[2], shape[0]).permute(2, 0, 1).to(torch.float64) / 255.0
    return x.reshape(1, *shape)


def client_gradient(model: torch.nn.Module, x: torch.Tensor, loss: str, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the client shares: dL/dparam (float64) of the summed loss on x with labels."""
    m = copy.deepcopy(model).to(torch.float64).eval()
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        out = m(x.to(torch.float64))
        grads = torch.autograd.grad(loss_value(loss, out, labels), [p for _, p in params], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(params, grads)}


# ----------------------------------------------------------------------------- metrics
def image_metrics(x: torch.Tensor, x_rec: torch.Tensor) -> dict[str, Any]:
    """Relative error, and MSE / PSNR after mapping the original's [min, max] to [0, 1] (peak 1.0)."""
    x = x.to(torch.float64)
    x_rec = x_rec.to(torch.float64)
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    mse = float((((x_rec - lo) / span - (x - lo) / span) ** 2).mean())
    return {
        "rel_error": float((x_rec - x).norm() / x.norm().clamp_min(1e-300)),
        "mse": mse,
        "psnr_db": (10.0 * math.log10(1.0 / mse)) if mse > 0 else None,
    }


def _best_of(rec: Reconstruction, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The reconstruction among the equally consistent ones that is closest to the truth (index 0: the chosen)."""
    if rec.input is None:
        return None, 0
    cands = [rec.input, *rec.alternatives]
    errs = [float((c - x).norm()) for c in cands]
    i = min(range(len(cands)), key=errs.__getitem__)
    return cands[i], i


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2g}"


# ----------------------------------------------------------------------------- the verdict sentence
def _judge(report: ModelReport, rec: Reconstruction, plain_err: float | None, proj_err: float | None) -> tuple[bool | None, str]:
    """Whether the measurements confirm the static verdict, and one plain sentence saying so."""
    v = report.verdict
    static_def = {r.node: r.deficit for r in report.layers if r.deficit}
    steps = {s.node: s for s in rec.layers}
    if rec.input is None:
        return None, "Not confirmed either way: the attack could not reach the input (" + "; ".join(rec.warnings[-1:]) + ")."
    best = min(e for e in (plain_err, proj_err) if e is not None)
    if v.input_recoverable is None:
        return None, f"The static analysis could not decide; closed-form R-GAP reached relative error {best:.2g}."
    if v.input_recoverable and not static_def:
        if plain_err is not None and plain_err <= EXACT:
            return True, f"Confirmed: the analysis predicts closed-form recovery and R-GAP recovered the input (relative error {plain_err:.2g})."
        if proj_err is not None and proj_err <= EXACT:
            lost = [s.node for s in rec.layers if s.nullity]
            return True, (
                f"Confirmed: the analysis predicts closed-form recovery and the projected variant recovered the input "
                f"(relative error {proj_err:.2g}); plain layer-wise R-GAP reached {_fmt(plain_err)} because, not knowing "
                f"the activation pattern the analysis assumes, it finds {', '.join(lost)} undetermined."
            )
        return False, f"Not confirmed: the analysis predicts closed-form recovery but R-GAP's relative error is {_fmt(best)}."
    if v.input_recoverable:
        idx = next((i for i, s in enumerate(rec.layers) if s.node in static_def), None)
        first = None if idx is None else rec.layers[idx]
        above_ok = idx is not None and all((s.rel_error or 0.0) <= EXACT for s in rec.layers[:idx])
        degraded = first is not None and (first.rel_error or 0.0) > EXACT
        nul = ", ".join(
            f"{n}: static {d}, measured {steps[n].nullity if n in steps else 'n/a'}" for n, d in static_def.items()
        )
        ok = degraded and above_ok and proj_err is not None and proj_err <= EXACT
        if ok:
            return True, (
                f"Confirmed: plain layer-wise R-GAP degrades at the deficient layer(s) ({nul}; relative error "
                f"{first.rel_error:.2g} at {first.node}'s input, {_fmt(plain_err)} at the input) and the projected "
                f"variant recovers the input (relative error {proj_err:.2g}), as the carried deficit of 0 predicts."
            )
        return False, (
            f"Not confirmed: the analysis predicts recovery through the deficient layer(s) ({nul}); measured relative "
            f"error {_fmt(plain_err)} (plain R-GAP) and {_fmt(proj_err)} (projected variant)."
        )
    if best > EXACT:
        return True, f"Confirmed: the analysis predicts the input is not recoverable in closed form; R-GAP's best relative error is {best:.2g}."
    return False, f"Not confirmed: the analysis predicts no closed-form recovery, yet R-GAP reached relative error {best:.2g}."


# ----------------------------------------------------------------------------- images
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def save_comparison(path: str, x: torch.Tensor, rows: list[tuple[str, torch.Tensor]]) -> str:
    """One PNG: per row original | reconstruction | rescaled reconstruction (pillow)."""
    from PIL import Image

    x = x.reshape(x.shape[-3:]).to(torch.float64)
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0

    def to_img(t: torch.Tensor, a: float, s: float) -> Image.Image:
        u8 = (((t.reshape(x.shape) - a) / s).clamp(0, 1) * 255).round().to(torch.uint8)
        c, h, w = u8.shape
        arr = u8.permute(1, 2, 0).contiguous().numpy()
        img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
        scale = max(1, 128 // max(h, w))
        return img.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)

    tiles = []
    for _, r in rows:
        r = r.to(torch.float64)
        rlo, rhi = float(r.min()), float(r.max())
        tiles.append([to_img(x, lo, span), to_img(r, lo, span), to_img(r, rlo, rhi - rlo if rhi > rlo else 1.0)])
    tw, th = tiles[0][0].size
    gap = 4
    canvas = Image.new("RGB", (3 * tw + 2 * gap, len(tiles) * th + (len(tiles) - 1) * gap), "white")
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            canvas.paste(t, (j * (tw + gap), i * (th + gap)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------- entry point
def verify(
    loaded: LoadedModel,
    options: AuditOptions,
    report: ModelReport,
    input: str | None = None,
    weights: str | None = None,
    save_images: str | None = None,
) -> dict:
    """Attack one loaded model with closed-form R-GAP and compare with report's static verdict.

    Returns a JSON-ready dict and also stores it in report.verification. Bad input (checkpoint that does
    not match, input of the wrong shape, NaN/Inf gradients, unsupported loss) raises AuditError.
    """
    name = loaded.name
    shape = tuple(options.input_shape or loaded.input_shape or tuple(report.input_shape or ()))
    if not shape:
        raise AuditError("--verify needs the model's input shape", model=name)
    batch = int(report.batch_size or options.batch_size or 1)
    model = copy.deepcopy(loaded.module).eval()
    if weights:
        _load_weights(model, weights, name)
    if batch > 1:
        result = {
            "attempted": False,
            "confirmed": None,
            "summary": (
                f"Not attempted: closed-form R-GAP recovers one sample; with a batch of {batch} the shared gradient "
                "mixes the samples and the static verdict is about that mixture."
            ),
        }
        report.verification = result
        return result
    gen = torch.Generator().manual_seed(int(options.seed))
    x = _load_input(input, shape, name) if input else torch.rand((1, *shape), generator=gen, dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise AuditError("--input contains NaN or Inf", model=name)
    with torch.no_grad():
        try:
            out = copy.deepcopy(model).to(torch.float64)(x)
        except Exception as exc:
            raise AuditError(f"--verify: the model fails on an input of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}", model=name) from exc
    out_features = out.reshape(1, -1).shape[1]
    try:
        loss = choose_loss(report.loss or options.loss or loaded.loss, out_features)
    except ValueError as exc:
        raise AuditError(f"--verify: {exc}", model=name) from exc
    labels = make_labels(loss, 1, out_features, gen)
    grads = client_gradient(model, x, loss, labels)
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    if bad:
        raise AuditError(f"--verify: the client's gradient has NaN or Inf in {', '.join(bad[:3])}", model=name)

    t0 = time.perf_counter()
    try:
        rec = reconstruct(model, grads, shape, loss, true_input=x)
    except AuditError as err:
        err.model = err.model or name
        raise
    wall = time.perf_counter() - t0

    plain_in, plain_idx = _best_of(rec, x)
    proj_in = None
    if rec.projected is not None:
        proj_in, _ = _best_of(rec.projected, x)
    m_plain = image_metrics(x, plain_in) if plain_in is not None else None
    m_proj = image_metrics(x, proj_in) if proj_in is not None else None
    confirmed, sentence = _judge(report, rec, m_plain and m_plain["rel_error"], m_proj and m_proj["rel_error"])
    if confirmed is False and any(s.rows_lost for s in rec.layers):
        sentence += (
            " The analysis takes ReLU activation patterns as known, as R-GAP does; this attack knows a pattern only "
            "once the layer above it is recovered, so zeros it cannot place are unknowns."
        )

    static = {r.node: r for r in report.layers}
    proj_steps = {s.node: s for s in rec.projected.layers} if rec.projected else {}
    layers = []
    for s in rec.layers:
        r = static.get(s.node)
        entry = {
            "node": s.node,
            "module_path": s.module_path,
            "op": s.op,
            "static_verdict": None if r is None else getattr(r.verdict, "value", r.verdict),
            "static_deficit": None if r is None else r.deficit,
            "measured_nullity": s.nullity,
            "rel_error": s.rel_error,
            "method": s.method,
            "residual_grad": s.residual_grad,
            "residual_fwd": s.residual_fwd,
            "rows_lost": s.rows_lost,
            "seconds": s.seconds,
        }
        p = proj_steps.get(s.node)
        if p is not None and rec.projected is not None:
            entry["rel_error_projected"] = p.rel_error
            entry["measured_nullity_projected"] = p.nullity
            entry["carried_in"] = p.carried_in
        layers.append(entry)

    best = m_proj if (m_proj and (m_plain is None or m_proj["rel_error"] < m_plain["rel_error"])) else m_plain
    truth_label = labels.tolist()[0]
    result: dict[str, Any] = {
        "attempted": True,
        "confirmed": confirmed,
        "summary": sentence,
        "input": input or f"seeded uniform [0,1) random input (seed {options.seed})",
        "weights": weights or "as constructed",
        "loss": loss,
        "rel_error": None if best is None else best["rel_error"],
        "mse": None if best is None else best["mse"],
        "psnr_db": None if best is None else best["psnr_db"],
        "scaling": "MSE and PSNR after mapping the original input's [min, max] to [0, 1]; PSNR peak 1.0",
        "seconds": wall,
        "label": truth_label,
        "label_recovered": rec.label,
        "label_status": rec.label_status,
        "variant": "projected" if best is m_proj and m_proj is not None else "plain",
        "plain": m_plain,
        "projected": m_proj,
        "ambiguous_inputs": 1 + len(rec.alternatives),
        "layers": layers,
        "warnings": list(rec.warnings) + ([f"projected variant: {w}" for w in rec.projected.warnings] if rec.projected else []),
    }
    if rec.alternatives:
        result["warnings"].append(
            f"the gradient admits {1 + len(rec.alternatives)} inputs; the errors are those of the one closest to the truth "
            f"({'the chosen' if plain_idx == 0 else 'an alternative'})"
        )
    if save_images:
        if len(shape) == 3 and shape[0] in (1, 3) and plain_in is not None:
            rows = [("plain", plain_in)] + ([("projected", proj_in)] if proj_in is not None else [])
            stem = os.path.splitext(os.path.basename(loaded.file or "model"))[0]
            path = os.path.join(save_images, f"{_safe(stem)}.{_safe(name)}.png")
            try:
                result["image"] = save_comparison(path, x, rows)
            except OSError as exc:
                raise AuditError(f"--save-images: cannot write {path!r}: {exc.strerror or exc}", model=name) from exc
        else:
            result["image"] = None
            result["warnings"].append("no image written: the input is not image-shaped (C in 1 or 3, H, W) or was not recovered")
    report.verification = result
    if confirmed is True:  # the static verdict now rests on a measured reconstruction too
        report.verdict.basis = Basis.VERIFIED
    return result
