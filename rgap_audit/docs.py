"""Rule documentation generated from the rule files: docs/rules.md, `rgap-audit rules`, `rgap-audit rule CODE`.

The rule files are the single source: nothing here is written twice. Regenerate the Markdown with

    python -m rgap_audit.docs            # writes docs/rules.md
    python -m rgap_audit.docs --check    # exit 1 when docs/rules.md is out of date
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from rgap_audit.errors import AuditError
from rgap_audit.rules import OPS, RULE_KEYS, SCOPES, Rule, get_rule, load_rules, root_fields

GROUPS = {
    "RGAP1": "Model input",
    "RGAP2": "Layers",
    "RGAP3": "The chain",
    "RGAP4": "Limits and assumptions of the analysis",
    "RGAP5": "Defences (--defences, measured)",
}
WIDTH = 88
# How severities are assigned: what a CI gate on --fail-on decides (README, "What the audit computes")
SEVERITY_POLICY = (
    "**Severities say whether the private input leaks.** The model-level finding carries the severity of",
    "the model verdict: input recoverable in closed form (RGAP101) is an error, undecided (RGAP102) a",
    "warning, not recoverable in closed form (RGAP103) info. A layer that gives its input away exactly is",
    "an error (RGAP201) only when that input is the model's input; a biased Linear deeper in the network",
    "leaks internal features, not the training sample: a warning (RGAP205), as features can still be",
    "inverted where the layers below allow it, which is what the model verdict decides. Per-layer ranks",
    "and the batch assumption are info (RGAP202, RGAP203, RGAP204, RGAP301, RGAP403); what the analysis",
    "could not decide (RGAP401, RGAP402) and the span a batch reveals (RGAP404) are warnings. What",
    "--defences measured stops the closed-form attack is info (RGAP501, RGAP502, RGAP503, RGAP504).",
)


def _group(code: str) -> str:
    return GROUPS.get(code[:5], "Other")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _where(rule: Rule) -> str:
    return "the model's definition line" if rule.scope == "model" else "the line that constructs the layer"


def generate_rules_md(rules: Sequence[Rule] | None = None) -> str:
    """docs/rules.md: an index table, then one section per rule (what, why, fix, condition, suppression)."""
    rules = load_rules() if rules is None else list(rules)
    out = [
        "# rgap-audit rules",
        "",
        "<!-- Generated from rules/*.toml by `python -m rgap_audit.docs`: edit the rule files, not this page. -->",
        "",
        "Each rule has a stable code. Select or ignore rules by code or prefix (`--select RGAP2`,",
        "`--ignore RGAP203`, or `select` / `ignore` in `[tool.rgap-audit]`), and suppress one finding with",
        "`# rgap: ignore[CODE]` on the line it points at. `--fail-on` sets the lowest severity that fails the run.",
        "",
        *SEVERITY_POLICY,
        "",
        "| code | name | severity | scope | what it flags |",
        "|---|---|---|---|---|",
    ]
    for r in rules:
        out.append(f"| [{r.code}](#{r.code.lower()}-{r.name}) | {r.name} | {r.severity} | {r.scope} | {_cell(r.summary)} |")
    group = None
    for r in rules:
        if _group(r.code) != group:
            group = _group(r.code)
            out += ["", f"## {group}"]
        out += [
            "",
            f"### {r.code} {r.name}",
            "",
            f"**Severity:** {r.severity} · **Scope:** {r.scope} · **Points at:** {_where(r)}",
            "",
            f"**What it flags.** {r.summary}",
            "",
            "**Why it matters.** " + r.why,
            "",
            "**How to fix it.** " + r.fix,
            "",
            f"**Fires when:** `{r.condition_text}`",
            "",
            f"**Message:** `{r.message.text}`",
            "",
            f"**Suppress:** `# rgap: ignore[{r.code}]` on {_where(r)}.",
        ]
    out += ["", *_format_reference()]
    return "\n".join(out) + "\n"


def _format_reference() -> list[str]:
    """The rule file format, generated from the engine's own tables so it cannot drift."""
    out = [
        "## Writing a rule",
        "",
        "One TOML file per rule in `rules/`, named `<code>-<name>.toml`, with the keys "
        + ", ".join(f"`{k}`" for k in RULE_KEYS)
        + ". `scope` is `model` (one check per audited model, reported at the model's definition line) or "
        "`layer` (one check per row of the walk, reported at the line that constructs the layer). "
        "`when` is a clause `{ field, op, value }` (or `value_field` to compare two fields), or "
        "`all = [...]`, `any = [...]`, `not = {...}` of clauses. A clause on a missing (null) value is false, "
        "except `is-null`. Field names, operators and values are checked when the rules load. "
        "`message` takes `{field.path}` placeholders, with an optional format such as `{sigma_min_rel:.1e}`.",
        "",
        "Operators: " + " ".join(f"`{op}`" for op in OPS) + ".",
        "",
    ]
    for scope in SCOPES:
        names = sorted(root_fields(scope))
        out.append(f"Fields of a `{scope}` rule: " + ", ".join(f"`{n}`" for n in names) + ".")
        out.append("")
    out.append(
        "Dotted paths walk into records: `verdict.status`, `location.line`, `model.batch_size` (layer rules), "
        "`span.rank`, `probe.error`. See rgap_audit/records.py for what each field means."
    )
    return out


def list_rules_text(rules: Sequence[Rule] | None = None) -> str:
    """`rgap-audit rules`: one line per rule: code, severity, scope, name, what it flags."""
    rules = load_rules() if rules is None else list(rules)
    rows = [[r.code, r.severity, r.scope, r.name, r.summary] for r in rules]
    table = tabulate(rows, headers=["code", "severity", "scope", "name", "what it flags"], tablefmt="simple")
    return table + "\n\n`rgap-audit rule CODE` explains one rule.\n"


def _wrap(label: str, text: str) -> list[str]:
    out = [f"{label}:"]
    for para in text.split("\n\n"):
        out += textwrap.wrap(para, WIDTH, initial_indent="  ", subsequent_indent="  ") + [""]
    return out


def explain_rule_text(code: str, rules: Sequence[Rule] | None = None) -> str:
    """`rgap-audit rule CODE`: everything about one rule; AuditError for an unknown code."""
    rule = get_rule(code, rules)
    lines = [f"{rule.code} {rule.name} ({rule.severity}, {rule.scope} rule)", ""]
    lines += _wrap("What it flags", rule.summary)
    lines += _wrap("Why it matters", rule.why)
    lines += _wrap("How to fix it", rule.fix)
    lines += [
        f"Fires when: {rule.condition_text}",
        f"Message: {rule.message.text}",
        f"Suppress: `# rgap: ignore[{rule.code}]` on {_where(rule)}.",
    ]
    return "\n".join(lines) + "\n"


def rules_md_path() -> Path:
    """docs/rules.md of the source tree."""
    return Path(__file__).resolve().parent.parent / "docs" / "rules.md"


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/rules.md (or, with --check, report whether it is up to date)."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = rules_md_path()
    try:
        text = generate_rules_md()
    except AuditError as err:
        print(err.one_line() if err.file else f"error: {err.cause}", file=sys.stderr)
        return 2
    if "--check" in args:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run `python -m rgap_audit.docs`", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
