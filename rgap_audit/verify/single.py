"""--verify with one sample: R-GAP on the client's gradient, per-layer errors next to the static rows and
next to what the measured conditioning allows, and one sentence saying whether the run confirms the static
verdict (verify.judge)."""

from __future__ import annotations

import time

from rgap_audit.attack.engine import attack_graph
from rgap_audit.errors import AttackUnsupported, AuditError
from rgap_audit.instance import Instance
from rgap_audit.records import Criterion, Metrics, ModelReport, Verification, VerifiedLayer
from rgap_audit.verify.criterion import check
from rgap_audit.verify.images import image_shaped, panel, write_figure
from rgap_audit.verify.judge import judge
from rgap_audit.verify.metrics import best_of, image_metrics


def verify_single(
    client: Instance, report: ModelReport, input: str | None, weights: str | None, save_images: str | None, crit: Criterion
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
    proj_in, proj_idx = None, 0
    if rec.projected is not None:
        proj_in, proj_idx = best_of(rec.projected, x)
    m_plain = image_metrics(x, plain_in, shape) if plain_in is not None else None
    m_proj = image_metrics(x, proj_in, shape) if proj_in is not None else None
    # against the conditioning: per layer only when the input measured is the one the layers were solved for
    # (a walk that never reached the input kept one head candidate of several it could not tell apart: not compared)
    c_plain = check(rec, crit, None if m_plain is None else m_plain.rel_error, plain_idx == 0 and rec.input is not None)
    c_proj = None
    if rec.projected is not None:
        c_proj = check(rec.projected, crit, None if m_proj is None else m_proj.rel_error, proj_idx == 0 and rec.projected.input is not None)
    verdict = judge(report, rec, m_plain, m_proj, c_plain, c_proj, crit)
    confirmed, sentence = verdict.confirmed, verdict.sentence
    entered = None if verdict.check is None else verdict.check.entered_at
    lost_at = [s.node for s in rec.layers if s.rows_lost and (entered is None or s.node == entered)]
    if confirmed is False and lost_at:  # unknown entries of z where the error entered (or anywhere, when not located)
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
            solve_gain=s.solve_gain,
            link_gain=s.link_gain,
        )
        mine = c_plain.layer(s.node)
        if mine is not None:
            entry.predicted_error, entry.within_conditioning = mine.predicted, mine.within
        p = proj_steps.get(s.node)
        if p is not None:
            entry.rel_error_projected = p.rel_error
            entry.measured_nullity_projected = p.nullity_given_pattern if p.nullity_given_pattern is not None else p.nullity
            entry.carried_in = p.carried_in
            theirs = None if c_proj is None else c_proj.layer(s.node)
            if theirs is not None:
                entry.predicted_error_projected, entry.within_conditioning_projected = theirs.predicted, theirs.within
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
        ssim=None if best is None else best.ssim,
        scaling="MSE, PSNR and SSIM after mapping the original input's [min, max] to [0, 1]; PSNR peak 1.0",
        seconds=wall,
        criterion=crit,
        leak=verdict.leak,
        within_conditioning=None if verdict.check is None else verdict.check.within,
        predicted_error=None if verdict.check is None else verdict.check.input_predicted,
        error_entered_at=None if verdict.check is None else verdict.check.entered_at,
        label=client.labels.tolist()[0],
        label_recovered=rec.label,
        label_status=rec.label_status,
        variant="projected" if best is m_proj and m_proj is not None else "plain",
        plain=m_plain,
        projected=m_proj,
        ambiguous_inputs=1 + len(rec.alternatives),
        layers=layers,
        warnings=warnings,
        given_pattern=rec.patterns_given(),
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
