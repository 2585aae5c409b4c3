"""The fixed choices and defaults of the command line and the configuration (imports nothing heavy)."""

from __future__ import annotations

from rgap_audit.records import SEVERITIES

FORMATS = ("concise", "table", "json", "sarif", "github", "html")
LOSSES = ("logistic", "cross-entropy")
DEFAULT_FAIL_ON = "warning"
DEFAULT_MEMORY_BUDGET_MB = 4096.0

__all__ = ["DEFAULT_FAIL_ON", "DEFAULT_MEMORY_BUDGET_MB", "FORMATS", "LOSSES", "SEVERITIES"]
