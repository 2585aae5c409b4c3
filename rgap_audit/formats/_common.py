"""What several formats share: finding order, visibility, counts and the summary line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rgap_audit.records import SEVERITIES, ErrorRecord, Finding, ModelReport


def ordered(findings: Iterable[Finding]) -> list[Finding]:
    """Findings in source order: file, line, column, code, then model and node for ties."""
    return sorted(findings, key=lambda f: (f.file, f.line, f.col, f.code, f.model, f.node or ""))


def shown(findings: Iterable[Finding], show_suppressed: bool) -> list[Finding]:
    return [f for f in findings if show_suppressed or not f.suppressed]


def by_severity(findings: Iterable[Finding]) -> dict[str, int]:
    """Counts of unsuppressed findings per severity (every severity present, 0 when none)."""
    counts = {s: 0 for s in SEVERITIES}
    for f in findings:
        if not f.suppressed:
            counts[f.severity] = counts.get(f.severity, 0) + 1
    return counts


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def finding_line(f: Finding) -> str:
    """`path:line:col: CODE [severity] message` (with ` [suppressed]` when it is)."""
    tail = " [suppressed]" if f.suppressed else ""
    return f"{f.file}:{f.line}:{f.col}: {f.code} [{f.severity}] {f.message}{tail}"


def summary_dict(reports: Sequence[ModelReport], findings: Sequence[Finding], errors: Sequence[ErrorRecord] = ()) -> dict[str, object]:
    return {
        "models": len(reports),
        "findings": sum(1 for f in findings if not f.suppressed),
        "suppressed": sum(1 for f in findings if f.suppressed),
        "by_severity": by_severity(findings),
        "input_recoverable": sum(1 for r in reports if r.verdict.input_recoverable is True),
        "undecided": sum(1 for r in reports if r.verdict.input_recoverable is None),
        "errors": len(errors),
    }


def error_line(e: ErrorRecord) -> str:
    """`file:line: model: error: message (stage)`, the stderr line with the stage it happened at."""
    where = (e.file or "rgap-audit") + (f":{e.line}" if e.line is not None else "")
    who = f" {e.model}:" if e.model else ""
    return f"{where}:{who} error: {e.message} ({e.stage})"


def summary_line(
    reports: Sequence[ModelReport], findings: Sequence[Finding], show_suppressed: bool, errors: Sequence[ErrorRecord] = ()
) -> str:
    """One closing line: what was audited, the findings by severity, how many were suppressed, the errors."""
    counts = by_severity(findings)
    active = sum(counts.values())
    suppressed = sum(1 for f in findings if f.suppressed)
    models = plural(len(reports), "model")
    if active:
        parts = ", ".join(plural(counts[s], s) if s != "info" else f"{counts[s]} info" for s in reversed(SEVERITIES) if counts[s])
        text = f"Found {plural(active, 'finding')} ({parts}) in {models}"
    elif errors:  # never "all checks passed" when something could not be checked
        text = f"No findings in {models}"
    else:
        text = f"All checks passed: {models}, no findings"
    if suppressed:
        text += f"; {suppressed} suppressed" + ("" if show_suppressed else " (--show-suppressed shows them)")
    if errors:
        stages = ", ".join(dict.fromkeys(e.stage for e in errors))
        text += f"; {plural(len(errors), 'error')} ({stages}): the run is incomplete"
    return text + "."
