"""The smallest batch size at which the static verdict stops saying the input is recoverable.

A small loop over the analysis at batch size B = 2, 3, ... (`verdict_at`; its batch ranks are rank.py's and
batchrank.py's exact block eliminations where they fit, proven bounds otherwise). The caveat of RGAP403 holds at every B: each sample's dL/dz is taken
from the instance, the attacker's best case. At the B found, --verify's batch attack (R-GAP on the summed gradient)
is run and kept: what comes back, samples, a combination of them, the span.
"""

from __future__ import annotations

import time
from dataclasses import replace

from rgap_audit.analysis import Audit, audit_instance
from rgap_audit.errors import AuditError
from rgap_audit.instance import build_instance
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import BatchDefence, BatchVerdictPoint, ModelReport
from rgap_audit.threads import single_thread
from rgap_audit.verify.batch import verify_batch

MAX_BATCH = 4
BUDGET_S = 20.0
CAVEAT = (
    "each sample's dL/dz is taken from the instance (the attacker's best case, RGAP403): an attacker who cannot derive "
    "per-sample output gradients from the summed gradient does worse, so the batch size found is a lower bound on the "
    "one that stops a real attacker only in that sense: below it the analysis says recoverable"
)


def verdict_at(loaded: LoadedModel, options: AuditOptions, batch: int) -> Audit:
    """The full static analysis of the model at batch size `batch` (same seed, loss and shape)."""
    opts = replace(options, batch_size=batch)
    with single_thread():
        return audit_instance(build_instance(replace(loaded, batch_size=batch), opts), opts)


def batch_defence(
    loaded: LoadedModel, options: AuditOptions, report: ModelReport, *, max_batch: int = MAX_BATCH, budget_s: float = BUDGET_S,
    verify: bool = True,
) -> BatchDefence:
    """Batch sizes 1 (the audit given) .. max_batch until the verdict is not recoverable, or the budget is spent."""
    t0 = time.perf_counter()
    points = [BatchVerdictPoint(report.batch_size, report.verdict.status, report.verdict.input_recoverable, report.verdict.input_deficit)]
    stop: int | None = None if report.verdict.input_recoverable else report.batch_size
    found: Audit | None = None
    notes: list[str] = []
    b = report.batch_size + 1
    while stop is None and b <= max_batch:
        if time.perf_counter() - t0 > budget_s:
            notes.append(f"batch sizes {b}..{max_batch} not audited within the {budget_s:g} s budget")
            break
        try:
            audited = verdict_at(loaded, options, b)
        except AuditError as exc:
            notes.append(f"batch size {b}: {exc.cause}")
            break
        v = audited.report.verdict
        points.append(BatchVerdictPoint(b, v.status, v.input_recoverable, v.input_deficit))
        if v.input_recoverable is not True:
            stop, found = b, audited
        b += 1
    ver = None
    if verify and found is not None and found.instance.x.is_floating_point():
        try:
            ver = verify_batch(found.instance, found.report, None, None, None, False)
        except AuditError as exc:
            notes.append(f"--verify at batch size {stop}: {exc.cause}")
    if stop is None:
        summary = f"the static verdict is recoverable at every batch size up to {points[-1].batch_size}"
    else:
        last = points[-1]
        summary = f"from batch size {stop} the static verdict is {last.status.value} (input deficit {last.input_deficit})"
        if ver is not None:
            summary += f"; the batch attack there: {ver.summary}"
    if notes:
        summary += "; " + "; ".join(notes)
    return BatchDefence(max_batch, points, stop, CAVEAT, ver, time.perf_counter() - t0, summary)
