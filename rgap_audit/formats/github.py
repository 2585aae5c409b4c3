"""`github`: GitHub Actions workflow commands, one annotation per error and per finding on the file and line."""

from __future__ import annotations

from collections.abc import Sequence

from rgap_audit.errors import AuditError
from rgap_audit.formats._common import ordered, shown, summary_line
from rgap_audit.records import ErrorRecord, Finding, ModelReport

LEVELS = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(text: str) -> str:
    """Escape a workflow command's message (after `::`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command's property value (file=, title=)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(f: Finding) -> str:
    """`::error file=...,line=...,col=...,title=CODE name::message` for one finding."""
    props = ",".join(
        [
            f"file={escape_property(f.file)}",
            f"line={f.line}",
            f"col={f.col}",
            f"title={escape_property(f'{f.code} {f.name}' + (' (suppressed)' if f.suppressed else ''))}",
        ]
    )
    level = "notice" if f.suppressed else LEVELS.get(f.severity, "warning")  # shown, but never as an error
    return f"::{level} {props}::{escape_data(f.message)}"


def error_annotation(err: AuditError | ErrorRecord) -> str:
    """`::error file=...,line=...,title=rgap-audit (stage)::model: cause` for a file, model or step that failed;
    without a file (a usage error) the annotation has no file property."""
    rec = err.record() if isinstance(err, AuditError) else err
    props = [f"file={escape_property(rec.file)}"] if rec.file else []
    if rec.file and rec.line:
        props.append(f"line={rec.line}")
    props.append(f"title={escape_property(f'rgap-audit ({rec.stage})')}")
    who = f"{rec.model}: " if rec.model else ""
    return f"::error {','.join(props)}::{escape_data(who + rec.message)}"


def render_github(
    reports: Sequence[ModelReport], findings: Sequence[Finding], *, show_suppressed: bool = False, errors: Sequence[ErrorRecord] = ()
) -> str:
    """Annotations for a workflow log (one ::error per error, then one per finding); the summary line
    stays plain text in the log."""
    lines = [error_annotation(e) for e in errors]
    lines += [annotation(f) for f in ordered(shown(findings, show_suppressed))]
    lines.append(summary_line(reports, findings, show_suppressed, errors))
    return "\n".join(lines) + "\n"
