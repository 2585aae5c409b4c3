"""The report's figures, drawn with matplotlib from the JSON form of a report (plain dicts).

    reconstruction_figure(panels, title)  original | reconstruction | rescaled | |difference|, one row per panel
    rank_figure(model)                     rank of [K; F] against unknowns per weighted layer, the deficit marked
    error_figure(model)                    --verify's per-layer relative error (log axis) next to the static verdict
    spectrum_figure(identifiability)       singular values of d(gradient)/d(input), the rank threshold drawn
    noise_figure(defences.noise)           --defences: the attack's error against sigma, measured and predicted

Each has a `*_png` twin returning the PNG bytes (None where the figure has nothing to show).

matplotlib is an optional extra (`pip install 'rgap-audit[report]'`): it is imported here only, when a
figure is asked for, and a missing install is a `MissingExtra` (an AuditError: one line, exit 2). The
object-oriented API (`matplotlib.figure.Figure`) is used, never pyplot: no global state, no GUI backend.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from rgap_audit.errors import AuditError

DPI = 100
VERDICT_COLORS = {
    "leaks-exactly": "#b2182b",
    "recoverable": "#d6604d",
    "deficient": "#2166ac",
    "passes": "#7f7f7f",
    "chain-broken": "#8c6d31",
    "not-understood": "#6a3d9a",
}
RANK_COLOR, DEFICIT_COLOR, UNKNOWN_COLOR = "#4575b4", "#d73027", "#d9d9d9"
TILE_TITLES = {"original": "original", "reconstruction": "reconstruction", "rescaled": "rescaled", "difference": "|difference|"}


class MissingExtra(AuditError):
    """A figure was asked for but matplotlib is not installed."""


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtra("figures need matplotlib, which is not installed: pip install 'rgap-audit[report]'") from exc
    return Figure


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def layer_name(row: dict[str, Any]) -> str:
    return str(row.get("module_path") or row.get("node") or "?")


def _sig(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _tilted(labels: list[str]) -> bool:
    """Tick labels too long to stand side by side (about 9 characters per slot at this figure width)."""
    longest = max((len(line) for t in labels for line in t.split("\n")), default=0)
    return len(labels) > 12 or longest * len(labels) > 9 * max(len(labels), 7)


# ----------------------------------------------------------------------------- reconstruction panels
def _tile_array(tile: dict[str, Any]) -> Any:
    from matplotlib.image import imread

    return imread(io.BytesIO(base64.b64decode(tile["png"])), format="png")


def _tile_title(tile: dict[str, Any]) -> str:
    kind = tile["kind"]
    lo, hi = tile["lo"], tile["hi"]
    if kind == "original":
        return f"original\nrange [{lo:.3g}, {hi:.3g}]"
    if kind == "reconstruction":
        return "reconstruction\non the original's range"
    if kind == "rescaled":
        return f"rescaled reconstruction\nown range [{lo:.3g}, {hi:.3g}]"
    if kind == "difference":
        return f"|difference|, largest\nover channels: 0 .. {hi:.2g}"
    return str(kind)


def reconstruction_figure(panels: list[dict[str, Any]], title: str) -> Any:
    """One row per panel: its tiles side by side, each titled with what it shows and its value range; the
    row's title gives the relative error and PSNR of that reconstruction."""
    Figure = _figure_class()
    if not panels:
        raise ValueError("reconstruction_png: no panels")
    cols = max(len(p["tiles"]) for p in panels)
    fig = Figure(figsize=(2.5 * cols, 3.0 * len(panels) + 0.5), layout="constrained")
    fig.suptitle(title, fontsize=12, fontweight="bold")
    rows = fig.subfigures(len(panels), 1, squeeze=False)[:, 0]
    for sub, p in zip(rows, panels):
        psnr = "n/a (exact)" if p.get("psnr_db") is None and p.get("rel_error") == 0 else (
            "n/a" if p.get("psnr_db") is None else f"{p['psnr_db']:.1f} dB"
        )
        sub.suptitle(f"{p['label']}: relative error {_sig(p.get('rel_error'))}, PSNR {psnr}", fontsize=10)
        axes = sub.subplots(1, cols, squeeze=False)[0]
        for ax, t in zip(axes, p["tiles"]):
            img = _tile_array(t)
            cmap = "magma" if t["kind"] == "difference" else "gray"
            ax.imshow(img, cmap=cmap if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(_tile_title(t), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[len(p["tiles"]):]:
            ax.set_axis_off()
    return fig


# ----------------------------------------------------------------------------- per-layer ranks
def weighted_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows with unknowns (weighted layers, and any future row kind that has them), input first."""
    return [r for r in reversed(model.get("layers") or []) if r.get("unknowns") is not None]


def rank_figure(model: dict[str, Any]) -> Any | None:
    """Bars per layer: unknowns (grey), the rank of [K; F] (blue; a bounded rank as a hatched range), the
    deficit from the rank up to the unknowns (red, labelled), rank K as a black tick; None without layers."""
    rows = weighted_rows(model)
    if not rows:
        return None
    Figure = _figure_class()
    n = len(rows)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.6 * n + 2.5)), 4.6 if n > 8 else 4.2), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(n))
    unknowns = [r["unknowns"] for r in rows]
    ax.bar(xs, unknowns, width=0.7, color=UNKNOWN_COLOR, edgecolor="#555555", label="unknowns")
    labelled = {"rank": False, "bounds": False, "deficit": False, "rank K": False}
    for i, r in enumerate(rows):
        rank, lo, hi = r.get("rank"), r.get("rank_lower"), r.get("rank_upper")
        if rank is not None:
            ax.bar(i, rank, width=0.5, color=RANK_COLOR, label=None if labelled["rank"] else "rank [K; F]")
            labelled["rank"] = True
            top = rank
        elif lo is not None or hi is not None:
            lo = lo or 0
            hi = r["unknowns"] if hi is None else hi
            ax.bar(i, lo, width=0.5, color=RANK_COLOR, label=None if labelled["rank"] else "rank [K; F]")
            ax.bar(i, hi - lo, bottom=lo, width=0.5, color="white", edgecolor=RANK_COLOR, hatch="//",
                   label=None if labelled["bounds"] else "rank bounds")
            labelled["rank"] = labelled["bounds"] = True
            top = hi
        else:
            top = None
        deficit = r.get("deficit")
        if top is not None and deficit:
            ax.bar(i, deficit, bottom=r["unknowns"] - deficit, width=0.5, color=DEFICIT_COLOR,
                   label=None if labelled["deficit"] else "deficit")
            labelled["deficit"] = True
            ax.annotate(f"deficit {deficit}", (i, r["unknowns"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, color=DEFICIT_COLOR, fontweight="bold")
        rk = r.get("rank_grad") if r.get("rank_grad") is not None else r.get("rank_grad_counting")
        if rk is not None:
            ax.plot([i - 0.35, i + 0.35], [rk, rk], color="black", linewidth=2, label=None if labelled["rank K"] else "rank K (gradient only)")
            labelled["rank K"] = True
    positive = [u for u in unknowns if u > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    names = [f"{layer_name(r)}\n{r.get('op', '')}" for r in rows]
    tilt = _tilted(names)
    ax.set_xticks(xs, names, fontsize=8, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("input directions of the layer")
    ax.set_xlabel("weighted layers, model input at the left")
    ax.set_title(f"{model.get('model', '')}: rank of [K; F] against unknowns per layer", fontsize=11)
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    return fig


# ----------------------------------------------------------------------------- --verify per layer
def error_figure(model: dict[str, Any]) -> Any | None:
    """The attack's relative error at each layer's input (plain R-GAP and the projected variant, log axis),
    each layer labelled with the static verdict (colour) and its deficit; the exactness tolerance drawn.
    None when no layer has a measured error (a batch: no per-layer truth)."""
    ver = model.get("verification") or {}
    layers = [m for m in reversed(ver.get("layers") or []) if m.get("rel_error") is not None or m.get("rel_error_projected") is not None]
    if not layers:
        return None
    Figure = _figure_class()
    floor = 1e-17
    n = len(layers)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.6 * n + 2.5)), 4.6 if n > 8 else 4.2), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(n))
    for key, marker, label, color in (("rel_error", "o", "plain R-GAP", "#1b7837"), ("rel_error_projected", "s", "projected variant", "#762a83")):
        pts = [(i, max(m[key], floor)) for i, m in enumerate(layers) if m.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-", color=color, label=label,
                    markersize=7, fillstyle="none" if marker == "s" else "full")
    tol = ver.get("tolerance")
    if tol:
        ax.axhline(tol, color="black", linestyle="--", linewidth=1, label=f"exact recovery (tolerance {tol:.0e})")
    ax.set_yscale("log")
    labels = []
    for m in layers:
        verdict = m.get("static_verdict") or "n/a"
        deficit = m.get("static_deficit")
        labels.append(f"{layer_name(m)}\n{verdict}" + (f"\ndeficit {deficit}" if deficit else ""))
    tilt = _tilted(labels)
    ax.set_xticks(xs, labels, fontsize=8, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    for tick, m in zip(ax.get_xticklabels(), layers):
        tick.set_color(VERDICT_COLORS.get(m.get("static_verdict") or "", "black"))
    ax.set_ylabel("relative error of the layer input")
    ax.set_xlabel("weighted layers, model input at the left; label: static verdict")
    ax.set_title(f"{model.get('model', '')}: --verify, measured error per layer", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if any(m.get(k) is not None and m[k] < floor for m in layers for k in ("rel_error", "rel_error_projected")):
        ax.text(0.99, 0.02, f"errors below {floor:.0e} drawn at it", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    return fig


# ----------------------------------------------------------------------------- identifiability
def spectrum_figure(ident: dict[str, Any], name: str = "") -> Any | None:
    """sigma_i / sigma_max against i on a log axis, the rank threshold as a horizontal line, the rank as a
    vertical one; None when there are no singular values."""
    sv = [float(s) for s in ident.get("singular_values") or []]
    if not sv or sv[0] <= 0:
        return None
    Figure = _figure_class()
    tol = float(ident.get("rank_tol") or 0.0)
    floor = min(tol / 100.0 if tol > 0 else 1e-20, min((s / sv[0] for s in sv if s > 0), default=1.0) / 10.0)
    rel = [max(s / sv[0], floor) for s in sv]
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    idx = list(range(1, len(sv) + 1))
    ax.plot(idx, rel, color=RANK_COLOR, linewidth=1.5, marker="." if len(sv) <= 64 else None, label="σ_i / σ_max")
    if tol > 0:
        ax.axhline(tol, color=DEFICIT_COLOR, linestyle="--", linewidth=1.2, label=f"rank threshold {tol:.1e}")
    rank, unknowns = ident.get("rank"), ident.get("unknowns")
    if rank:
        ax.axvline(rank, color="black", linestyle=":", linewidth=1, label=f"rank {rank} of {unknowns}")
    ax.set_yscale("log")
    ax.set_xlim(0.5, len(sv) + 0.5)
    ax.set_xlabel("index i of the singular value (descending)")
    ax.set_ylabel("σ_i / σ_max")
    ax.set_title(f"{name + ': ' if name else ''}singular values of d(gradient)/d(input) ({ident.get('method', '')})", fontsize=11)
    ax.legend(fontsize=8, loc="lower left")
    if any(s / sv[0] < floor for s in sv):
        ax.text(0.99, 0.02, f"zeros drawn at {floor:.0e}", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    return fig


def noise_figure(noise: dict[str, Any], name: str = "") -> Any | None:
    """--defences: the attack's relative error against the noise multiplier sigma (log-log): the median over noise
    draws with their range, the first-order prediction, the worst-case bound, the threshold and the sigma found;
    None when nothing was measured."""
    points = [p for p in noise.get("points") or [] if p.get("sigma")]
    if not points:
        return None
    Figure = _figure_class()
    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    sig = [float(p["sigma"]) for p in points]

    def finite(vals: list[Any]) -> list[float]:
        return [float(v) for v in vals if v is not None]

    med = [p.get("median_rel_error") for p in points]
    lo = [min(finite(p.get("rel_errors") or []), default=float("nan")) for p in points]
    hi = [max(finite(p.get("rel_errors") or []), default=float("nan")) for p in points]
    ax.fill_between(sig, lo, hi, color=RANK_COLOR, alpha=0.2, label="measured: range over noise draws")
    ax.plot(sig, [float("nan") if m is None else m for m in med], color=RANK_COLOR, marker="o", label="measured: median")
    pred = [p.get("predicted_rel_error") for p in points]
    if any(v is not None for v in pred):
        ax.plot(sig, [float("nan") if v is None else v for v in pred], color="black", linestyle="--",
                label="predicted (first order, per-layer probes)")
    bound = [p.get("bound_rel_error") for p in points]
    if any(v is not None for v in bound):
        ax.plot(sig, [float("nan") if v is None else v for v in bound], color="#7f7f7f", linestyle=":",
                label="worst case from the gains")
    thr = noise.get("threshold")
    if thr:
        ax.axhline(float(thr), color=DEFICIT_COLOR, linewidth=1.2, label=f"threshold {thr:g}")
    stop = noise.get("sigma_stop")
    if stop:
        ax.axvline(float(stop), color=DEFICIT_COLOR, linestyle="--", linewidth=1, label=f"σ that stops it: {stop:.2g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise multiplier σ (noise std σ · C, C = clip norm)")
    ax.set_ylabel("relative error |x' − x| / |x|")
    ax.set_title(f"{name + ': ' if name else ''}R-GAP against DP-SGD noise", fontsize=11)
    ax.legend(fontsize=7, loc="upper left")
    return fig


# ----------------------------------------------------------------------------- as PNG bytes
def _png_or_none(fig: Any | None) -> bytes | None:
    return None if fig is None else _png(fig)


def reconstruction_png(panels: list[dict[str, Any]], title: str) -> bytes:
    return _png(reconstruction_figure(panels, title))


def rank_png(model: dict[str, Any]) -> bytes | None:
    return _png_or_none(rank_figure(model))


def error_png(model: dict[str, Any]) -> bytes | None:
    return _png_or_none(error_figure(model))


def spectrum_png(ident: dict[str, Any], name: str = "") -> bytes | None:
    return _png_or_none(spectrum_figure(ident, name))


def noise_png(noise: dict[str, Any], name: str = "") -> bytes | None:
    return _png_or_none(noise_figure(noise, name))
