"""The rule engine: declarative rule files (rules/*.toml) turned into Findings on the analysis records.

A rule file holds the text a user reads (summary, why, fix), a message template, and a `when`
condition written in a small declarative language over the records of records.py, so a rule is
data that tools can list, document and validate, never code that is executed:

    [when]                                    # one clause ...
    field = "verdict"                         # a field of a LayerRecord (scope "layer") or of
    op = "=="                                 # a ModelReport (scope "model"); dotted paths walk
    value = "leaks-exactly"                   # into records: "verdict.status", "model.batch_size"

    [when]                                    # ... or a combination: all / any / not
    all = [
        { field = "verdict", op = "==", value = "recoverable" },
        { field = "sigma_min_rel", op = "<", value = 1e-4 },
        { field = "rank_lower", op = "<", value_field = "unknowns" },  # compare two fields
    ]

Operators: == != < <= > >= in not-in contains is-null not-null. A clause on a missing (null)
value is false, except `is-null`. Field paths, operators and value types (enum values included)
are checked when the rules are loaded, so a typo is an error, not a rule that never fires.

Selection follows ruff: codes or prefixes ("RGAP2" = every RGAP2xx, "ALL"); when a rule is matched
by both a selector and an ignore, the longer (more specific) prefix wins, an ignore on a tie.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import string
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from rgap_audit.errors import AuditError
from rgap_audit.records import SEVERITIES, Finding, LayerRecord, ModelReport

SCOPES = ("model", "layer")
OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not-in", "contains", "is-null", "not-null")
ORDER_OPS = ("<", "<=", ">", ">=")
RULE_KEYS = ("code", "name", "severity", "scope", "summary", "message", "why", "fix", "when")
CLAUSE_KEYS = ("field", "op", "value", "value_field")
CODE_RE = re.compile(r"^RGAP[0-9]{3}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
SELECTOR_RE = re.compile(r"^(ALL|RGAP[0-9]{0,3})$")
MISSING = "?"  # how a null value prints in a message


class RuleError(AuditError):
    """A rule file that is malformed: unknown key, bad code, bad condition or template."""


# --------------------------------------------------------------------------- field types
@dataclass(frozen=True)
class FieldType:
    """What a field path of the records holds, for checking conditions and templates at load time."""

    kind: str  # "enum", "int", "float", "str", "bool", "list", "dict", "any", "record"
    enum: type[enum.Enum] | None = None
    item: FieldType | None = None  # list items
    record: type | None = None  # dataclass type for kind "record"

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float", "any")


_ANY = FieldType("any")

# Fields computed from the records for convenience in conditions and messages.
_DERIVED: dict[str, dict[str, FieldType]] = {
    "layer": {
        "where": FieldType("str"),  # Model.module.path [node when the module is called at several places]; node for functional calls
        "rank_text": FieldType("str"),  # "1968", or "1900..2000" when only bounds are known
        "model_name": FieldType("str"),
        "is_layer": FieldType("bool"),  # a weighted layer (has rank fields)
    },
    "model": {
        "where": FieldType("str"),
        "model_name": FieldType("str"),
    },
}


def _type_of(hint: Any) -> FieldType:
    """Map a type hint of records.py to a FieldType (Optional is dropped: null is always possible)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _type_of(args[0]) if len(args) == 1 else _ANY
    if origin in (list, tuple, Sequence):
        items = typing.get_args(hint)
        return FieldType("list", item=_type_of(items[0]) if items else _ANY)
    if origin in (dict, Mapping):
        return FieldType("dict")
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return FieldType("enum", enum=hint)
        if hint is bool:
            return FieldType("bool")
        if hint is int:
            return FieldType("int")
        if hint is float:
            return FieldType("float")
        if hint is str:
            return FieldType("str")
        if dataclasses.is_dataclass(hint):
            return FieldType("record", record=hint)
    return _ANY


def _record_fields(cls: type) -> dict[str, FieldType]:
    return dict(_record_fields_once(cls))


