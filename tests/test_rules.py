"""The rule catalogue and engine: loading and validation, firing on records, selection, fail-on, docs."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rgap_audit import docs
from rgap_audit.errors import AuditError
from rgap_audit.records import SEVERITIES, Basis, Finding, LayerRecord, Probe, Verdict
from rgap_audit.rules import RuleError, evaluate, fails, load_rules, parse_condition, parse_template, rules_dir, select_rules
from rgap_fixtures import MLP_SOURCE, biased_head, defended, deficient_cnn, leaky_mlp, line_of, undecided

ROOT = Path(__file__).resolve().parent.parent
RULES = load_rules()
CODES = [r.code for r in RULES]


def codes_of(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def by_code(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


# --------------------------------------------------------------------------- the catalogue
def test_catalogue_covers_the_required_rules_with_their_severities():
    table = {r.code: (r.name, r.severity, r.scope) for r in RULES}
    assert table["RGAP101"] == ("input-recoverable", "error", "model")
    assert table["RGAP201"] == ("layer-leaks-exactly", "error", "layer")
    assert table["RGAP202"][1:] == ("info", "layer")
    assert table["RGAP203"] == ("layer-deficient", "info", "layer")
    assert table["RGAP301"] == ("chain-broken", "info", "layer")
    assert table["RGAP401"] == ("op-not-understood", "warning", "layer")
    assert sorted(CODES) == CODES and len(set(CODES)) == len(CODES)
    assert len({r.name for r in RULES}) == len(RULES)
    for r in RULES:
        assert r.summary and len(r.why) > 200 and len(r.fix) > 50, r.code
        assert Path(r.source).name == f"{r.code}-{r.name}.toml"


def test_rule_files_live_in_the_repo_and_the_wheel_ships_them():
    assert rules_dir() in (ROOT / "rules", ROOT / "rgap_audit" / "_rules")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]["rules"] == "rgap_audit/_rules"


def test_every_rule_fires_on_some_fixture_and_stays_quiet_on_another():
    reports = [leaky_mlp(), deficient_cnn(), undecided(), biased_head(), defended()]
    fired = set(codes_of(evaluate(reports, RULES)))
    assert fired == set(CODES)  # the fixtures exercise every condition
    for report in reports:
        assert set(codes_of(evaluate([report], RULES))) != set(CODES)


# --------------------------------------------------------------------------- firing on records
def test_leaky_linear_fires_and_points_at_its_constructor_line():
    findings = evaluate([leaky_mlp()], RULES)
    leak = by_code(findings, "RGAP201")
    assert len(leak) == 1
    f = leak[0]
    assert (f.file, f.line, f.col, f.node, f.model) == ("models/mlp.py", line_of(MLP_SOURCE, "self.fc1 ="), 9, "fc1", "BiasedMLP")
    assert f.severity == "error" and f.name == "layer-leaks-exactly"
    assert f.message.startswith("BiasedMLP.fc1 (Linear) leaks its input exactly: Linear with bias")
    model = by_code(findings, "RGAP101")
    assert [(m.line, m.col, m.node) for m in model] == [(line_of(MLP_SOURCE, "class BiasedMLP"), 1, None)]
    assert "leaks-exactly" in model[0].message
    # the recoverable fc2 is a layer-recoverable info, not a leak
    assert [f.node for f in by_code(findings, "RGAP202")] == ["fc2"]


def test_a_biased_head_leaks_features_as_a_warning_and_the_model_keeps_its_verdict_severity():
    """Severity policy (issue 11): a biased Linear that does not read the model input leaks internal
    features (RGAP205, warning), not the private input (RGAP201, error); the model-level finding
    carries the severity of the model verdict (here not recoverable: RGAP103, info)."""
    findings = evaluate([biased_head()], RULES)
    (head,) = by_code(findings, "RGAP205")
    assert head.node == "head" and head.severity == "warning" and "internal features" in head.message
    assert not by_code(findings, "RGAP201") and not by_code(findings, "RGAP101")
    assert [(f.code, f.severity) for f in findings if f.node is None] == [("RGAP103", "info")]
    assert max(SEVERITIES.index(f.severity) for f in findings) == SEVERITIES.index("warning")


def test_model_findings_carry_the_severity_of_the_model_verdict():
    severity = {True: "error", None: "warning", False: "info"}
    for report in (leaky_mlp(), deficient_cnn(), undecided(), biased_head()):
        model_level = [f for f in evaluate([report], RULES, select=["RGAP1"]) if f.code in ("RGAP101", "RGAP102", "RGAP103")]
        assert [f.severity for f in model_level] == [severity[report.verdict.input_recoverable]], report.model


def test_safe_and_deficient_records_do_not_fire_the_leak_rules():
    findings = evaluate([deficient_cnn()], RULES)
    assert not by_code(findings, "RGAP101") and not by_code(findings, "RGAP201")
    (deficient,) = by_code(findings, "RGAP203")
    assert deficient.node == "conv1" and "280 directions undetermined" in deficient.message and "3188 of 3468" in deficient.message
    (model,) = by_code(findings, "RGAP103")
    assert "280 input directions" in model.message and "not proof of safety" in model.message
    (broken,) = by_code(findings, "RGAP301")
    assert broken.node == "relu" and broken.severity == "info"
    (cond,) = by_code(findings, "RGAP204")
    assert cond.node == "head" and "3.0e-07" in cond.message  # the format spec of the template
    assert {f.node for f in by_code(findings, "RGAP202")} == {"head", "conv2"}


def test_undecided_model_warns_and_falls_back_to_the_file_when_nothing_has_a_location():
    findings = evaluate([undecided()], RULES)
    assert set(codes_of(findings)) == {"RGAP102", "RGAP202", "RGAP401", "RGAP402", "RGAP403", "RGAP404"}
    (span,) = by_code(findings, "RGAP404")
    assert span.severity == "warning" and "4-dimensional subspace" in span.message and "3e-16" in span.message
    assert all((f.file, f.line, f.col) == ("models/odd.py", 1, 1) for f in findings)
    (bounds,) = by_code(findings, "RGAP402")
    assert "300..450 of 400" in bounds.message
    (unknown,) = by_code(findings, "RGAP401")
    assert unknown.node == "fft_1" and "never counted as safe" in unknown.message


def test_layer_without_location_falls_back_to_the_model_line():
    report = deficient_cnn()
    report.layers[3].location = None
    (f,) = by_code(evaluate([report], RULES), "RGAP203")
    assert (f.line, f.col) == (line_of(MLP_SOURCE, "class ReluCNN"), 1)


def test_messages_have_no_placeholders_left_and_findings_come_in_walk_order():
    findings = evaluate([leaky_mlp(), deficient_cnn(), undecided()], RULES)
    assert all("{" not in f.message and "}" not in f.message for f in findings)
    cnn = [f.node for f in findings if f.model == "ReluCNN" and f.node]
    assert cnn == ["head", "head", "conv2", "relu", "conv1"]  # output first, like the walk


@settings(max_examples=60, deadline=None)
@given(
    verdict=st.sampled_from(list(Verdict)), sigma=st.one_of(st.none(), st.floats(0, 1)), deficit=st.integers(0, 500),
    reads_input=st.booleans(),
)
def test_verdict_rules_fire_exactly_on_their_verdict(verdict, sigma, deficit, reads_input):
    report = deficient_cnn()
    rec = report.layers[1]
    rec.verdict, rec.sigma_min_rel, rec.deficit, rec.reads_input = verdict, sigma, deficit, reads_input
    report.layers = [rec]
    fired = {f.code for f in evaluate([report], RULES, select=["RGAP2", "RGAP3", "RGAP401"])}
    expect = {
        Verdict.LEAKS_EXACTLY: {"RGAP201"} if reads_input else {"RGAP205"},  # the private input, or internal features
        Verdict.RECOVERABLE: {"RGAP202"},
        Verdict.DEFICIENT: {"RGAP203"},
        Verdict.CHAIN_BROKEN: {"RGAP301"},
        Verdict.NOT_UNDERSTOOD: {"RGAP401"},
        Verdict.PASSES: set(),
    }[verdict]
    if verdict == Verdict.RECOVERABLE and sigma is not None and sigma < 1e-4:
        expect = expect | {"RGAP204"}
    assert fired == expect


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    ("select", "ignore", "extend", "expected"),
    [
        (None, None, None, set(CODES)),
        (["RGAP2"], None, None, {c for c in CODES if c.startswith("RGAP2")}),
        (["rgap20"], None, None, {c for c in CODES if c.startswith("RGAP20")}),
        (["RGAP2"], ["RGAP20"], None, set()),
        (["RGAP201"], ["RGAP2"], None, {"RGAP201"}),  # the more specific selector wins
        (["RGAP2"], ["RGAP2"], None, set()),  # a tie goes to ignore
        (["RGAP1"], None, ["RGAP301"], {c for c in CODES if c.startswith("RGAP1")} | {"RGAP301"}),
        (None, ["RGAP1", "RGAP4"], None, {c for c in CODES if c[4] in "235"}),
        (["ALL"], ["RGAP"], None, set()),
        ([], None, ["RGAP403"], {"RGAP403"}),
    ],
)
def test_prefix_selection(select, ignore, extend, expected):
    assert {r.code for r in select_rules(RULES, select, ignore, extend)} == expected


def test_selection_applies_to_evaluate():
    reports = [leaky_mlp(), deficient_cnn()]
    assert set(codes_of(evaluate(reports, RULES, select=["RGAP2"], ignore=["RGAP202"]))) == {"RGAP201", "RGAP203", "RGAP204"}
    assert codes_of(evaluate(reports, RULES, select=["RGAP101"])) == ["RGAP101"]


@pytest.mark.parametrize("bad", ["RGAP9", "RGAP1011", "E501", "RGAP99"])
def test_unknown_selectors_are_errors(bad):
    with pytest.raises(AuditError, match="unknown rule code or prefix"):
        select_rules(RULES, [bad])
    with pytest.raises(AuditError, match=bad):
        evaluate([leaky_mlp()], RULES, ignore=[bad])


# --------------------------------------------------------------------------- fail-on
def _finding(severity: str, suppressed: bool = False) -> Finding:
    return Finding("RGAP999", "x", severity, "m", "f.py", 1, 1, "M", suppressed=suppressed)


def test_fails_at_or_above_the_threshold_and_never_on_suppressed():
    assert fails([_finding("warning")], "warning") and fails([_finding("error")], "warning")
    assert not fails([_finding("info")], "warning") and fails([_finding("info")], "info")
    assert not fails([_finding("error", suppressed=True)], "info")
    assert not fails([], "info")
    with pytest.raises(AuditError, match="fail-on"):
        fails([], "fatal")
    findings = evaluate([deficient_cnn()], RULES)  # info only
    assert not fails(findings, "warning") and fails(findings, "info")
    assert fails(evaluate([leaky_mlp()], RULES), "error")


# --------------------------------------------------------------------------- validation of rule files
GOOD = """
code = "RGAP901"
name = "test-rule"
severity = "warning"
scope = "layer"
summary = "s"
why = "w"
fix = "f"
message = "{where}: {deficit} of {unknowns}"

