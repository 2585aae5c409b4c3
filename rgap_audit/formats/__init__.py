"""Output formats: one renderer per `--format`, all reading ModelReports and Findings only.

    render(fmt, reports, findings, show_suppressed=False, errors=()) -> str

concise  `path:line:col: CODE [severity] message` lines and a summary line (pre-commit, CI)
table    per model, one row per step of the walk (torchinfo style), the verdict, the findings
json     the report: schema_version, tool, models, findings, summary (rgap_audit/schema)
sarif    SARIF 2.1.0 for GitHub code scanning: rule metadata, stable fingerprints
github   GitHub Actions workflow commands (::error / ::warning / ::notice annotations)
html     one self-contained page (figures inline, no network), rendered from the json document

Errors (a file, model or step that failed; exit code 2) are in every format: json's `errors` array and
summary count, sarif's invocation (toolExecutionNotifications, executionSuccessful false), github's
::error annotations, and the summary line of concise and table (table also lists them).

Suppressed findings: the human formats (concise, table, github) show them only with
show_suppressed; json and sarif always carry them, marked (`suppressed: true` / SARIF
`suppressions`), so that a machine reading the report sees what was accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

from rgap_audit.choices import FORMATS
from rgap_audit.errors import AuditError
from rgap_audit.records import ErrorRecord, Finding, ModelReport


def render(
    fmt: str,
    reports: Sequence[ModelReport],
    findings: Sequence[Finding],
    *,
    show_suppressed: bool = False,
    rules: Sequence[object] | None = None,
    cwd: str | None = None,
    exit_code: int | None = None,
    errors: Sequence[ErrorRecord] = (),
) -> str:
    """Render the reports, findings and errors in one of FORMATS; `rules` and `cwd` only matter for sarif,
    `exit_code` (recorded in the document's summary) for json and html."""
    if fmt == "concise":
        from rgap_audit.formats.concise import render_concise

        return render_concise(reports, findings, show_suppressed=show_suppressed, errors=errors)
    if fmt == "table":
        from rgap_audit.formats.table import render_table

        return render_table(reports, findings, show_suppressed=show_suppressed, errors=errors)
    if fmt == "json":
        from rgap_audit.formats.jsonreport import render_json

        return render_json(reports, findings, errors, exit_code=exit_code)
    if fmt == "sarif":
        from rgap_audit.formats.sarif import render_sarif

        return render_sarif(reports, findings, rules=rules, cwd=cwd, errors=errors)
    if fmt == "github":
        from rgap_audit.formats.github import render_github

        return render_github(reports, findings, show_suppressed=show_suppressed, errors=errors)
    if fmt == "html":
        from rgap_audit.formats.htmlreport import render_html
        from rgap_audit.formats.jsonreport import report_dict

        return render_html(report_dict(reports, findings, errors, exit_code=exit_code))
    raise AuditError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


__all__ = ["FORMATS", "render"]