@functools.cache
def _record_fields_once(cls: type) -> dict[str, FieldType]:
    """Resolving a record's type hints is most of the time loading the rules takes: once per class."""
    hints = typing.get_type_hints(cls)
    return {f.name: _type_of(hints[f.name]) for f in dataclasses.fields(cls)}


def root_fields(scope: str) -> dict[str, FieldType]:
    """The fields a rule of this scope can name: the record's own, derived ones, `model` for layers."""
    if scope == "layer":
        fields = _record_fields(LayerRecord)
        fields["model"] = FieldType("record", record=ModelReport)
    else:
        fields = _record_fields(ModelReport)
    fields.update(_DERIVED[scope])
    return fields


def field_type(scope: str, path: str) -> FieldType:
    """The FieldType of a dotted field path in a scope; raises KeyError naming the bad part."""
    if not path or any(not part.isidentifier() for part in path.split(".")):
        raise KeyError(f"{path!r} is not a dotted field path")
    fields = root_fields(scope)
    current: FieldType | None = None
    parts = path.split(".")
    for i, part in enumerate(parts):
        if current is not None:
            if current.kind == "dict" or current.kind == "any":
                return _ANY  # free-form dicts (timings, tolerances): any key, any value
            if current.kind != "record":
                raise KeyError(f"{'.'.join(parts[:i])!r} has no fields (it is {current.kind})")
            fields = _record_fields(current.record)  # type: ignore[arg-type]
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise KeyError(f"unknown field {part!r} in {path!r} (scope {scope}; known: {known})")
        current = fields[part]
    assert current is not None
    return current


# --------------------------------------------------------------------------- runtime values
@dataclass
class _Context:
    """What a rule looks at: one report, and one of its records for layer rules."""

    scope: str
    report: ModelReport
    record: LayerRecord | None = None

    def derived(self, name: str) -> Any:
        rec, rep = self.record, self.report
        if name == "model_name":
            return rep.model
        if self.scope == "model":
            return rep.model  # where
        assert rec is not None
        if name == "where":
            if rec.module_path and sum(r.module_path == rec.module_path for r in rep.layers) > 1:
                # a module called at several places: its calls are distinct nodes, name the one meant
                return f"{rep.model}.{rec.module_path} [{rec.node}]"
            return f"{rep.model}.{rec.module_path or rec.node}"
        if name == "is_layer":
            return rec.is_layer
        if name == "rank_text":
            if rec.rank is not None:
                return str(rec.rank)
            if rec.rank_lower is not None or rec.rank_upper is not None:
                lo = MISSING if rec.rank_lower is None else rec.rank_lower
                hi = MISSING if rec.rank_upper is None else rec.rank_upper
                return f"{lo}..{hi}"
            return MISSING
        raise KeyError(name)

    def get(self, path: str) -> Any:
        head, *rest = path.split(".")
        if head in _DERIVED[self.scope]:
            value: Any = self.derived(head)
        elif self.scope == "layer" and head == "model":
            value = self.report
        else:
            value = getattr(self.record if self.scope == "layer" else self.report, head)
        for part in rest:
            if value is None:
                return None
            if isinstance(value, Mapping):
                value = value.get(part)
            else:
                value = getattr(value, part, None)
        return value


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Clause:
    """`field op value` (or `field op value_field`) on the records."""

    field: str
    op: str
    value: Any = None
    value_field: str | None = None

    def test(self, ctx: _Context) -> bool:
        actual = _plain(ctx.get(self.field))
        if self.op == "is-null":
            return actual is None
        if self.op == "not-null":
            return actual is not None
        if actual is None:
            return False
        expected = _plain(ctx.get(self.value_field)) if self.value_field else self.value
        if expected is None:
            return False
        try:
            if self.op == "==":
                return bool(actual == expected)
            if self.op == "!=":
                return bool(actual != expected)
            if self.op == "<":
                return bool(actual < expected)
            if self.op == "<=":
                return bool(actual <= expected)
            if self.op == ">":
                return bool(actual > expected)
            if self.op == ">=":
                return bool(actual >= expected)
            if self.op == "in":
                return actual in expected
            if self.op == "not-in":
                return actual not in expected
            if self.op == "contains":
                return expected in actual
        except TypeError:
            return False  # a free-form field holding something incomparable
        raise AssertionError(self.op)

    def text(self) -> str:
        if self.op in ("is-null", "not-null"):
            return f"{self.field} {self.op}"
        rhs = self.value_field if self.value_field else _literal(self.value)
        return f"{self.field} {self.op} {rhs}"


