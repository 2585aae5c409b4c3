"""`table`: the human view. Per model a header, one row per step of the R-GAP walk (output first,
torchinfo style), the model verdict with what it rests on and its caveats, then the findings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from rgap_audit.formats._common import error_line, finding_line, ordered, shown, summary_line
from rgap_audit.formats.defences import defence_lines
from rgap_audit.records import ErrorRecord, Finding, LayerRecord, ModelReport, Verification, VerifiedLayer

HEADERS = ["#", "node", "op", "input", "unknowns", "grad rows", "fwd rows", "rank K", "rank [K;F]", "deficit", "verdict"]
VERIFY_HEADERS = ["measured nullity", "rel. error / predicted (plain)", "rel. error / predicted (projected)"]
REASON_WIDTH = 60


def shape_text(shape: Sequence[int] | None) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"


def rank_text(rec: LayerRecord) -> str:
    """The rank of [K; F], or `lo..hi` when only bounds are known, or '' for rows that are not layers."""
    if rec.rank is not None:
        return str(rec.rank)
    if rec.rank_lower is not None or rec.rank_upper is not None:
        lo = "?" if rec.rank_lower is None else rec.rank_lower
        hi = "?" if rec.rank_upper is None else rec.rank_upper
        return f"{lo}..{hi}"
    return ""


def _short(text: str, width: int = REASON_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def layer_rows(report: ModelReport) -> list[list[Any]]:
    """One row per LayerRecord, in walk order."""
    paths = Counter(r.module_path for r in report.layers if r.module_path)
    measured = _measured_layers(report)
    rows = []
    for rec in report.layers:
        name = rec.module_path or rec.node
        if rec.module_path and paths[rec.module_path] > 1:
            name += f" [{rec.node}]"  # a module object reused at several places
        rank_k = rec.rank_grad if rec.rank_grad is not None else rec.rank_grad_counting
        verdict = rec.verdict.value
        if rec.reason:
            verdict += f": {_short(rec.reason)}"
        row = (
            [
                rec.index,
                name,
                rec.op,
                shape_text(rec.input_shape),
                rec.unknowns,
                rec.grad_rows,
                rec.fwd_rows,
                rank_k,
                rank_text(rec),
                rec.deficit,
                verdict,
            ]
        )
        if measured is not None:
            m = measured.get(rec.node)
            row += [None, None, None] if m is None else [
                m.measured_nullity,
                _err(m.rel_error, m.predicted_error, m.within_conditioning),
                _err(m.rel_error_projected, m.predicted_error_projected, m.within_conditioning_projected),
            ]
        rows.append(row)
    return rows


def _measured_layers(report: ModelReport) -> dict[str, VerifiedLayer] | None:
    """--verify's per-layer measurements keyed by node, or None when there are none (a batch's attack has
    no per-layer truth to compare with: its layers stay in the JSON report)."""
    ver = report.verification
    if ver is None or not ver.layers or ver.batch_size is not None:
        return None
    return {m.node: m for m in ver.layers}


def _err(v: float | None, predicted: float | None = None, within: bool | None = None) -> str | None:
    """A layer's measured error next to the error its conditioning predicts ('-': not predicted); EXCEEDS where
    the measured error is above what the conditioning allows."""
    if v is None:
        return None
    text = f"{v:.2g} / " + ("-" if predicted is None else f"{predicted:.2g}")
    return text + (" EXCEEDS" if within is False else "")


def run_lines(ver: Verification) -> list[str]:
    """--verify at B = 1: what "recovered" means, and each run of --verify-seeds."""
    out = []
    if ver.criterion is not None:
        out.append(f"criterion: {ver.criterion.rule}")
    if len(ver.runs) > 1:
        parts = []
        for r in ver.runs:
            said = {True: "confirmed", False: "not confirmed", None: "neither"}[r.confirmed]
            err = "no input" if r.rel_error is None else f"rel. error {r.rel_error:.2g}"
            psnr = "" if r.rel_error is None else (", PSNR inf" if r.psnr_db is None else f", PSNR {r.psnr_db:.1f} dB")
            ssim = "" if r.ssim is None else f", SSIM {r.ssim:.3f}"
            where = f", error entered at {r.error_entered_at}" if r.error_entered_at else ""
            parts.append(f"seed {r.seed} {said} ({err}{psnr}{ssim}{where})")
        out.append("runs: " + "; ".join(parts))
    return out


def batch_lines(ver: Verification) -> list[str]:
    """--verify with a batch (B > 1): per-sample errors, the combination fit, the span leak; [] for B = 1."""
    if ver.per_sample is None:
        return []
    out = []
    parts = []
    for p in ver.per_sample:
        text = f"#{p.sample} " + ("not reconstructed" if p.rel_error is None else f"rel. error {p.rel_error:.2g}")
        if p.psnr_db is not None:
            text += f" (PSNR {p.psnr_db:.1f} dB)"
        if p.recovered:
            text += " RECOVERED"
        parts.append(text)
    if parts:
        out.append("per sample: " + "; ".join(parts))
    comb = ver.combination
    if comb is not None:
        coefs = ", ".join(f"{c:.3g}" for c in comb.coefficients)
        res = comb.residual_rel
        out.append(
            f"combination fit: coefficients [{coefs}], relative residual {'n/a' if res is None else f'{res:.2g}'}"
            + (" (a combination of the samples)" if comb.combination else "")
        )
    if ver.span_leak is not None:
        out.append(f"span leak: {ver.span_leak.summary}")
    elif ver.span_leak_reason:
        out.append(f"span leak: not measured ({ver.span_leak_reason})")
    return out


def _recoverable_text(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "undecided"}[value]


def model_block(report: ModelReport, findings: Sequence[Finding], show_suppressed: bool) -> str:
    """The header, the walk table, the verdict lines and the findings of one model."""
    where = report.file + (f":{report.location.line}" if report.location else "")
    head = (
        f"{where}: {report.model} - input {shape_text(report.input_shape)} per sample, batch {report.batch_size}, "
        f"loss {report.loss}, seed {report.seed}, {report.dtype}"
    )
    lines = [head, "=" * min(len(head), 120)]
    if report.private_input:
        lines.append(f"forward called with the private input as {report.private_input}")
    if report.output:
        lines.append(f"audited output: {report.output}")
    if report.layers:
        headers = HEADERS + (VERIFY_HEADERS if _measured_layers(report) else [])
        lines.append(tabulate(layer_rows(report), headers=headers, tablefmt="simple", missingval="", disable_numparse=[1, 2, 3, 10]))
    else:
        lines.append("(no operations recorded)")
    v = report.verdict
    lines.append("")
    lines.append(f"verdict: {v.status.value} (input recoverable in closed form: {_recoverable_text(v.input_recoverable)}) - {v.summary}")
    deficit = "?" if v.input_deficit is None else v.input_deficit
    lines.append(
        f"  rests on: {v.basis.value}; deficient layers: {v.deficient_layers} (total deficit {v.total_deficit}); "
        f"input directions undetermined: {deficit}"
    )
    if v.attacker:
        lines.append(f"  attacker: {v.attacker}")
    lines.extend(f"  caveat: {c}" for c in v.caveats)
    lines.extend(f"  warning: {w}" for w in report.warnings)
    if report.identifiability is not None:
        lines.append(f"  identifiability: {report.identifiability.summary}")
    if report.verification is not None:
        ver = report.verification
        lines.append(f"  verification: {ver.summary}")
        keys = (
            "outcome", "nearest_sample", "rel_error", "mse", "psnr_db", "ssim", "predicted_error", "median_rel_error",
            "worst_rel_error", "worst_psnr_db", "seconds", "variant", "label_status", "input", "weights", "scaling", "image",
        )
        items = ", ".join(f"{k}={_value(getattr(ver, k))}" for k in keys if getattr(ver, k) is not None)
        if items:
            lines.append(f"    {items}")
        lines.extend(f"    {line}" for line in batch_lines(ver))
        lines.extend(f"    {line}" for line in run_lines(ver))
    if report.defences is not None:
        lines.extend(defence_lines(report.defences))
    if report.timings:
        total = report.timings.get("total_s", report.timings.get("total"))
        if total is None:
            total = sum(report.timings.values())
        lines.append(f"  audited in {total:.2f} s")
    if report.cached:
        lines.append("  from the cache: the model's sources, configuration, options and tool versions are unchanged since that audit")
    if report.batch_sweep:
        from rgap_audit.sweep import HEADERS as SWEEP_HEADERS
        from rgap_audit.sweep import sweep_rows

        lines.append(f"batch sizes (the rows above are batch {report.batch_size}):")
        lines.append(tabulate(sweep_rows(report.batch_sweep), headers=SWEEP_HEADERS, tablefmt="simple", disable_numparse=True))
        lines.extend(f"  B={p.batch_size}: (a) {p.summary}; (b) {p.summed}" for p in report.batch_sweep)
    mine = ordered(shown([f for f in findings if f.model == report.model and f.file == report.file], show_suppressed))
    if mine:
        lines.append("findings:")
        lines.extend(f"  {finding_line(f)}" for f in mine)
    return "\n".join(lines)


def render_table(
    reports: Sequence[ModelReport], findings: Sequence[Finding], *, show_suppressed: bool = False, errors: Sequence[ErrorRecord] = ()
) -> str:
    """Every model's block, findings of no known model at the end, the errors, then the summary line."""
    blocks = [model_block(r, findings, show_suppressed) for r in reports]
    known = {(r.file, r.model) for r in reports}
    orphans = ordered(shown([f for f in findings if (f.file, f.model) not in known], show_suppressed))
    if orphans:
        blocks.append("findings:\n" + "\n".join(f"  {finding_line(f)}" for f in orphans))
    if errors:
        blocks.append("errors:\n" + "\n".join(f"  {error_line(e)}" for e in errors))
    blocks.append(summary_line(reports, findings, show_suppressed, errors))
    return "\n\n".join(blocks) + "\n"
