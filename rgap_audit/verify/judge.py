"""B = 1: whether one run of the attack confirms the static verdict, and one plain sentence saying so.

"Confirmed" for a verdict that predicts recovery means the input came back as a privacy leak (PSNR / SSIM at the
criterion's thresholds); the error against what the conditioning allows says whether a loss of accuracy is
expected (conditioning) or a failure, and where it entered. "Not confirmed" is kept for reconstructions that are
wrong: no leak, with the layer where the error exceeded what float64 rounding explains.
"""

from __future__ import annotations

from dataclasses import dataclass

from rgap_audit.attack.engine import Reconstruction
from rgap_audit.records import Criterion, Metrics, ModelReport, ModelStatus
from rgap_audit.verify.criterion import INPUT, Check, is_leak
from rgap_audit.verify.metrics import fmt


@dataclass
class Judgement:
    confirmed: bool | None
    sentence: str
    check: Check | None  # of the variant the top-level numbers describe
    leak: bool | None


def units(m: Metrics | None) -> str:
    """PSNR and SSIM, in the reader's units."""
    if m is None:
        return "nothing reconstructed"
    psnr = "PSNR inf dB (exact copy)" if m.psnr_db is None else f"PSNR {m.psnr_db:.1f} dB"
    return psnr + ("" if m.ssim is None else f", SSIM {m.ssim:.3f}")


def leak_words(m: Metrics | None, crit: Criterion) -> str:
    """'a privacy leak' or 'no leak', with the thresholds."""
    thresholds = f"PSNR >= {crit.leak_psnr_db:g} dB or SSIM >= {crit.leak_ssim:g}"
    return ("a privacy leak" if is_leak(m, crit) else "no leak") + f" by the threshold {thresholds}"


def where(rec: Reconstruction, chk: Check, crit: Criterion) -> str:
    """The layer where the error entered, with its measured and allowed error."""
    node = chk.entered_at
    if node == INPUT:
        allowed = chk.allowed(crit)
        return f"{INPUT} (relative error {fmt(chk.input_measured)} where the conditioning allows at most {fmt(allowed)})"
    c = chk.layer(node or "")
    step = next((s for s in rec.layers if s.node == node), None)
    name = node if step is None or not step.module_path else f"{node} ({step.module_path})"
    if c is None or c.predicted is None:
        return str(name)
    return f"{name}: relative error {fmt(c.measured)} of its input where the conditioning allows at most {fmt(crit.factor * c.predicted)}"


def _conditioning_clause(rec: Reconstruction, chk: Check | None, crit: Criterion) -> str:
    if chk is None:
        return ""
    if chk.within is True:
        return f", within the {fmt(chk.allowed(crit))} the measured conditioning allows"
    if chk.within is False:
        return f"; its error exceeds what the conditioning allows from {where(rec, chk, crit)}: accuracy was lost there beyond float64 rounding"
    return f"; the conditioning was not measured from {chk.missing_at} on"


