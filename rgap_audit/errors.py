"""Errors the user sees as one line: file, model, cause. Exit code 2, no traceback unless --debug."""

from __future__ import annotations

from rgap_audit.records import ErrorRecord


class AuditError(Exception):
    """A problem with the user's input (file, model, shape, config): reported in one line, exit 2."""

    def __init__(self, cause: str, file: str | None = None, model: str | None = None, line: int | None = None, stage: str | None = None):
        super().__init__(cause)
        self.cause = cause
        self.file = file
        self.model = model
        self.line = line
        self.stage = stage  # records.STAGES: set where it is raised or by the pipeline step that met it

    def record(self) -> ErrorRecord:
        """The error as the reports carry it (records.ErrorRecord)."""
        return ErrorRecord(self.file, self.line, self.model, self.stage or "usage", " ".join(str(self.cause).split()))

    def one_line(self) -> str:
        """`file:line: model: cause` with the parts that are known."""
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        who = f" {self.model}:" if self.model else ""
        text = " ".join(str(self.cause).split())  # never more than one line
        return f"{where}:{who} error: {text}"


class AttackUnsupported(AuditError):
    """The closed-form attack does not handle this model (a limit of the attack, not bad input):
    --verify reports "not attempted" with the cause and keeps the static report."""
