"""`--verify`: attack a loaded model with closed-form R-GAP and compare with the static verdict.

For one model: draw a seeded random input (or read --input: a saved tensor or an image), use the
weights as constructed (or --weights, loaded with weights_only=True), compute the gradient a client
would share, reconstruct its input, and report per layer the relative error of the recovered layer
input next to the static verdict, then MSE / PSNR / relative error / wall time and one plain
sentence saying whether the static verdict was confirmed.

With a batch (B > 1) the attack runs as deployed: R-GAP does not know B and reconstructs one input from
the summed gradient of B seeded samples. The report measures that input against every sample (errors,
the nearest sample, the least-squares combination of the samples that fits it best), and, when the
model input reaches a Linear through reshapes only, the span leak: the rows of that layer's weight
gradient sum_n k_n x_n^T lie in span{x_n}.
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
from rgap_audit.errors import AttackUnsupported, AuditError
from rgap_audit.losses import choose_loss, loss_value, make_labels
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import Basis, ModelReport
from rgap_audit.span import IN_TOL as SPAN_IN_TOL
from rgap_audit.span import RTOL as SPAN_RTOL
from rgap_audit.span import RULE as SPAN_RULE
from rgap_audit.span import row_space
from rgap_audit.threads import single_thread

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
    obj = _load_tensor(path, name)
    if tuple(obj.shape) not in (shape, (1, *shape)):
        raise AuditError(f"--input: tensor of shape {tuple(obj.shape)}, the model takes {shape} (one sample)", model=name)
    return obj.detach().to(torch.float64).reshape(1, *shape)


def _load_tensor(path: str, name: str) -> torch.Tensor:
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
        return img.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)

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


def _write_image(
    directory: str, loaded: LoadedModel, suffix: str, x: torch.Tensor, rows: list, originals: list | None = None
) -> str:
    """save_comparison to DIR/<file stem>.<model><suffix>.png; an unwritable path is an AuditError."""
    stem = os.path.splitext(os.path.basename(loaded.file or "model"))[0]
    path = os.path.join(directory, f"{_safe(stem)}.{_safe(loaded.name)}{suffix}.png")
    try:
        return save_comparison(path, x, rows, originals=originals)
    except OSError as exc:
        raise AuditError(f"--save-images: cannot write {path!r}: {exc.strerror or exc}", model=loaded.name) from exc


def _client_instance(
    loaded: LoadedModel, options: AuditOptions, report: ModelReport, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator
) -> tuple[str, torch.Tensor, dict[str, torch.Tensor]]:
    """The loss, seeded labels (drawn from gen after x) and the client's gradient for the batch x.
    Bad input (NaN/Inf, a model that fails on x, an unsupported loss, a non-finite gradient): AuditError."""
    name = loaded.name
    if not torch.isfinite(x).all():
        raise AuditError("--input contains NaN or Inf", model=name)
    with torch.no_grad():
        try:
            out = copy.deepcopy(model).to(torch.float64)(x)
        except Exception as exc:
            raise AuditError(f"--verify: the model fails on an input of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}", model=name) from exc
    out_features = out.reshape(x.shape[0], -1).shape[1]
    try:
        loss = choose_loss(report.loss or options.loss or loaded.loss, out_features)
    except ValueError as exc:
        raise AuditError(f"--verify: {exc}", model=name) from exc
    labels = make_labels(loss, x.shape[0], out_features, gen)
    grads = client_gradient(model, x, loss, labels)
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    if bad:
        raise AuditError(f"--verify: the client's gradient has NaN or Inf in {', '.join(bad[:3])}", model=name)
    return loss, labels, grads


def _not_attempted(report: ModelReport, why: str) -> dict:
    """The attack does not handle this model: say so, keep the static report."""
    result = {"attempted": False, "confirmed": None, "summary": f"Not attempted: {why}."}
    report.verification = result
    return result


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
        return _verify_batch(loaded, options, report, model, shape, batch, input, weights, save_images)
    gen = torch.Generator().manual_seed(int(options.seed))
    x = _load_input(input, shape, name) if input else torch.rand((1, *shape), generator=gen, dtype=torch.float64)
    loss, labels, grads = _client_instance(loaded, options, report, model, x, gen)

    t0 = time.perf_counter()
    try:
        rec = reconstruct(model, grads, shape, loss, true_input=x)
    except AttackUnsupported as err:
        return _not_attempted(report, str(err.cause))
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
            result["image"] = _write_image(save_images, loaded, "", x, rows)
        else:
            result["image"] = None
            result["warnings"].append("no image written: the input is not image-shaped (C in 1 or 3, H, W) or was not recovered")
    report.verification = result
    if confirmed is True:  # the static verdict now rests on a measured reconstruction too
        report.verdict.basis = Basis.VERIFIED
    if best is not None and best["rel_error"] <= EXACT and report.verdict.input_recoverable is not True:
        _settle(report, best["rel_error"], result)
    return result


def _settle(report: ModelReport, rel_error: float, result: dict) -> None:
    """The attack recovered the input although the static verdict did not say so (undecided, or
    deficient): a demonstrated leak outranks the analysis. The model verdict becomes
    recoverable-verified (input_recoverable True, basis verified) and keeps the static summary."""
    v = report.verdict
    was = v.status
    v.summary = (
        f"the closed-form attack recovered the input of the seeded instance (relative error {rel_error:.2g}, --verify); "
        f"the static analysis alone said {was}: {v.summary}"
    )
    v.status, v.input_recoverable, v.basis = "recoverable-verified", True, Basis.VERIFIED
    result["settled"] = f"verdict {was} -> recoverable-verified: the attack recovered the input"


# ----------------------------------------------------------------------------- batches (B > 1)
COMBINATION_TOL = 1e-6  # relative residual up to which a reconstruction counts as a combination of the samples


def _load_batch_input(path: str, shape: tuple[int, ...], batch: int, name: str) -> torch.Tensor:
    """--input for a batch: a saved tensor of shape (B, *shape); an image is one sample and is refused."""
    want = (batch, *shape)
    if path.lower().endswith(IMAGE_SUFFIXES):
        raise AuditError(f"--input: an image is one sample; with --batch-size {batch} give a saved tensor of shape {want}", model=name)
    obj = _load_tensor(path, name)
    if tuple(obj.shape) != want:
        raise AuditError(f"--input: tensor of shape {tuple(obj.shape)}; with --batch-size {batch} the model takes {want}", model=name)
    return obj.detach().to(torch.float64)


def _candidates(rec: Reconstruction) -> list[tuple[str, torch.Tensor]]:
    """Every input the engine returned: plain, its equally consistent alternatives, the projected variant's."""
    out: list[tuple[str, torch.Tensor]] = []
    for tag, r in (("plain", rec), ("projected", rec.projected)):
        if r is None or r.input is None:
            continue
        out.append((tag, r.input))
        out.extend((f"{tag} alternative {i}", a) for i, a in enumerate(r.alternatives, 1))
    return out


