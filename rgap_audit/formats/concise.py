"""`concise`: one line per finding, `path:line:col: CODE [severity] message`, then a summary line (with the errors counted)."""

from __future__ import annotations

from collections.abc import Sequence

from rgap_audit.formats._common import finding_line, ordered, shown, summary_line
from rgap_audit.records import ErrorRecord, Finding, ModelReport


def render_concise(
    reports: Sequence[ModelReport], findings: Sequence[Finding], *, show_suppressed: bool = False, errors: Sequence[ErrorRecord] = ()
) -> str:
    """The pre-commit / CI view: editors and terminals turn `path:line:col:` into links. Errors are on
    stderr, one line each, as they happen; the summary line counts them."""
    lines = [finding_line(f) for f in ordered(shown(findings, show_suppressed))]
    lines.append(summary_line(reports, findings, show_suppressed, errors))
    return "\n".join(lines) + "\n"