def judge(
    report: ModelReport,
    rec: Reconstruction,
    m_plain: Metrics | None,
    m_proj: Metrics | None,
    c_plain: Check,
    c_proj: Check | None,
    crit: Criterion,
) -> Judgement:
    """Confirmed / not confirmed / neither, for the static verdict of `report`, from one run of the attack."""
    v = report.verdict
    static_def = {r.node: r.deficit for r in report.layers if r.deficit and not r.in_segment}  # a joint segment decides for its layers
    steps = {s.node: s for s in rec.layers}
    if rec.input is None or (m_plain is None and m_proj is None):
        return Judgement(None, "Not confirmed either way: the attack could not reach the input (" + "; ".join(rec.warnings[-1:]) + ").", None, None)
    use_proj = m_proj is not None and (m_plain is None or m_proj.rel_error < m_plain.rel_error)
    best, best_chk = (m_proj, c_proj) if use_proj else (m_plain, c_plain)
    assert best is not None
    leak_best = is_leak(best, crit)
    said = f"relative error {best.rel_error:.2g}, {units(best)}"
    given = rec.patterns_given()
    if given and v.input_recoverable is None and not static_def:
        segs = ", ".join(given)
        if v.status != ModelStatus.RECOVERABLE_GIVEN_PATTERN:  # bounds only: the analysis predicted nothing to confirm
            return Judgement(
                None,
                f"The static analysis could not decide; solved at the true input's activation patterns, the joint system(s) of "
                f"{segs} and the layers below reached {said}: {leak_words(best, crit)}.",
                best_chk,
                leak_best,
            )
        if leak_best:
            return Judgement(
                True,
                f"Confirmed given the activation patterns: solved at the true input's patterns (the analysis' assumption), the "
                f"joint system(s) of {segs} and the layers below recovered the input ({said}{_conditioning_clause(rec, best_chk, crit)}); "
                "whether an attacker finds those patterns from the gradient alone is not shown (see the segment's notes).",
                best_chk,
                True,
            )
        return Judgement(
            False,
            f"Not confirmed: solved at the true input's activation patterns, the joint system(s) of {segs} did not bring the "
            f"input back ({said}: {leak_words(best, crit)}"
            + ("" if best_chk is None or best_chk.entered_at is None else f"; the error entered at {where(rec, best_chk, crit)}")
            + ")",
            best_chk,
            leak_best,
        )
    if v.input_recoverable is None:
        return Judgement(
            None, f"The static analysis could not decide; closed-form R-GAP reached {said}: {leak_words(best, crit)}.", best_chk, leak_best
        )
    if v.input_recoverable is False:
        if leak_best:
            return Judgement(
                False,
                f"Not confirmed: the analysis predicts no closed-form recovery, yet R-GAP's reconstruction is {leak_words(best, crit)} ({said}).",
                best_chk,
                True,
            )
        return Judgement(
            True,
            f"Confirmed: the analysis predicts the input is not recoverable in closed form; R-GAP's best reconstruction is "
            f"{leak_words(best, crit)} ({said}).",
            best_chk,
            False,
        )
    if not static_def:
        return _layerwise(rec, m_plain, m_proj, c_plain, c_proj, best, best_chk, crit)
    # recoverable through deficient layers: plain R-GAP degrades there, the projected variant recovers
    idx = next((i for i, s in enumerate(rec.layers) if s.node in static_def), None)
    first = None if idx is None else rec.layers[idx]
    above_ok = idx is not None and all(c.within is not False for c in c_plain.layers[:idx])
    degraded = first is not None and (bool(first.nullity) or not is_leak(m_plain, crit))
    nul = ", ".join(f"{n}: static {d}, measured {steps[n].nullity if n in steps else 'n/a'}" for n, d in static_def.items())
    if degraded and above_ok and first is not None and m_proj is not None and is_leak(m_proj, crit):
        return Judgement(
            True,
            f"Confirmed: plain layer-wise R-GAP degrades at the deficient layer(s) ({nul}; relative error "
            f"{fmt(first.rel_error)} at {first.node}'s input, {fmt(None if m_plain is None else m_plain.rel_error)} at the "
            f"input) and the projected variant recovers the input (relative error {m_proj.rel_error:.2g}, {units(m_proj)}"
            f"{_conditioning_clause(rec.projected or rec, c_proj, crit)}), as the carried deficit of 0 predicts.",
            c_proj,
            True,
        )
    blame = ""
    if not above_ok:
        blame = f"; above the deficient layer, the error entered at {where(rec, c_plain, crit)}"
    elif c_proj is not None and c_proj.entered_at is not None and rec.projected is not None:
        blame = f"; the projected variant's error entered at {where(rec.projected, c_proj, crit)}"
    return Judgement(
        False,
        f"Not confirmed: the analysis predicts recovery through the deficient layer(s) ({nul}); measured relative error "
        f"{fmt(None if m_plain is None else m_plain.rel_error)} (plain R-GAP) and "
        f"{fmt(None if m_proj is None else m_proj.rel_error)} (projected variant), {units(best)}: "
        f"{leak_words(best, crit)}{blame}.",
        best_chk,
        leak_best,
    )


def _layerwise(
    rec: Reconstruction,
    m_plain: Metrics | None,
    m_proj: Metrics | None,
    c_plain: Check,
    c_proj: Check | None,
    best: Metrics,
    best_chk: Check | None,
    crit: Criterion,
) -> Judgement:
    """A verdict that predicts layer-wise recovery (every layer full rank)."""
    if m_plain is not None and is_leak(m_plain, crit):
        return Judgement(
            True,
            f"Confirmed: the analysis predicts closed-form recovery and R-GAP recovered the input (relative error "
            f"{m_plain.rel_error:.2g}, {units(m_plain)}{_conditioning_clause(rec, c_plain, crit)}).",
            c_plain,
            True,
        )
    if m_proj is not None and rec.projected is not None and is_leak(m_proj, crit):
        lost = [s.node for s in rec.layers if s.nullity]
        return Judgement(
            True,
            f"Confirmed: the analysis predicts closed-form recovery and the projected variant recovered the input "
            f"(relative error {m_proj.rel_error:.2g}, {units(m_proj)}{_conditioning_clause(rec.projected, c_proj, crit)}); "
            f"plain layer-wise R-GAP reached {fmt(None if m_plain is None else m_plain.rel_error)} because, not knowing the "
            f"activation pattern the analysis assumes, it finds {', '.join(lost)} undetermined.",
            c_proj,
            True,
        )
    said = f"relative error {best.rel_error:.2g}, {units(best)}: {leak_words(best, crit)}"
    variant = rec.projected if best is m_proj and rec.projected is not None else rec
    if best_chk is not None and best_chk.within is True:
        return Judgement(
            None,
            f"Not confirmed either way: the analysis predicts closed-form recovery and every layer's error is within what "
            f"the measured conditioning allows (up to {fmt(best_chk.allowed(crit))} at the input), but the systems are too "
            f"ill-conditioned for float64 to bring this input back ({said}).",
            best_chk,
            False,
        )
    if best_chk is not None and best_chk.within is False:
        return Judgement(
            False,
            f"Not confirmed: the analysis predicts closed-form recovery but R-GAP's reconstruction is wrong ({said}); the "
            f"error entered at {where(variant, best_chk, crit)}.",
            best_chk,
            False,
        )
    missing = None if best_chk is None else best_chk.missing_at
    return Judgement(
        False,
        f"Not confirmed: the analysis predicts closed-form recovery but R-GAP's reconstruction is wrong ({said}); the "
        f"conditioning was not measured from {missing} on, so where the error entered is not known.",
        best_chk,
        False,
    )
