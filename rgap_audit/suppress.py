"""Inline suppressions: `# rgap: ignore[RGAP101,RGAP203]` on the line a finding points at.

The directive is our own (not `# noqa`, which ruff and flake8 would claim): bare `# rgap: ignore`
suppresses every code on that line, `# rgap: ignore[RGAP2]` every RGAP2xx (prefixes, as in
--select). A finding points at the line that constructs its layer (`self.fc = nn.Linear(...)`) or at
the model's definition (`class Net(nn.Module):`), so that is where the comment goes. Comments are
found with the tokenizer, so text inside a string that looks like a directive does nothing.
Suppressed findings stay in the list, marked, so that --show-suppressed and SARIF can show them.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterable, Mapping

from rgap_audit.records import Finding

DIRECTIVE_RE = re.compile(r"#\s*rgap:\s*ignore(?:\[(?P<codes>[^\]]*)\])?(?![\w\[-])", re.IGNORECASE)
CODE_RE = re.compile(r"^RGAP[0-9]{0,3}$")

# line number -> codes (or prefixes) suppressed there; None means every code
Directives = dict[int, "frozenset[str] | None"]


def _merge(directives: Directives, line: int, codes: frozenset[str] | None) -> None:
    if line in directives:
        old = directives[line]
        directives[line] = None if old is None or codes is None else old | codes
    else:
        directives[line] = codes


def parse_comment(comment: str) -> frozenset[str] | bool | None:
    """Codes suppressed by one comment: a set, None for all codes, False when it has no directive."""
    found: frozenset[str] | bool | None = False
    for m in DIRECTIVE_RE.finditer(comment):
        raw = m.group("codes")
        if raw is None:
            return None
        codes = frozenset(c.upper() for c in re.split(r"[\s,]+", raw) if CODE_RE.match(c.upper()))
        found = codes if found is False else found | codes  # type: ignore[operator]
    return found


def parse_directives(source: str) -> Directives:
    """All `# rgap: ignore` directives of a Python source, by line (comments only, via tokenize)."""
    directives: Directives = {}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    try:
        for tok in tokens:
            if tok.type == tokenize.COMMENT:
                codes = parse_comment(tok.string)
                if codes is not False:
                    _merge(directives, tok.start[0], codes)  # type: ignore[arg-type]
    except (tokenize.TokenError, SyntaxError):
        pass  # a file that does not tokenize to the end: keep the directives seen so far
    return directives


def read_directives(path: str) -> Directives:
    """The directives of a file on disk (its encoding cookie honoured); {} when it cannot be read."""
    try:
        with tokenize.open(path) as fh:
            source = fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    return parse_directives(source)


def suppresses(codes: frozenset[str] | None, code: str) -> bool:
    """Whether a directive's codes cover a finding's code (None = all; prefixes match)."""
    return codes is None or any(code.startswith(c) for c in codes)


def apply(findings: Iterable[Finding], sources: Mapping[str, str] | None = None) -> list[Finding]:
    """Mark findings whose line carries a matching directive as suppressed (in place) and return them.

    Sources are read from each finding's file, or taken from `sources` ({file: text}) when given.
    """
    out = list(findings)
    cache: dict[str, Directives] = {}
    for finding in out:
        if finding.file not in cache:
            if sources is not None and finding.file in sources:
                cache[finding.file] = parse_directives(sources[finding.file])
            else:
                cache[finding.file] = read_directives(finding.file)
        directives = cache[finding.file]
        if finding.line in directives and suppresses(directives[finding.line], finding.code):
            finding.suppressed = True
    return out