[when]
field = "deficit"
op = ">"
value = 0
"""


def write_rule(folder: Path, text: str, name: str = "RGAP901-test-rule.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_a_valid_custom_rule_loads_and_fires(tmp_path):
    (rule,) = load_rules(write_rule(tmp_path, GOOD))
    assert rule.code == "RGAP901" and rule.condition_text == "deficit > 0"
    findings = evaluate([deficient_cnn()], [rule])
    assert [(f.node, f.message) for f in findings] == [("conv1", "ReluCNN.conv1: 280 of 3468")]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (("severity = \"warning\"", "severity = \"fatal\""), "severity"),
        (("scope = \"layer\"", "scope = \"net\""), "scope"),
        (("code = \"RGAP901\"", "code = \"R901\""), "RGAP123"),
        (("name = \"test-rule\"", "name = \"Test_Rule\""), "kebab-case"),
        (("fix = \"f\"", "fix = \"f\"\nautofix = true"), "unknown key 'autofix'"),
        (("fix = \"f\"", ""), "missing key 'fix'"),
        (("op = \">\"", "op = \"~=\""), "unknown operator"),
        (("field = \"deficit\"", "field = \"defecit\""), "unknown field 'defecit'"),
        (("field = \"deficit\"", "field = \"location.row\""), "unknown field 'row'"),
        (("field = \"deficit\"", "field = \"reason\""), "numeric field"),
        (("value = 0", "value = \"0\""), "not a number"),
        (("value = 0", "value = 0\nvalue_field = \"rank\""), "exactly one of value, value_field"),
        (("message = \"{where}: {deficit} of {unknowns}\"", "message = \"{reason!r}\""), "plain field path"),
        (("message = \"{where}: {deficit} of {unknowns}\"", "message = \"{model.nonsense}\""), "unknown field 'nonsense'"),
        (("message = \"{where}: {deficit} of {unknowns}\"", "message = \"{deficit:.2q}\""), "bad format"),
        (("message = \"{where}: {deficit} of {unknowns}\"", "message = \"{where.__class__}\""), "no fields"),
        (("[when]", "[when.any]"), "non-empty list"),
    ],
)
def test_bad_rule_files_are_clear_errors(tmp_path, change, error):
    old, new = change
    assert old in GOOD
    folder = write_rule(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RuleError, match=error) as info:
        load_rules(folder)
    assert info.value.file and info.value.file.endswith("RGAP901-test-rule.toml")


def test_enum_values_are_checked(tmp_path):
    text = GOOD.replace('field = "deficit"\nop = ">"\nvalue = 0', 'field = "verdict"\nop = "=="\nvalue = "leaks_exactly"')
    with pytest.raises(RuleError, match="not one of leaks-exactly"):
        load_rules(write_rule(tmp_path, text))


def test_file_name_duplicates_and_toml_errors(tmp_path):
    with pytest.raises(RuleError, match="file name must be RGAP901-test-rule.toml"):
        load_rules(write_rule(tmp_path / "a", GOOD, name="RGAP901.toml"))
    folder = write_rule(tmp_path / "b", GOOD)
    write_rule(folder, GOOD.replace("name = \"test-rule\"", "name = \"other\""), name="RGAP901-other.toml")
    with pytest.raises(RuleError, match="duplicate code RGAP901"):
        load_rules(folder)
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules(write_rule(tmp_path / "c", "code = \n"))
    with pytest.raises(AuditError, match="no rule files"):
        load_rules(tmp_path / "empty")


# --------------------------------------------------------------------------- the condition language
def _rec(**kw) -> LayerRecord:
    base = dict(index=0, node="n", op="Linear", kind="layer", module_path=None, input_shape=[1, 4], output_shape=[1, 2])
    return LayerRecord(**{**base, **kw})


def _test(cond: dict, rec: LayerRecord, scope: str = "layer") -> bool:
    from rgap_audit.rules import _Context

    report = deficient_cnn()
    return parse_condition(cond, scope).test(_Context(scope, report, rec if scope == "layer" else None))


def test_condition_semantics():
    rec = _rec(unknowns=10, rank=8, deficit=2, verdict=Verdict.DEFICIENT, samples=3, probe=Probe(error=1e-9, iterations=4))
    assert _test({"field": "deficit", "op": ">", "value": 1}, rec)
    assert not _test({"field": "sigma_min_rel", "op": "<", "value": 1}, rec)  # null: false ...
    assert not _test({"field": "sigma_min_rel", "op": "!=", "value": 1}, rec)  # ... whatever the operator
    assert _test({"field": "sigma_min_rel", "op": "is-null"}, rec)
    assert _test({"not": {"field": "sigma_min_rel", "op": "<", "value": 1}}, rec)
    assert _test({"field": "verdict", "op": "in", "value": ["deficient", "recoverable"]}, rec)
    assert not _test({"field": "verdict", "op": "not-in", "value": ["deficient"]}, rec)
    assert _test({"field": "rank", "op": "<", "value_field": "unknowns"}, rec)
    assert _test({"field": "samples", "op": "==", "value": 3}, rec)
    assert _test({"field": "probe.iterations", "op": "==", "value": 4}, rec)  # a dotted path into a sub-record
    assert not _test({"field": "span.rank", "op": "==", "value": 3}, rec)  # ... one that is absent (null): false
    assert _test({"any": [{"field": "deficit", "op": "==", "value": 0}, {"field": "op", "op": "contains", "value": "Lin"}]}, rec)
    assert not _test({"all": [{"field": "deficit", "op": "==", "value": 0}, {"field": "op", "op": "==", "value": "Linear"}]}, rec)
    assert _test({"field": "model.batch_size", "op": "==", "value": 1}, rec)
    assert _test({"field": "model.verdict.caveats", "op": "contains", "value": "A layer-wise deficit is not proof of safety."}, rec)
    assert _test({"field": "verdict.status", "op": "==", "value": "deficient"}, None, scope="model")
    with pytest.raises(RuleError, match="cannot be combined"):
        parse_condition({"all": [{"field": "deficit", "op": "is-null"}], "field": "x"}, "layer")
    with pytest.raises(RuleError, match="takes no value"):
        parse_condition({"field": "deficit", "op": "is-null", "value": 1}, "layer")
    with pytest.raises(RuleError, match="cannot compare"):
        parse_condition({"field": "deficit", "op": "<", "value_field": "reason"}, "layer")
    with pytest.raises(RuleError, match="unknown field 'deficit'"):
        parse_condition({"field": "deficit", "op": "is-null"}, "model")  # a layer field in a model rule


def test_templates_render_missing_values_and_lists():
    from rgap_audit.rules import _Context

    tpl = parse_template("{where} {rank_text} {sigma_min_rel:.1e} {input_shape} {model_name} {verdict}", "layer")
    rec = _rec(module_path="blocks.0.conv", rank_lower=5, rank_upper=9, verdict=Verdict.RECOVERABLE, basis=Basis.BOUNDS)
    assert tpl.render(_Context("layer", deficient_cnn(), rec)) == "ReluCNN.blocks.0.conv 5..9 ? 1x4 ReluCNN recoverable"


# --------------------------------------------------------------------------- generated docs
def test_docs_rules_md_is_up_to_date_with_the_rule_files():
    current = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    assert current == docs.generate_rules_md(RULES), "docs/rules.md is stale: run `python -m rgap_audit.docs`"
    assert docs.main(["--check"]) == 0


def test_generated_docs_have_one_section_per_rule_with_why_and_fix():
    text = docs.generate_rules_md(RULES)
    for r in RULES:
        assert f"### {r.code} {r.name}" in text
        assert r.why.split("\n\n")[0] in text and r.fix.split("\n\n")[0] in text
        assert f"**Severity:** {r.severity}" in text
    changed = [r for r in RULES]
    import dataclasses

    changed[0] = dataclasses.replace(changed[0], summary="something else")
    assert docs.generate_rules_md(changed) != text  # the check above can fail


def test_rules_listing_and_explanation():
    listing = docs.list_rules_text()
    for r in RULES:
        assert r.code in listing and r.name in listing
    text = docs.explain_rule_text("rgap201")
    rule = next(r for r in RULES if r.code == "RGAP201")
    assert text.startswith("RGAP201 layer-leaks-exactly (error, layer rule)")
    assert "Why it matters:" in text and "How to fix it:" in text and "bias=False" in text
    assert "# rgap: ignore[RGAP201]" in text and rule.condition_text in text
    with pytest.raises(AuditError, match="RGAP999"):
        docs.explain_rule_text("RGAP999")


def test_severities_are_the_records_ones():
    assert {r.severity for r in RULES} <= set(SEVERITIES)


def test_a_module_called_twice_is_named_per_call():
    """One ReLU object used at two places gives two nodes; their findings must not read as duplicates."""
    import torch
    import torch.nn as nn

    from rgap_audit.analysis import audit

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False), nn.ReLU()
            self.head = nn.Linear(6, 1, bias=False)

        def forward(self, x):
            return self.head(self.act(self.b(self.act(self.a(x)))))

    torch.manual_seed(0)
    rep = audit(Shared(), (6,))
    relu = [f.message for f in evaluate([rep], RULES) if f.code == "RGAP301"]
    nodes = [r.node for r in rep.layers if r.module_path == "act"]
    assert len(nodes) == 2 and len(relu) == 2 and len(set(relu)) == 2
    assert all(any(f"act [{n}]" in m for m in relu) for n in nodes)
    head = [f.message for f in evaluate([rep], RULES) if "Shared.head" in f.message]
    assert head and all("[" not in m.split(" (")[0] for m in head)  # a module called once keeps its plain path


def test_the_severity_policy_in_the_docs_matches_the_rule_files():
    """docs/rules.md states the severity of every rule; the rule files are the oracle. Each code is
    read with the severity word nearest to it in the text ("... (RGAP102) a warning")."""
    import re as _re

    text = " ".join(docs.SEVERITY_POLICY)
    words = [(m.start(), m.end(), m.group(1)) for m in _re.finditer(r"\b(error|warning|info)s?\b", text)]
    stated = {}
    for m in _re.finditer(r"RGAP\d{3}", text):
        dist = [(min(abs(m.start() - b), abs(a - m.end())), w) for a, b, w in words]
        stated[m.group(0)] = min(dist)[1]
    assert stated == {r.code: r.severity for r in RULES}  # every rule placed, each at its own severity
