"""`json`: the whole report as one JSON document, valid against rgap_audit/schema/report.schema.json."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from functools import lru_cache
from importlib import resources
from typing import Any

from rgap_audit import __version__
from rgap_audit.formats._common import ordered, summary_dict
from rgap_audit.records import SCHEMA_VERSION, ErrorRecord, Finding, ModelReport


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: non-finite floats become null (JSON has no NaN), numpy scalars unwrap."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def report_dict(
    reports: Sequence[ModelReport], findings: Sequence[Finding], errors: Sequence[ErrorRecord] = (), *, exit_code: int | None = None
) -> dict[str, Any]:
    """The report as a dict: schema_version, tool, models (ModelReport.to_dict), findings, errors
    (file, line, model, stage, message), summary (with the run's exit code when the command line gives it)."""
    summary = summary_dict(reports, findings, errors)
    if exit_code is not None:
        summary["exit_code"] = exit_code
    return _jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "rgap-audit", "version": __version__},
            "models": [r.to_dict() for r in reports],
            "findings": [asdict(f) for f in ordered(findings)],
            "errors": [asdict(e) for e in errors],
            "summary": summary,
        }
    )


def render_json(
    reports: Sequence[ModelReport], findings: Sequence[Finding], errors: Sequence[ErrorRecord] = (), *, exit_code: int | None = None
) -> str:
    """The JSON report text (suppressed findings included, marked `suppressed: true`; every error of the run)."""
    return json.dumps(report_dict(reports, findings, errors, exit_code=exit_code), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("rgap_audit").joinpath("schema/report.schema.json").read_text(encoding="utf-8")


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the report, as shipped in the package."""
    return json.loads(_schema_text())
