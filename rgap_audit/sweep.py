"""--batch-sizes: one audit per batch size, summarised as BatchPoints (records.py), both attackers side by side.

Attacker (a) knows each sample's dL/dz (the static verdict, RGAP403's upper bound); attacker (b) has the
summed gradient alone: statically, the span of the first layer's weight gradient against the samples (a
Linear) or their input patches (a convolution; RGAP404); with --verify, what R-GAP on the summed gradient
recovered (verify/batch.py).
"""

from __future__ import annotations

from rgap_audit.records import BatchPoint, LayerRecord, ModelReport


def _input_record(report: ModelReport) -> LayerRecord | None:
    return next((r for r in report.layers if r.reads_input and r.unknowns is not None), None)


def summed_text(report: ModelReport, rec: LayerRecord | None) -> tuple[int | None, bool | None, str]:
    """Attacker (b): (span rank, span leak, one sentence)."""
    b = report.batch_size
    if b == 1:
        text = "one sample: the summed gradient is the sample's own (attacker (a) applies)"
        span_rank, leak = None, None
    elif rec is not None and rec.span is not None:
        sp = rec.span
        span_rank, leak = sp.rank, sp.leak
        if sp.vectors == "sample":
            text = f"the first Linear's gradient spans a {sp.rank}-dimensional subspace " + (
                "holding every sample (RGAP404: the batch's span leaks)" if leak else f"(samples at relative distance up to {sp.distance:.1e})"
            )
        else:
            if leak:
                why = f"and holds all {sp.count} input patches (RGAP404: the span of the batch's patches leaks)"
            elif sp.rank >= sp.dims:
                why = "(the whole patch space: no span leak)"
            else:
                why = f"(patches at relative distance up to {sp.distance:.1e}: no span leak)"
            text = f"the first convolution's gradient spans {sp.rank} of its {sp.dims} patch-space dimensions {why}"
    else:
        span_rank, leak = None, None
        what = "no weighted layer reads the input" if rec is None else f"the first layer ({rec.op}) is not a Linear or a 1-D/2-D convolution without groups"
        text = f"no span measured statically ({what})"
    ver = report.verification
    if b > 1 and ver is not None:
        text += f"; --verify on the summed gradient: {ver.summary}"
    return span_rank, leak, text


def batch_point(report: ModelReport, seconds: float) -> BatchPoint:
    """The BatchPoint of one audited report."""
    v = report.verdict
    rec = _input_record(report)
    lo = hi = None
    if rec is not None and rec.unknowns is not None:
        if rec.deficit is not None:
            lo = hi = v.input_deficit if v.input_deficit is not None else rec.deficit
        elif rec.rank_lower is not None and rec.rank_upper is not None:
            lo, hi = rec.unknowns - rec.rank_upper, rec.unknowns - rec.rank_lower
    span_rank, leak, text = summed_text(report, rec)
    return BatchPoint(
        batch_size=report.batch_size,
        status=v.status,
        basis=v.basis,
        input_deficit=v.input_deficit,
        input_deficit_lower=lo,
        input_deficit_upper=hi,
        summary=v.summary,
        span_rank=span_rank,
        span_leak=leak,
        summed=text,
        seconds=round(seconds, 3),
    )


def deficit_text(p: BatchPoint) -> str:
    if p.input_deficit is not None:
        return str(p.input_deficit)
    if p.input_deficit_lower is None or p.input_deficit_upper is None:
        return "?"
    if p.input_deficit_lower == p.input_deficit_upper:
        return str(p.input_deficit_lower)
    return f"{p.input_deficit_lower}..{p.input_deficit_upper}"


HEADERS = ["B", "verdict (a: each dL/dz known)", "rests on", "input dirs undetermined", "summed gradient alone (b)", "seconds"]


def sweep_rows(points: list[BatchPoint]) -> list[list[object]]:
    """One table row per batch size."""
    rows: list[list[object]] = []
    for p in points:
        b_col = "n/a (B = 1)" if p.batch_size == 1 else (
            f"span leak: rank {p.span_rank}" if p.span_leak else (f"span rank {p.span_rank}, no leak" if p.span_rank is not None else "no span measured")
        )
        rows.append([p.batch_size, p.status.value, p.basis.value, deficit_text(p), b_col, f"{p.seconds:.2f}"])
    return rows