def combination_fit(samples: torch.Tensor, x_rec: torch.Tensor) -> dict[str, Any]:
    """Least-squares c minimising ||x_rec - sum_n c_n x_n|| over the samples (B, *shape), and its relative residual.

    `fills_input_space` is True when the samples span every direction of the input (B >= entries): then any
    vector is a combination and a small residual says nothing.
    """
    X = samples.reshape(samples.shape[0], -1).to(torch.float64).T  # entries x B
    y = x_rec.reshape(-1).to(torch.float64)
    c = torch.linalg.lstsq(X, y.unsqueeze(1), driver="gelsd").solution[:, 0]  # minimum norm if samples are dependent
    res = float((X @ c - y).norm() / y.norm().clamp_min(1e-300)) if float(y.norm()) > 0 else None
    rank = int(torch.linalg.matrix_rank(X))
    return {"coefficients": c.tolist(), "residual_rel": res, "samples_rank": rank, "fills_input_space": rank >= X.shape[0]}


def _first_linear(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[dict[str, Any] | None, str | None]:
    """The Linear that reads the model input through reshapes/identities only: node, parameter name, layout.

    Returns (info, None) or (None, why not).
    """
    from rgap_audit import ops
    from rgap_audit.layergraph import build_layer_graph
    from rgap_audit.tracing import trace

    try:
        lg = build_layer_graph(trace(model, torch.zeros(1, *shape)))
    except Exception as exc:  # noqa: BLE001  (the engine traced it already; a failure only skips this measurement)
        return None, f"the model could not be traced for the span check ({type(exc).__name__})"
    node = lg.input_node
    while True:
        succ = list(lg.graph.successors(node))
        if len(succ) != 1:
            return None, f"the model input feeds {len(succ)} operations, not one chain into a Linear"
        node = succ[0]
        attrs = lg.node(node)
        info = attrs["info"]
        if info.kind in (ops.RESHAPE, ops.IDENTITY):
            continue
        if info.kind != ops.LAYER:
            return None, f"the model input reaches {node} ({info.name}) before any weighted layer"
        break
    spec = lg.conv_spec(node)
    if spec.ndim != 0:
        return None, (
            f"the first weighted layer {node} ({info.name}) is not a Linear: its weight gradient combines patches "
            "of the samples, not whole samples"
        )
    rows = math.prod(attrs["in_shape"]) // spec.n_in
    if rows != 1:
        return None, f"the first Linear {node} reads {rows} rows per sample: its gradient rows lie in the span of those rows"
    fxn = attrs["fx"]
    if attrs["module"] is not None:
        wname = f"{attrs['module_path']}.weight"
    else:
        args = list(fxn.args) + [None, None]
        w = fxn.kwargs.get("weight", args[1])
        wname = str(w.target) if getattr(w, "op", None) == "get_attr" else None
        if wname is None:
            return None, f"the first Linear {node}'s weight is not a parameter of the model"
    return {
        "node": node,
        "module_path": attrs["module_path"],
        "parameter": wname,
        "n_in": spec.n_in,
        "transposed": info.param_transposed,
    }, None


def span_leak(model: torch.nn.Module, grads: dict[str, torch.Tensor], samples: torch.Tensor) -> tuple[dict[str, Any] | None, str | None]:
    """Rank of the first Linear's weight gradient dL/dW = sum_n k_n x_n^T and each sample's distance to its row space.

    A classical fact, measured: the rows of dL/dW lie in span{x_n}, so the gradient reveals the subspace
    the batch spans. Returns (result, None), or (None, why it was skipped).
    """
    shape = tuple(samples.shape[1:])
    first, why = _first_linear(model, shape)
    if first is None:
        return None, why
    g = grads.get(first["parameter"])
    if g is None:
        return None, f"the first Linear {first['node']}'s weight is frozen: the client shares no gradient for it"
    G = g.detach().to(torch.float64)
    if first["transposed"] and G.dim() == 2:
        G = G.T  # x @ W: the parameter is (in, out)
    G = G.reshape(-1, first["n_in"])
    X = samples.reshape(samples.shape[0], -1).to(torch.float64)
    with single_thread():
        measured = row_space(G, X)
    rank, dist = measured.rank, measured.distances
    inside = measured.holds_every_sample
    B = X.shape[0]
    where = first["module_path"] or first["node"]
    if inside:
        sentence = (
            f"The weight gradient of {where}, the first layer, has numerical rank {rank} and every sample lies "
            f"within {max(dist):.1g} (relative) of its row space: the shared gradient reveals the subspace spanned by "
            f"the {B} samples" + (", exactly" if rank == B else "") + "."
        )
    else:
        sentence = (
            f"The weight gradient of {where}, the first layer, has numerical rank {rank}; the samples lie at relative "
            f"distance up to {max(dist):.2g} from its row space, so it does not reveal the span of the batch."
        )
    return {
        "layer": first["node"],
        "module_path": first["module_path"],
        "parameter": first["parameter"],
        "weight_gradient_shape": list(G.shape),
        "numerical_rank": rank,
        "rank_rtol": SPAN_RTOL,
        "rank_rule": SPAN_RULE,
        "singular_values_rel": measured.singular_values_rel[: B + 2],
        "distance_rel": dist,
        "in_row_space_tol": SPAN_IN_TOL,
        "all_in_row_space": inside,
        "summary": sentence,
    }, None


def _measured_outcome(per_sample: list[dict], nearest: int | None, comb: dict | None, reason: str | None) -> str:
    """What R-GAP recovered from the summed gradient, in one clause."""
    if nearest is None:
        return f"R-GAP produced no input from the summed gradient ({reason})"
    rec = [p for p in per_sample if p["recovered"]]
    near = per_sample[nearest]
    if rec:
        return "R-GAP recovered " + ", ".join(f"sample {p['sample']} (relative error {p['rel_error']:.2g})" for p in rec)
    if comb is not None and comb.get("combination"):
        coefs = ", ".join(f"{c:.3g}" for c in comb["coefficients"])
        return (
            f"R-GAP recovered a combination of the samples (coefficients {coefs}; relative residual "
            f"{comb['residual_rel']:.2g}), none of them individually (nearest: sample {nearest}, relative error "
            f"{near['rel_error']:.2g})"
        )
    if comb is not None and comb.get("fills_input_space"):
        return (
            f"R-GAP recovered no sample (nearest: sample {nearest}, relative error {near['rel_error']:.2g}); the "
            f"{len(per_sample)} samples span the whole input space, so being a combination of them says nothing"
        )
    res = "n/a" if comb is None or comb.get("residual_rel") is None else f"{comb['residual_rel']:.2g}"
    return (
        f"R-GAP recovered neither a sample nor a combination of them (nearest: sample {nearest}, relative error "
        f"{near['rel_error']:.2g}; least-squares combination residual {res})"
    )


def _judge_batch(report: ModelReport, batch: int, per_sample: list[dict], outcome: str, produced: bool) -> tuple[bool | None, str]:
    """Whether the batch experiment confirms the static verdict, and one plain sentence saying so."""
    v = report.verdict.input_recoverable
    recovered = [p for p in per_sample if p["recovered"]]
    if v is False:
        if recovered:
            return False, f"Not confirmed: the analysis predicts no closed-form recovery, yet {outcome} from the summed gradient of {batch} samples."
        if not produced:
            return None, f"Not confirmed either way: {outcome}; the analysis predicts no closed-form recovery."
        return True, (
            f"Confirmed: the analysis predicts no closed-form recovery, and from the summed gradient of {batch} samples "
            f"{outcome}."
        )
    said = "could not decide" if v is None else "predicts recovery"
    return None, (
        f"Not a confirmation either way: the analysis {said}, but R-GAP on a summed gradient returns one input, so it "
        f"cannot confirm recovery of {batch} samples; {outcome}."
    )


def _verify_batch(
    loaded: LoadedModel,
    options: AuditOptions,
    report: ModelReport,
    model: torch.nn.Module,
    shape: tuple[int, ...],
    batch: int,
    input: str | None,
    weights: str | None,
    save_images: str | None,
) -> dict:
    """verify() for B > 1: R-GAP as deployed (it does not know B) on the summed gradient of B samples."""
    name = loaded.name
    gen = torch.Generator().manual_seed(int(options.seed))
    x = _load_batch_input(input, shape, batch, name) if input else torch.rand((batch, *shape), generator=gen, dtype=torch.float64)
    loss, labels, grads = _client_instance(loaded, options, report, model, x, gen)

    warnings: list[str] = []
    rec: Reconstruction | None = None
    status, reason = "reconstructed", None
    t0 = time.perf_counter()
    try:
        rec = reconstruct(model, grads, shape, loss)
    except AttackUnsupported as err:
        return _not_attempted(report, str(err.cause))
    except AuditError as err:
        # the heads' consistency checks (ValueError, re-raised as "head <node>: ...") fail on gradients that no
        # single sample produces: a measured outcome of the batch. Everything else is about the model: re-raise.
        if not (isinstance(err.__cause__, ValueError) and str(err.cause).startswith("head ")):
            err.model = err.model or name
            raise
        status, reason = "refused", str(err.cause)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  (any engine crash on a summed gradient is the outcome reported)
        if options.debug:  # --debug: the traceback, not a recorded outcome
            raise
        # the engine is written for one sample's gradient; a crash on a summed one is reported, not hidden
        status, reason = "engine-error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        warnings.append(
            f"the reconstruction engine raised {type(exc).__name__} on the summed gradient: a defect of the engine on a "
            "gradient no single sample produces, recorded here as the attack's outcome"
        )
    wall = time.perf_counter() - t0
    if status in ("refused", "engine-error") and loss == "cross-entropy":
        # what the head sees, computed here from the outputs: R-GAP reads the label as the ONE negative entry
        with torch.no_grad():
            out = copy.deepcopy(model).to(torch.float64)(x).reshape(batch, -1)
        k = torch.softmax(out, dim=1) - torch.nn.functional.one_hot(labels, out.shape[1]).to(torch.float64)
        neg = int((k.sum(0) < 0).sum())
        if neg != 1:
            why = (
                f"the summed output gradient dL/dz has {neg} negative entries, so the label R-GAP reads from it "
                "(the one negative entry, for one sample) is undefined"
            )
            reason = f"{reason} ({why})" if status == "refused" else f"{why}; the engine then stopped with {reason}"
    if rec is not None:
        warnings.extend(rec.warnings)
        if rec.projected is not None:
            warnings.extend(f"projected variant: {w}" for w in rec.projected.warnings)
    cands = _candidates(rec) if rec is not None else []
    if rec is not None and not cands:
        status, reason = "no-input", "; ".join(rec.warnings[-1:]) or "the walk did not reach the input"
    per_sample: list[dict[str, Any]] = []
    nearest_rec: list[torch.Tensor] = []
    for n in range(batch):
        xn = x[n : n + 1]
        if not cands:
            per_sample.append({"sample": n, "label": labels[n].item(), "rel_error": None, "mse": None, "psnr_db": None,
                               "candidate": None, "recovered": False})
            continue
        errs = [float((c.reshape(xn.shape) - xn).norm()) for _, c in cands]
        i = min(range(len(cands)), key=errs.__getitem__)
        m = image_metrics(xn, cands[i][1].reshape(xn.shape))
        nearest_rec.append(cands[i][1])
        per_sample.append({"sample": n, "label": labels[n].item(), **m, "candidate": cands[i][0], "recovered": m["rel_error"] <= EXACT})
    nearest = None if not cands else min(range(batch), key=lambda n: per_sample[n]["rel_error"])

    comb: dict[str, Any] | None = None
    if cands:
        with single_thread():
            fits = [(combination_fit(x, c), tag) for tag, c in cands]
        # the candidate best explained by the samples (an all-zero reconstruction has no residual: ranked last)
        fit, tag = min(fits, key=lambda ft: math.inf if ft[0]["residual_rel"] is None else ft[0]["residual_rel"])
        fit["candidate"] = tag
        fit["tolerance"] = COMBINATION_TOL
        fit["combination"] = (
            fit["residual_rel"] is not None and fit["residual_rel"] <= COMBINATION_TOL and not fit["fills_input_space"]
        )
        if fit["fills_input_space"]:
            warnings.append(
                f"the {batch} samples span all {math.prod(shape)} input directions: every vector is a combination of "
                "them, so the combination fit says nothing"
            )
        comb = fit

    leak, leak_why = span_leak(model, grads, x)
    outcome = _measured_outcome(per_sample, nearest, comb, reason)
    confirmed, sentence = _judge_batch(report, batch, per_sample, outcome, bool(cands))
    best = per_sample[nearest] if nearest is not None else None
    result: dict[str, Any] = {
        "attempted": True,
        "confirmed": confirmed,
        "summary": sentence,
        "batch_size": batch,
        "input": input or f"{batch} seeded uniform [0,1) random inputs (seed {options.seed})",
        "weights": weights or "as constructed",
        "loss": loss,
        "attack": "closed-form R-GAP on the summed gradient, unaware of the batch size (as deployed)",
        "outcome": status,
        "reason": reason,
        "rel_error": None if best is None else best["rel_error"],
        "mse": None if best is None else best["mse"],
        "psnr_db": None if best is None else best["psnr_db"],
        "scaling": (
            "per sample: MSE and PSNR after mapping that sample's [min, max] to [0, 1], PSNR peak 1.0; the top-level "
            "rel_error / mse / psnr_db are those of the nearest sample"
        ),
        "seconds": wall,
        "labels": labels.tolist(),
        "label_recovered": None if rec is None else rec.label,
        "label_status": None if rec is None else rec.label_status,
        "candidates": len(cands),
        "per_sample": per_sample,
        "nearest_sample": nearest,
        "combination": comb,
        "span_leak": leak,
        "span_leak_reason": leak_why,
        "attack_layers": [
            {"node": s.node, "op": s.op, "method": s.method, "measured_nullity": s.nullity,
             "residual_grad": s.residual_grad, "residual_fwd": s.residual_fwd}
            for s in (rec.layers if rec is not None else [])
        ],
        "warnings": warnings,
    }
    if save_images:
        if len(shape) == 3 and shape[0] in (1, 3) and nearest_rec:
            rows = [(f"sample {n}", r) for n, r in enumerate(nearest_rec)]
            result["image"] = _write_image(save_images, loaded, f".batch{batch}", x[0], rows, originals=list(x))
        else:
            result["image"] = None
            result["warnings"].append("no image written: the input is not image-shaped (C in 1 or 3, H, W) or no input was reconstructed")
    report.verification = result
    if confirmed is True:
        report.verdict.basis = Basis.VERIFIED
    return result