@dataclass(frozen=True)
class AllOf:
    items: tuple[Condition, ...]

    def test(self, ctx: _Context) -> bool:
        return all(c.test(ctx) for c in self.items)

    def text(self) -> str:
        return " and ".join(_group(c) for c in self.items)


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Condition, ...]

    def test(self, ctx: _Context) -> bool:
        return any(c.test(ctx) for c in self.items)

    def text(self) -> str:
        return " or ".join(_group(c) for c in self.items)


@dataclass(frozen=True)
class Not:
    item: Condition

    def test(self, ctx: _Context) -> bool:
        return not self.item.test(ctx)

    def text(self) -> str:
        return f"not {_group(self.item)}"


Condition = Clause | AllOf | AnyOf | Not


def _group(c: Condition) -> str:
    return f"({c.text()})" if isinstance(c, (AllOf, AnyOf)) and len(c.items) > 1 else c.text()


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def _scalar_ok(ft: FieldType, value: Any) -> str | None:
    """None if `value` can be compared with a field of type ft, else why not."""
    if ft.kind == "any":
        return None if isinstance(value, (str, int, float, bool)) else f"{value!r} is not a scalar"
    if ft.kind == "enum":
        allowed = [m.value for m in ft.enum]  # type: ignore[union-attr]
        return None if value in allowed else f"{value!r} is not one of {', '.join(map(str, allowed))}"
    if ft.kind in ("int", "float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{value!r} is not a number"
    if ft.kind == "bool":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if ft.kind == "str":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    return f"a {ft.kind} field cannot be compared with a value"


def _parse_clause(raw: Mapping[str, Any], scope: str, where: str) -> Clause:
    unknown = [k for k in raw if k not in CLAUSE_KEYS]
    if unknown:
        raise RuleError(f"{where}: unknown key {unknown[0]!r} in a condition (allowed: {', '.join(CLAUSE_KEYS)}, or all/any/not)")
    if "field" not in raw or "op" not in raw:
        raise RuleError(f"{where}: a condition clause needs `field` and `op`")
    path, op = raw["field"], raw["op"]
    if not isinstance(path, str):
        raise RuleError(f"{where}: field must be a string, got {path!r}")
    if op not in OPS:
        raise RuleError(f"{where}: unknown operator {op!r} (allowed: {' '.join(OPS)})")
    try:
        ft = field_type(scope, path)
    except KeyError as exc:
        raise RuleError(f"{where}: {exc.args[0]}") from None
    has_value, has_ref = "value" in raw, "value_field" in raw
    if op in ("is-null", "not-null"):
        if has_value or has_ref:
            raise RuleError(f"{where}: {op} takes no value")
        return Clause(path, op)
    if has_value == has_ref:
        raise RuleError(f"{where}: `{path} {op}` needs exactly one of value, value_field")
    if has_ref:
        ref = raw["value_field"]
        if op not in ("==", "!=") + ORDER_OPS or not isinstance(ref, str):
            raise RuleError(f"{where}: value_field works with == != < <= > >= and names a field")
        try:
            rt = field_type(scope, ref)
        except KeyError as exc:
            raise RuleError(f"{where}: {exc.args[0]}") from None
        comparable = (ft.numeric and rt.numeric) or ft.kind == rt.kind or "any" in (ft.kind, rt.kind)
        if not comparable or (op in ORDER_OPS and not (ft.numeric and rt.numeric)):
            raise RuleError(f"{where}: cannot compare {path} ({ft.kind}) {op} {ref} ({rt.kind})")
        return Clause(path, op, value_field=ref)
    value = raw["value"]
    if op in ORDER_OPS:
        if not ft.numeric:
            raise RuleError(f"{where}: {op} needs a numeric field, {path} is {ft.kind}")
        problem = _scalar_ok(FieldType("float"), value)
    elif op in ("in", "not-in"):
        if not isinstance(value, list) or not value:
            raise RuleError(f"{where}: {op} needs a non-empty list of values")
        problem = next((p for p in (_scalar_ok(ft, v) for v in value) if p), None)
    elif op == "contains":
        if ft.kind == "list":
            problem = _scalar_ok(ft.item or _ANY, value)
        elif ft.kind in ("str", "any"):
            problem = None if isinstance(value, str) else f"{value!r} is not a string"
        else:
            raise RuleError(f"{where}: contains needs a list or string field, {path} is {ft.kind}")
    else:  # == !=
        problem = _scalar_ok(ft, value)
    if problem:
        raise RuleError(f"{where}: `{path} {op}`: {problem}")
    return Clause(path, op, value=value)


def parse_condition(raw: Any, scope: str, where: str = "when") -> Condition:
    """Parse and check a `when` table: a clause, or {all = [...]}, {any = [...]}, {not = {...}}."""
    if not isinstance(raw, Mapping) or not raw:
        raise RuleError(f"{where}: a condition must be a non-empty table")
    combinators = [k for k in ("all", "any", "not") if k in raw]
    if combinators:
        if len(raw) != 1:
            extra = [k for k in raw if k != combinators[0]]
            raise RuleError(f"{where}: {combinators[0]!r} cannot be combined with {extra[0]!r} in one table")
        key = combinators[0]
        body = raw[key]
        if key == "not":
            return Not(parse_condition(body, scope, f"{where}.not"))
        if not isinstance(body, list) or not body:
            raise RuleError(f"{where}.{key} must be a non-empty list of conditions")
        items = tuple(parse_condition(c, scope, f"{where}.{key}[{i}]") for i, c in enumerate(body))
        return AllOf(items) if key == "all" else AnyOf(items)
    return _parse_clause(raw, scope, where)


# --------------------------------------------------------------------------- message templates
@dataclass(frozen=True)
class Template:
    """A message with {field.path} or {field:.1e} placeholders, filled from the records (no eval)."""

    text: str
    parts: tuple[tuple[str, str | None, str], ...]  # (literal, field path or None, format spec)

    def render(self, ctx: _Context) -> str:
        out = []
        for literal, path, spec in self.parts:
            out.append(literal)
            if path is not None:
                out.append(_format_value(ctx.get(path), spec))
        return "".join(out)


def _format_value(value: Any, spec: str) -> str:
    value = _plain(value)
    if value is None:
        return MISSING
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return "x".join(map(str, value))
        return "; ".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if spec:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            pass
    return str(value)


def parse_template(text: Any, scope: str, where: str = "message") -> Template:
    """Check a message template: every placeholder a known field path, no conversions or indexing."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"{where} must be a non-empty string")
    parts: list[tuple[str, str | None, str]] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise RuleError(f"{where}: {exc}") from None
    for literal, path, spec, conversion in parsed:
        if path is None:
            parts.append((literal, None, ""))
            continue
        if conversion is not None or "[" in path or not path:
            raise RuleError(f"{where}: placeholder {{{path}}} must be a plain field path")
        if spec and "{" in spec:
            raise RuleError(f"{where}: nested placeholders are not allowed in {{{path}:{spec}}}")
        try:
            ft = field_type(scope, path)
        except KeyError as exc:
            raise RuleError(f"{where}: {exc.args[0]}") from None
        if spec:
            sample = {"int": 1, "float": 0.5}.get(ft.kind, "x")
            try:
                format(sample, spec)
            except ValueError as exc:
                raise RuleError(f"{where}: bad format {spec!r} for {path} ({ft.kind}): {exc}") from None
        parts.append((literal, path, spec or ""))
    return Template(text, tuple(parts))


# --------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """One rule of the catalogue, as loaded from rules/<CODE>-<name>.toml."""

    code: str
    name: str
    severity: str
    scope: str
    summary: str
    why: str
    fix: str
    message: Template
    when: Condition
    source: str = ""

    def matches(self, report: ModelReport, record: LayerRecord | None = None) -> bool:
        """Whether the rule fires on this report (scope model) or this record of it (scope layer)."""
        return self.when.test(_Context(self.scope, report, record))

    def finding(self, report: ModelReport, record: LayerRecord | None = None) -> Finding:
        """The Finding of this rule on a report / record, at the best source location known."""
        ctx = _Context(self.scope, report, record)
        file, line, col = _location(report, record)
        return Finding(
            code=self.code,
            name=self.name,
            severity=self.severity,
            message=self.message.render(ctx),
            file=file,
            line=line,
            col=col,
            model=report.model,
            node=record.node if record is not None else None,
        )

    @property
    def condition_text(self) -> str:
        return self.when.text()


def _location(report: ModelReport, record: LayerRecord | None) -> tuple[str, int, int]:
    """The layer's constructor line, else the model's definition line, else the file's first line."""
    loc = (record.location if record is not None else None) or report.location
    if loc is None:
        return report.file, 1, 1
    return loc.file or report.file, max(1, int(loc.line)), max(1, int(loc.col))


def _paragraphs(text: str) -> str:
    """Hard-wrapped TOML text -> paragraphs separated by one blank line, each on one line."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(p for p in paras if p)


def parse_rule(raw: Mapping[str, Any], source: str = "<rule>") -> Rule:
    """Validate one rule table (as read from TOML) and build the Rule; RuleError names the problem."""
    unknown = [k for k in raw if k not in RULE_KEYS]
    if unknown:
        raise RuleError(f"unknown key {unknown[0]!r} (allowed: {', '.join(RULE_KEYS)})", file=source)
    missing = [k for k in RULE_KEYS if k not in raw]
    if missing:
        raise RuleError(f"missing key {missing[0]!r}", file=source)
    for key in ("code", "name", "severity", "scope", "summary", "why", "fix"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise RuleError(f"{key} must be a non-empty string", file=source)
    code, name = raw["code"], raw["name"]
    if not CODE_RE.match(code):
        raise RuleError(f"code {code!r} must look like RGAP123", file=source)
    if not NAME_RE.match(name):
        raise RuleError(f"name {name!r} must be kebab-case (lower-case words joined by -)", file=source)
    if raw["severity"] not in SEVERITIES:
        raise RuleError(f"severity {raw['severity']!r} must be one of {', '.join(SEVERITIES)}", file=source)
    scope = raw["scope"]
    if scope not in SCOPES:
        raise RuleError(f"scope {scope!r} must be one of {', '.join(SCOPES)}", file=source)
    try:
        when = parse_condition(raw["when"], scope)
        message = parse_template(raw["message"], scope)
    except RuleError as exc:
        raise RuleError(f"{code}: {exc.cause}", file=source) from None
    return Rule(
        code=code,
        name=name,
        severity=raw["severity"],
        scope=scope,
        summary=" ".join(raw["summary"].split()),
        why=_paragraphs(raw["why"]),
        fix=_paragraphs(raw["fix"]),
        message=message,
        when=when,
        source=source,
    )


def rules_dir() -> Path:
    """Where the rule files are: rgap_audit/_rules in a wheel, else <repo>/rules next to the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_rules", here.parent / "rules"):
        if candidate.is_dir() and any(candidate.glob("*.toml")):
            return candidate
    raise AuditError(f"no rule files found (looked in {here / '_rules'} and {here.parent / 'rules'})")


def load_rules(directory: str | Path | None = None) -> list[Rule]:
    """Load and validate every rules/*.toml (sorted by code); a bad file is a RuleError naming it."""
    folder = Path(directory) if directory is not None else rules_dir()
    rules: list[Rule] = []
    seen_codes: dict[str, str] = {}
    seen_names: dict[str, str] = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise RuleError(f"not valid TOML: {exc}", file=str(path)) from None
        rule = parse_rule(raw, str(path))
        if path.name != f"{rule.code}-{rule.name}.toml":
            raise RuleError(f"file name must be {rule.code}-{rule.name}.toml", file=str(path))
        if rule.code in seen_codes:
            raise RuleError(f"duplicate code {rule.code} (also in {seen_codes[rule.code]})", file=str(path))
        if rule.name in seen_names:
            raise RuleError(f"duplicate name {rule.name} (also in {seen_names[rule.name]})", file=str(path))
        seen_codes[rule.code], seen_names[rule.name] = str(path), str(path)
        rules.append(rule)
    if not rules:
        raise AuditError(f"no rule files in {folder}")
    return sorted(rules, key=lambda r: r.code)


def get_rule(code: str, rules: Iterable[Rule] | None = None) -> Rule:
    """The rule with this code (case-insensitive); AuditError for an unknown code."""
    wanted = code.strip().upper()
    for rule in load_rules() if rules is None else rules:
        if rule.code == wanted:
            return rule
    raise AuditError(f"unknown rule {code!r} (see `rgap-audit rules`)")


# --------------------------------------------------------------------------- selection
def _normalise(selectors: Iterable[str] | None, rules: Sequence[Rule], what: str) -> list[str] | None:
    if selectors is None:
        return None
    out = []
    for raw in selectors:
        sel = str(raw).strip().upper()
        if not sel:
            continue
        if not SELECTOR_RE.match(sel) or (sel != "ALL" and not any(r.code.startswith(sel) for r in rules)):
            raise AuditError(f"unknown rule code or prefix {raw!r} in {what} (see `rgap-audit rules`)")
        out.append(sel)
    return out


def _best(code: str, selectors: Iterable[str]) -> int | None:
    """Length of the most specific selector matching code (ALL counts as 0), None if none does."""
    best = None
    for sel in selectors:
        length = 0 if sel == "ALL" else len(sel)
        if (sel == "ALL" or code.startswith(sel)) and (best is None or length > best):
            best = length
    return best


def select_rules(
    rules: Sequence[Rule],
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    extend_select: Iterable[str] | None = None,
) -> list[Rule]:
    """The rules enabled by ruff-style selectors (None select = all rules); unknown selectors raise."""
    sel = _normalise(select, rules, "select")
    ign = _normalise(ignore, rules, "ignore") or []
    ext = _normalise(extend_select, rules, "extend-select") or []
    chosen = (["ALL"] if sel is None else sel) + ext
    out = []
    for rule in rules:
        s, i = _best(rule.code, chosen), _best(rule.code, ign)
        if s is not None and (i is None or s > i):
            out.append(rule)
    return out


def evaluate(
    reports: Sequence[ModelReport],
    rules: Sequence[Rule] | None = None,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    extend_select: Iterable[str] | None = None,
    suppressions: bool | Mapping[str, str] = False,
) -> list[Finding]:
    """Run the selected rules over the reports: model rules, then layer rules in walk order.

    `suppressions`: False leaves every finding active; True reads each finding's source file for
    `# rgap: ignore[...]` directives; a mapping {file: source text} uses those texts instead.
    """
    all_rules = load_rules() if rules is None else list(rules)
    active = select_rules(all_rules, select, ignore, extend_select)
    model_rules = [r for r in active if r.scope == "model"]
    layer_rules = [r for r in active if r.scope == "layer"]
    findings: list[Finding] = []
    for report in reports:
        for rule in model_rules:
            if rule.matches(report):
                findings.append(rule.finding(report))
        for record in report.layers:
            for rule in layer_rules:
                if rule.matches(report, record):
                    findings.append(rule.finding(report, record))
    if suppressions:
        from rgap_audit.suppress import apply

        apply(findings, sources=suppressions if isinstance(suppressions, Mapping) else None)
    return findings


def fails(findings: Iterable[Finding], fail_on: str) -> bool:
    """Whether any unsuppressed finding is at or above the `fail_on` severity (the exit code 1)."""
    if fail_on not in SEVERITIES:
        raise AuditError(f"fail-on must be one of {', '.join(SEVERITIES)}, got {fail_on!r}")
    threshold = SEVERITIES.index(fail_on)
    return any(not f.suppressed and SEVERITIES.index(f.severity) >= threshold for f in findings)
