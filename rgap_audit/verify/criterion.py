"""What --verify calls recovered, in two senses, both printed with every verification.

* **Within the conditioning** (is the attack right?). The attack solves one system per layer from the output
  down; an error in a layer's input reaches the layer below through the inverted ops between them (at most
  `link_gain` times, relative) and that layer's solve (at most `solve_gain` = 1 / sigma_min_rel times). Starting
  from one unit roundoff eps per solve, the first-order worst case at layer i is
  predicted_i = solve_gain_i * (link_gain_i * predicted_above + eps), and eps * solve_gain at the head. A layer is
  within the conditioning when its measured relative error is at most `factor` times that: a larger error is more
  than float64 rounding can explain, and the first such layer is where the error entered.
* **A privacy leak** (would a person recognise the input?): PSNR (peak 1, the input mapped to [0, 1]) or SSIM at or
  above the thresholds (default 30 dB or 0.9; `--leak-psnr`, `--leak-ssim`, `[tool.rgap-audit]`).

A layer whose own system is undetermined (nullity > 0) is not compared: its input is not determined by what the
attacker knows. Below it, plain R-GAP has no prediction; the projected variant solves only the determined part,
whose prediction carries on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rgap_audit.attack.engine import Reconstruction
from rgap_audit.records import Criterion, Metrics
from rgap_audit.tolerances import CONDITIONING_FACTOR, EPS, LEAK_PSNR_DB, LEAK_SSIM

INPUT = "the model input"


def make_criterion(leak_psnr_db: float | None = None, leak_ssim: float | None = None, factor: float | None = None) -> Criterion:
    """The criterion with the given thresholds (None: the defaults of rgap_audit.tolerances)."""
    psnr = LEAK_PSNR_DB if leak_psnr_db is None else float(leak_psnr_db)
    ssim = LEAK_SSIM if leak_ssim is None else float(leak_ssim)
    fac = CONDITIONING_FACTOR if factor is None else float(factor)
    rule = (
        f"recovered: relative error within {fac:g} x the float64 rounding (eps = {EPS:.3g} per solve) propagated through "
        "each layer's measured gains (1/sigma_min_rel of its solved system, the growth through the inverted ops above "
        f"it); a privacy leak: PSNR >= {psnr:g} dB (peak 1, input mapped to [0, 1]) or SSIM >= {ssim:g}"
    )
    return Criterion(eps=EPS, factor=fac, leak_psnr_db=psnr, leak_ssim=ssim, rule=rule)


def is_leak(m: Metrics | None, crit: Criterion) -> bool | None:
    """True when the reconstruction is a privacy leak by the criterion's PSNR or SSIM threshold; None: none."""
    if m is None:
        return None
    psnr_ok = m.psnr_db is None or m.psnr_db >= crit.leak_psnr_db  # MSE 0: a perfect copy
    return psnr_ok or (m.ssim is not None and m.ssim >= crit.leak_ssim)


@dataclass
class LayerCheck:
    """One weighted layer of a variant: its measured error next to the predicted one."""

    node: str
    measured: float | None
    predicted: float | None
    within: bool | None  # None: not compared (undetermined, no prediction or no truth)
    undetermined: bool


@dataclass
class Check:
    """A variant's layers and input against the conditioning."""

    layers: list[LayerCheck] = field(default_factory=list)
    input_measured: float | None = None
    input_predicted: float | None = None
    within: bool | None = None  # False: some error exceeded; None: something was not predicted
    entered_at: str | None = None  # the first node (or INPUT) whose error exceeded what the conditioning allows
    missing_at: str | None = None  # the first compared node without a prediction

    def allowed(self, crit: Criterion) -> float | None:
        """The error the conditioning allows at the model input."""
        return None if self.input_predicted is None else crit.factor * self.input_predicted

    def layer(self, node: str) -> LayerCheck | None:
        return next((c for c in self.layers if c.node == node), None)


def check(rec: Reconstruction, crit: Criterion, input_error: float | None = None, per_layer: bool = True) -> Check:
    """Predict each layer's error from the gains the attack measured and compare it with the measured one.

    input_error: the model input's measured error when it is not rec's own (an equally consistent alternative
    input was closer to the truth); per_layer=False then leaves the layers uncompared (their errors are the
    chosen input's, not the alternative's).
    """
    out = Check()
    pred: float | None = None
    through = rec.variant == "projected"
    eps = crit.eps
    for i, s in enumerate(rec.layers):
        if i == 0 or s.link_gain == 0:  # the head, or a solve that reads nothing from above (a bias leak)
            pred = None if s.solve_gain is None else eps * s.solve_gain
        elif pred is None or s.solve_gain is None or s.link_gain is None:
            pred = None
        else:
            pred = s.solve_gain * (s.link_gain * pred + eps)
        undetermined = bool(s.nullity)
        within = None
        if per_layer and not undetermined and pred is not None and s.rel_error is not None:
            within = s.rel_error <= crit.factor * pred
        if per_layer and not undetermined and pred is None and out.missing_at is None:
            out.missing_at = s.node
        if within is False and out.entered_at is None:
            out.entered_at = s.node
        out.layers.append(LayerCheck(s.node, s.rel_error, pred, within, undetermined))
        if undetermined and not through:
            pred = None
    if rec.input is not None and rec.layers:
        out.input_measured = rec.rel_error if input_error is None else input_error
        if pred is not None and rec.input_gain is not None:
            out.input_predicted = rec.input_gain * pred + eps
        elif out.missing_at is None:
            out.missing_at = INPUT
        exceeded = out.input_predicted is not None and out.input_measured is not None and out.input_measured > crit.factor * out.input_predicted
        if exceeded and out.entered_at is None:
            out.entered_at = INPUT
    compared = [c.within for c in out.layers if not c.undetermined] if per_layer else []
    if out.entered_at is not None:
        out.within = False
    elif out.missing_at is None and all(w is not None for w in compared):
        out.within = True
    return out
