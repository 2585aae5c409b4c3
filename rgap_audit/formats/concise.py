"""`concise`: one line per finding, `path:line:col: CODE [severity] message`, then a summary line."""

from __future__ import annotations

from collections.abc import Sequence

from rgap_audit.formats._common import finding_line, ordered, shown, summary_line
from rgap_audit.records import Finding, ModelReport


def render_concise(reports: Sequence[ModelReport], findings: Sequence[Finding], *, show_suppressed: bool = False) -> str:
    """The pre-commit / CI view: editors and terminals turn `path:line:col:` into links."""
    lines = [finding_line(f) for f in ordered(shown(findings, show_suppressed))]
    lines.append(summary_line(reports, findings, show_suppressed))
    return "\n".join(lines) + "\n"
