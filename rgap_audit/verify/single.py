"""--verify with one sample: R-GAP on the client's gradient, per-layer errors next to the static rows,
and one sentence saying whether the measurement confirms the static verdict."""

from __future__ import annotations

import time

from rgap_audit.attack.engine import Reconstruction, attack_graph
from rgap_audit.errors import AttackUnsupported, AuditError
from rgap_audit.instance import Instance
from rgap_audit.records import Metrics, ModelReport, Verification, VerifiedLayer
from rgap_audit.tolerances import EXACT
from rgap_audit.verify.images import image_shaped, panel, write_figure
from rgap_audit.verify.metrics import best_of, fmt, image_metrics


def judge(report: ModelReport, rec: Reconstruction, plain_err: float | None, proj_err: float | None) -> tuple[bool | None, str]:
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
                f"(relative error {proj_err:.2g}); plain layer-wise R-GAP reached {fmt(plain_err)} because, not knowing "
                f"the activation pattern the analysis assumes, it finds {', '.join(lost)} undetermined."
            )
        return False, f"Not confirmed: the analysis predicts closed-form recovery but R-GAP's relative error is {fmt(best)}."
    if v.input_recoverable:
        idx = next((i for i, s in enumerate(rec.layers) if s.node in static_def), None)
        first = None if idx is None else rec.layers[idx]
        above_ok = idx is not None and all((s.rel_error or 0.0) <= EXACT for s in rec.layers[:idx])
        degraded = first is not None and (first.rel_error or 0.0) > EXACT
        nul = ", ".join(
            f"{n}: static {d}, measured {steps[n].nullity if n in steps else 'n/a'}" for n, d in static_def.items()
        )
        ok = degraded and above_ok and proj_err is not None and proj_err <= EXACT
        if ok and first is not None:
            return True, (
                f"Confirmed: plain layer-wise R-GAP degrades at the deficient layer(s) ({nul}; relative error "
                f"{first.rel_error:.2g} at {first.node}'s input, {fmt(plain_err)} at the input) and the projected "
                f"variant recovers the input (relative error {proj_err:.2g}), as the carried deficit of 0 predicts."
            )
        return False, (
            f"Not confirmed: the analysis predicts recovery through the deficient layer(s) ({nul}); measured relative "
            f"error {fmt(plain_err)} (plain R-GAP) and {fmt(proj_err)} (projected variant)."
        )
    if best > EXACT:
        return True, f"Confirmed: the analysis predicts the input is not recoverable in closed form; R-GAP's best relative error is {best:.2g}."
    return False, f"Not confirmed: the analysis predicts no closed-form recovery, yet R-GAP reached relative error {best:.2g}."


def verify_single(
    client: Instance, report: ModelReport, input: str | None, weights: str | None, save_images: str | None
) -> Verification:
    """R-GAP on one sample's gradient; the true input is used only to measure errors."""
    x = client.x
    shape = client.input_shape
    t0 = time.perf_counter()
    try:
        rec = attack_graph(client.graph, client.env, client.param_grads, shape, client.loss, true_input=x)
    except AttackUnsupported as err:
        return Verification(attempted=False, confirmed=None, summary=f"Not attempted: {err.cause}.")
    except AuditError as err:
        err.model = err.model or client.loaded.name
        raise
    wall = time.perf_counter() - t0

    plain_in, plain_idx = best_of(rec, x)
    proj_in = None
    if rec.projected is not None:
        proj_in, _ = best_of(rec.projected, x)
    m_plain = image_metrics(x, plain_in) if plain_in is not None else None
    m_proj = image_metrics(x, proj_in) if proj_in is not None else None
    confirmed, sentence = judge(report, rec, None if m_plain is None else m_plain.rel_error, None if m_proj is None else m_proj.rel_error)
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
        entry = VerifiedLayer(
            node=s.node,
            module_path=s.module_path,
            op=s.op,
            static_verdict=None if r is None else r.verdict.value,
            static_deficit=None if r is None else r.deficit,
            measured_nullity=s.nullity_given_pattern if s.nullity_given_pattern is not None else s.nullity,
            measured_nullity_without_pattern=s.nullity,
            rel_error=s.rel_error,
            method=s.method,
            residual_grad=s.residual_grad,
            residual_fwd=s.residual_fwd,
            rows_lost=s.rows_lost,
            seconds=s.seconds,
        )
        p = proj_steps.get(s.node)
        if p is not None:
            entry.rel_error_projected = p.rel_error
            entry.measured_nullity_projected = p.nullity_given_pattern if p.nullity_given_pattern is not None else p.nullity
            entry.carried_in = p.carried_in
        layers.append(entry)

    best: Metrics | None = m_proj if (m_proj and (m_plain is None or m_proj.rel_error < m_plain.rel_error)) else m_plain
    warnings = list(rec.warnings) + ([f"projected variant: {w}" for w in rec.projected.warnings] if rec.projected else [])
    result = Verification(
        attempted=True,
        confirmed=confirmed,
        summary=sentence,
        input=input or f"seeded uniform [0,1) random input (seed {client.seed})",
        weights=weights or "as constructed",
        loss=client.loss,
        rel_error=None if best is None else best.rel_error,
        mse=None if best is None else best.mse,
        psnr_db=None if best is None else best.psnr_db,
        scaling="MSE and PSNR after mapping the original input's [min, max] to [0, 1]; PSNR peak 1.0",
        seconds=wall,
        tolerance=EXACT,
        label=client.labels.tolist()[0],
        label_recovered=rec.label,
        label_status=rec.label_status,
        variant="projected" if best is m_proj and m_proj is not None else "plain",
        plain=m_plain,
        projected=m_proj,
        ambiguous_inputs=1 + len(rec.alternatives),
        layers=layers,
        warnings=warnings,
    )
    if rec.alternatives:
        result.warnings.append(
            f"the gradient admits {1 + len(rec.alternatives)} inputs; the errors are those of the one closest to the truth "
            f"({'the chosen' if plain_idx == 0 else 'an alternative'})"
        )
    if image_shaped(shape) and plain_in is not None:
        result.panels = [panel("plain R-GAP", x, plain_in, m_plain)]
        if proj_in is not None:
            result.panels.append(panel("projected variant", x, proj_in, m_proj))
    if save_images:
        if result.panels:
            result.image = write_figure(save_images, client.loaded, "", result.panels, f"{client.loaded.name}: closed-form R-GAP")
        else:
            result.warnings.append("no image written: the input is not image-shaped (C in 1 or 3, H, W) or was not recovered")
    return result
