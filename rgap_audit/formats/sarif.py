"""`sarif`: SARIF 2.1.0 for GitHub code scanning and other SARIF viewers.

ruleIds are the stable rule codes, each rule carries its metadata (name, short and full
description, help = why + fix, default level). Result locations are relative to the working
directory (uriBaseId %SRCROOT%). partialFingerprints hash the code, file, model and node, never the
line, so an alert survives edits that move it. Suppressed findings are kept with an inSource
suppression, as the standard asks, rather than dropped. Errors of the run (files, models or steps that
failed) are the invocation's toolExecutionNotifications, with executionSuccessful false.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from rgap_audit import __version__
from rgap_audit.formats._common import ordered, summary_dict
from rgap_audit.records import ErrorRecord, Finding, ModelReport

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SRCROOT = "%SRCROOT%"
LEVELS = {"error": "error", "warning": "warning", "info": "note"}
FINGERPRINT_KEY = "rgapFinding/v1"


def fingerprint(f: Finding, uri: str | None = None) -> str:
    """Stable identity of a finding: hash of code, file, model and node (not the line)."""
    key = "\x1f".join([f.code, uri if uri is not None else f.file.replace(os.sep, "/"), f.model, f.node or ""])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def artifact_location(file: str, cwd: str) -> dict[str, str]:
    """A relative uri under %SRCROOT% (the working directory) when possible, else an absolute file uri."""
    path = Path(file)
    if path.is_absolute():
        try:
            rel = PurePosixPath(path.resolve().relative_to(Path(cwd).resolve()).as_posix())
        except ValueError:
            return {"uri": path.resolve().as_uri()}
    else:
        rel = PurePosixPath(path.as_posix())
        if rel.parts and rel.parts[0] == "..":
            return {"uri": (Path(cwd) / path).resolve().as_uri()}
    return {"uri": quote(str(rel), safe="/"), "uriBaseId": SRCROOT}


def rule_descriptor(rule: Any) -> dict[str, Any]:
    """SARIF reportingDescriptor of one rule (duck-typed on rgap_audit.rules.Rule)."""
    help_text = f"{rule.summary}\n\nWhy it matters: {rule.why}\n\nHow to fix it: {rule.fix}"
    help_md = (
        f"**{rule.code} {rule.name}** ({rule.severity}, {rule.scope})\n\n{rule.summary}\n\n"
        f"**Why it matters.** {rule.why}\n\n**How to fix it.** {rule.fix}\n\n"
        f"Suppress on the reported line with `# rgap: ignore[{rule.code}]`."
    )
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.why},
        "help": {"text": help_text, "markdown": help_md},
        "defaultConfiguration": {"level": LEVELS[rule.severity]},
        "properties": {"tags": ["privacy", "gradient-leakage", rule.scope], "scope": rule.scope, "severity": rule.severity},
    }


def _result(f: Finding, rule_index: int | None, cwd: str) -> dict[str, Any]:
    loc = artifact_location(f.file, cwd)
    logical = {"name": f.node or f.model, "fullyQualifiedName": f"{f.model}.{f.node}" if f.node else f.model}
    logical["kind"] = "member" if f.node else "type"
    result: dict[str, Any] = {
        "ruleId": f.code,
        "level": LEVELS.get(f.severity, "warning"),
        "message": {"text": f.message},
        "locations": [
            {
                "physicalLocation": {
                    "artifactLocation": loc,
                    "region": {"startLine": max(1, f.line), "startColumn": max(1, f.col)},
                },
                "logicalLocations": [logical],
            }
        ],
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint(f, loc["uri"])},
        "properties": {"model": f.model, "node": f.node, "severity": f.severity},
    }
    if rule_index is not None:
        result["ruleIndex"] = rule_index
    if f.suppressed:
        result["suppressions"] = [{"kind": "inSource", "justification": f"# rgap: ignore[{f.code}] on the reported line"}]
    return result


def _notification(e: ErrorRecord, cwd: str) -> dict[str, Any]:
    """One error of the run as a SARIF toolExecutionNotification (level error, at its file and line)."""
    who = f"{e.model}: " if e.model else ""
    note: dict[str, Any] = {
        "level": "error",
        "message": {"text": f"{who}{e.message}"},
        "properties": {"stage": e.stage, "model": e.model},
    }
    if e.file:
        physical: dict[str, Any] = {"artifactLocation": artifact_location(e.file, cwd)}
        if e.line:
            physical["region"] = {"startLine": max(1, e.line)}
        note["locations"] = [{"physicalLocation": physical}]
    return note


def invocation(errors: Sequence[ErrorRecord], cwd: str) -> dict[str, Any]:
    """The run's invocation: executionSuccessful false when any file, model or step failed (exit code 2),
    with one toolExecutionNotification per error, so code scanning shows the run was incomplete."""
    return {
        "executionSuccessful": not errors,
        "toolExecutionNotifications": [_notification(e, cwd) for e in errors],
    }


def sarif_log(
    reports: Sequence[ModelReport],
    findings: Sequence[Finding],
    *,
    rules: Sequence[Any] | None = None,
    cwd: str | None = None,
    errors: Sequence[ErrorRecord] = (),
) -> dict[str, Any]:
    """The SARIF log as a dict: one run, every rule of the catalogue, one result per finding, the
    invocation with the run's errors."""
    if rules is None:
        from rgap_audit.rules import load_rules

        rules = load_rules()
    cwd = cwd or os.getcwd()
    descriptors = [rule_descriptor(r) for r in rules]
    index = {d["id"]: i for i, d in enumerate(descriptors)}
    results = [_result(f, index.get(f.code), cwd) for f in ordered(findings)]
    root = Path(cwd).resolve().as_uri().rstrip("/") + "/"
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "rgap-audit",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "rules": descriptors,
                    }
                },
                "originalUriBaseIds": {SRCROOT: {"uri": root}},
                "invocations": [invocation(errors, cwd)],
                "results": results,
                "properties": {
                    "summary": summary_dict(reports, findings, errors),
                    "models": [
                        {
                            "file": r.file,
                            "model": r.model,
                            "status": r.verdict.status,
                            "input_recoverable": r.verdict.input_recoverable,
                        }
                        for r in reports
                    ],
                },
            }
        ],
    }


def render_sarif(
    reports: Sequence[ModelReport],
    findings: Sequence[Finding],
    *,
    rules: Sequence[Any] | None = None,
    cwd: str | None = None,
    errors: Sequence[ErrorRecord] = (),
) -> str:
    """SARIF 2.1.0 text."""
    return json.dumps(sarif_log(reports, findings, rules=rules, cwd=cwd, errors=errors), indent=2, ensure_ascii=False) + "\n"
