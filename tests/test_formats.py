"""Output formats: concise, table, json (against the shipped schema), sarif (against the OASIS
SARIF 2.1.0 schema, vendored in tests/data), github annotations."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict
from pathlib import Path

import jsonschema
import pytest

from rgap_audit import __version__
from rgap_audit.errors import AuditError
from rgap_audit.formats import FORMATS, render
from rgap_audit.formats.jsonreport import report_dict, report_schema
from rgap_audit.formats.sarif import sarif_log
from rgap_audit.records import SCHEMA_VERSION, STAGES, ErrorRecord, Verification, VerifiedLayer
from rgap_audit.rules import evaluate, load_rules
from rgap_fixtures import MLP_SOURCE, deficient_cnn, leaky_mlp, line_of, undecided

DATA = Path(__file__).resolve().parent / "data"
RULES = load_rules()


@pytest.fixture
def reports():
    return [leaky_mlp(), deficient_cnn(), undecided()]


@pytest.fixture
def findings(reports):
    out = evaluate(reports, RULES)
    for f in out:
        if f.code == "RGAP202" and f.node == "conv2":
            f.suppressed = True
    return out


def test_every_format_renders_and_unknown_is_an_error(reports, findings):
    for fmt in FORMATS:
        assert render(fmt, reports, findings).endswith("\n")
        assert render(fmt, [], [])  # nothing audited is still a document / a summary
    with pytest.raises(AuditError, match="unknown format 'xml'"):
        render("xml", reports, findings)


# --------------------------------------------------------------------------- concise
CONCISE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<code>RGAP\d{3}) \[(?P<sev>info|warning|error)\] (?P<msg>.+)$")


def test_concise_lines_sorted_and_summary(reports, findings):
    lines = render("concise", reports, findings).splitlines()
    body, summary = lines[:-1], lines[-1]
    parsed = [CONCISE.match(line) for line in body]
    assert all(parsed), body
    keys = [(m["file"], int(m["line"]), int(m["col"]), m["code"]) for m in parsed]
    assert keys == sorted(keys)
    assert len(body) == len(findings) - 1  # the suppressed one is hidden
    fc1 = line_of(MLP_SOURCE, "self.fc1 =")
    assert f"models/mlp.py:{fc1}:9: RGAP201 [error] BiasedMLP.fc1 (Linear) leaks its input exactly" in "\n".join(body)
    assert summary == "Found 14 findings (2 errors, 4 warnings, 8 info) in 3 models; 1 suppressed (--show-suppressed shows them)."
    clean = render("concise", [deficient_cnn()], [])
    assert clean.strip() == "All checks passed: 1 model, no findings."


# --------------------------------------------------------------------------- table
def test_table_rows_in_walk_order_with_verdicts_and_findings(reports, findings):
    text = render("table", reports, findings)
    for header in ("node", "op", "input", "unknowns", "grad rows", "fwd rows", "rank K", "rank [K;F]", "deficit", "verdict"):
        assert header in text
    cnn = text[text.index(": ReluCNN -"):text.index(": Odd -")]
    rows = [line.split() for line in cnn.splitlines() if re.match(r"^\s+\d+\s", line)]
    assert [r[1] for r in rows] == ["head", "conv2", "relu", "conv1"]
    conv1 = rows[3]
    assert conv1[:11] == ["3", "conv1", "Conv2d", "1x12x17x17", "3468", "2160", "1620", "1968", "3188", "280", "deficient:"]
    assert "verdict: deficient (input recoverable in closed form: no)" in cnn
    assert "rests on: numerical-rank; deficient layers: 1 (total deficit 280)" in cnn
    assert "caveat: A layer-wise deficit is not proof of safety." in cnn
    assert "RGAP203 [info] ReluCNN.conv1" in cnn and "RGAP202 [info] ReluCNN.conv2" not in cnn  # suppressed: hidden
    odd = text[text.index(": Odd -"):]
    assert "300..450" in odd and "input recoverable in closed form: undecided" in odd
    assert "RGAP202 [info] ReluCNN.conv2" in render("table", reports, findings, show_suppressed=True)


def test_table_marks_reused_modules_by_node():
    report = deficient_cnn()
    act = copy.deepcopy(report.layers[2])
    act.node, act.index = "relu_1", 4
    report.layers.append(act)
    text = render("table", [report], [])
    assert "relu [relu]" in text and "relu [relu_1]" in text


# --------------------------------------------------------------------------- json
def test_json_report_validates_against_the_shipped_schema(reports, findings):
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = json.loads(render("json", reports, findings))
    jsonschema.Draft202012Validator(schema).validate(doc)
    assert doc["schema_version"] == SCHEMA_VERSION == schema["properties"]["schema_version"]["const"]
    assert doc["tool"] == {"name": "rgap-audit", "version": __version__}
    assert [m["model"] for m in doc["models"]] == ["BiasedMLP", "ReluCNN", "Odd"]
    assert doc["models"][1]["layers"][3]["deficit"] == 280 and doc["models"][1]["layers"][3]["verdict"] == "deficient"
    assert len(doc["findings"]) == len(findings)  # suppressed ones included, marked
    assert sum(f["suppressed"] for f in doc["findings"]) == 1
    assert doc["summary"] == {
        "models": 3,
        "findings": 14,
        "suppressed": 1,
        "by_severity": {"info": 8, "warning": 4, "error": 2},
        "input_recoverable": 1,
        "undecided": 1,
        "errors": 0,
    }
    empty = json.loads(render("json", [], []))
    jsonschema.Draft202012Validator(schema).validate(empty)


def _broken(doc: dict, path: list, value=..., delete: bool = False) -> dict:
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "delete"),
    [
        (["models", 1, "layers", 3, "verdict"], "leaks_exactly", False),
        (["models", 1, "layers", 3, "basis"], "guess", False),
        (["models", 1, "layers", 3, "chain"], "half", False),
        (["models", 1, "layers", 3, "deficit"], -1, False),
        (["models", 1, "layers", 3, "rank"], None, True),
        (["models", 1, "layers", 3, "surprise"], 1, False),
        (["models", 0, "verdict", "status"], "safe", False),
        (["models", 0, "verdict", "input_recoverable"], "yes", False),
        (["models", 0, "batch_size"], 0, False),
        (["models", 0, "loss"], None, True),
        (["findings", 0, "severity"], "fatal", False),
        (["findings", 0, "code"], "E501", False),
        (["findings", 0, "line"], 0, False),
        (["summary", "by_severity", "error"], None, True),
        (["schema_version"], "0.9", False),
        (["tool"], None, True),
    ],
)
def test_json_schema_rejects_broken_reports(reports, findings, path, value, delete):
    doc = report_dict(reports, findings)
    validator = jsonschema.Draft202012Validator(report_schema())
    validator.validate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(_broken(doc, path, value, delete))


def test_json_non_finite_numbers_become_null(reports):
    reports[1].layers[0].sigma_min_rel = float("nan")
    text = render("json", reports, [])
    assert "NaN" not in text and json.loads(text)["models"][1]["layers"][0]["sigma_min_rel"] is None


# --------------------------------------------------------------------------- sarif
def sarif_validator() -> jsonschema.Draft4Validator:
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema)


def test_sarif_validates_against_the_oasis_schema(reports, findings, tmp_path):
    doc = json.loads(render("sarif", reports, findings, cwd=str(tmp_path)))
    sarif_validator().validate(doc)
    assert doc["version"] == "2.1.0"
    sarif_validator().validate(sarif_log([], [], cwd=str(tmp_path)))
    (run,) = doc["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "rgap-audit" and driver["version"] == __version__
    ids = [r["id"] for r in driver["rules"]]
    assert ids == [r.code for r in RULES]
    leak = driver["rules"][ids.index("RGAP201")]
    assert leak["name"] == "layer-leaks-exactly" and leak["defaultConfiguration"]["level"] == "error"
    assert "bias=False" in leak["help"]["text"] and "Why it matters" in leak["help"]["text"]
    assert leak["shortDescription"]["text"] and leak["fullDescription"]["text"]
    assert driver["rules"][ids.index("RGAP203")]["defaultConfiguration"]["level"] == "note"
    assert len(run["results"]) == len(findings)
    for res in run["results"]:
        assert driver["rules"][res["ruleIndex"]]["id"] == res["ruleId"]
        loc = res["locations"][0]["physicalLocation"]
        assert loc["artifactLocation"]["uriBaseId"] == "%SRCROOT%"
        assert loc["artifactLocation"]["uri"] in ("models/mlp.py", "models/odd.py")
        assert loc["region"]["startLine"] >= 1
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tmp_path.resolve().as_uri() + "/"
    suppressed = [r for r in run["results"] if "suppressions" in r]
    assert [(r["ruleId"], r["properties"]["node"]) for r in suppressed] == [("RGAP202", "conv2")]
    assert suppressed[0]["suppressions"][0]["kind"] == "inSource"
    levels = {r["ruleId"]: r["level"] for r in run["results"]}
    assert levels["RGAP101"] == "error" and levels["RGAP401"] == "warning" and levels["RGAP301"] == "note"


def test_sarif_schema_catches_mistakes(reports, findings):
    doc = sarif_log(reports, findings, cwd="/")
    broken = copy.deepcopy(doc)
    broken["runs"][0]["results"][0]["level"] = "info"  # not a SARIF level
    with pytest.raises(jsonschema.ValidationError):
        sarif_validator().validate(broken)
    broken = copy.deepcopy(doc)
    del broken["runs"][0]["results"][0]["message"]
    with pytest.raises(jsonschema.ValidationError):
        sarif_validator().validate(broken)


def _fingerprints(reports, cwd) -> dict:
    doc = sarif_log(reports, evaluate(reports, RULES), cwd=cwd)
    return {
        (r["ruleId"], r["properties"]["model"], r["properties"]["node"]): (
            r["partialFingerprints"]["rgapFinding/v1"],
            r["locations"][0]["physicalLocation"]["region"]["startLine"],
        )
        for r in doc["runs"][0]["results"]
    }


def test_sarif_fingerprints_are_stable_when_lines_move(tmp_path):
    before = _fingerprints([leaky_mlp(), deficient_cnn()], str(tmp_path))
    moved_source = "# a new header comment\n\n\n" + MLP_SOURCE
    after = _fingerprints([leaky_mlp(source=moved_source), deficient_cnn(source=moved_source)], str(tmp_path))
    assert before.keys() == after.keys()
    for key in before:
        assert before[key][0] == after[key][0]  # same fingerprint ...
        assert before[key][1] + 3 == after[key][1]  # ... though the line moved
    prints = [v[0] for v in before.values()]
    assert len(set(prints)) == len(prints)  # distinct findings, distinct fingerprints
    other_file = _fingerprints([leaky_mlp(file="other/mlp.py")], str(tmp_path))
    assert other_file[("RGAP201", "BiasedMLP", "fc1")][0] != before[("RGAP201", "BiasedMLP", "fc1")][0]


def test_sarif_paths_relative_to_the_working_directory(tmp_path):
    inside = leaky_mlp(file=str(tmp_path / "pkg" / "model.py"))
    outside = deficient_cnn(file="/elsewhere/net.py")
    doc = sarif_log([inside, outside], evaluate([inside, outside], RULES), cwd=str(tmp_path))
    sarif_validator().validate(doc)
    uris = {r["properties"]["model"]: r["locations"][0]["physicalLocation"]["artifactLocation"] for r in doc["runs"][0]["results"]}
    assert uris["BiasedMLP"] == {"uri": "pkg/model.py", "uriBaseId": "%SRCROOT%"}
    assert uris["ReluCNN"] == {"uri": "file:///elsewhere/net.py"}


# --------------------------------------------------------------------------- github
def test_github_annotations(reports, findings):
    lines = render("github", reports, findings).splitlines()
    fc1 = line_of(MLP_SOURCE, "self.fc1 =")
    assert (
        f"::error file=models/mlp.py,line={fc1},col=9,title=RGAP201 layer-leaks-exactly::BiasedMLP.fc1 (Linear) leaks its input exactly: "
        in "\n".join(lines)
    )
    kinds = {}
    for line in lines[:-1]:
        m = re.match(r"^::(error|warning|notice) file=[^,]+,line=\d+,col=\d+,title=(RGAP\d{3}) [a-z-]+::", line)
        assert m, line
        kinds[m.group(2)] = m.group(1)
    assert kinds["RGAP101"] == "error" and kinds["RGAP401"] == "warning" and kinds["RGAP203"] == "notice"
    assert not lines[-1].startswith("::")  # the plain summary line


def test_github_escapes_properties_and_messages():
    report = leaky_mlp(file="dir,with:odd/mlp.py")
    findings = evaluate([report], RULES, select=["RGAP201"])
    findings[0].message = "line one\nline two 100%"
    (line, _) = render("github", [report], findings).splitlines()
    assert "file=dir%2Cwith%3Aodd/mlp.py," in line
    assert line.endswith("::line one%0Aline two 100%25")


# --------------------------------------------------------------------------- end to end (real analysis)
def _analysis_missing() -> str | None:
    try:
        import rgap_audit.analysis  # noqa: F401
    except Exception as exc:
        return f"rgap_audit.analysis not importable ({type(exc).__name__}: {exc})"
    return None


TINY = """\
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 4)  # rgap: ignore[RGAP201]
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
"""


@pytest.mark.skipif(_analysis_missing() is not None, reason=str(_analysis_missing()))
def test_real_reports_validate_and_point_at_constructor_lines(tmp_path, monkeypatch):
    from rgap_audit.analysis import audit_loaded
    from rgap_audit.loader import iter_models
    from rgap_audit.options import AuditOptions

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY)
    options = AuditOptions()
    reports = [audit_loaded(m, options) for m in iter_models("tiny.py", None, options)]
    assert [r.model for r in reports] == ["Tiny"]
    findings = evaluate(reports, RULES, suppressions=True)
    leak = [f for f in findings if f.code == "RGAP201"]
    assert [(f.file, f.line, f.suppressed) for f in leak] == [("tiny.py", line_of(TINY, "self.fc1 ="), True)]
    jsonschema.Draft202012Validator(report_schema()).validate(json.loads(render("json", reports, findings)))
    doc = json.loads(render("sarif", reports, findings))
    sarif_validator().validate(doc)
    assert all(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "tiny.py" for r in doc["runs"][0]["results"])
    table = render("table", reports, findings)
    assert "fc1" in table and "fc2" in table and "verdict:" in table


def test_table_shows_verify_measurements_next_to_the_static_columns():
    report = deficient_cnn()
    layer = next(r for r in report.layers if r.unknowns is not None)
    report.verification = Verification(
        attempted=True,
        confirmed=True,
        summary="Confirmed: measured.",
        rel_error=3e-13,
        layers=[
            VerifiedLayer(
                node=layer.node, module_path=layer.module_path, op=layer.op, static_verdict=None, static_deficit=None,
                measured_nullity=7, rel_error=0.25, method="test", residual_grad=None, residual_fwd=None,
                rel_error_projected=4.2e-12, predicted_error=1e-9, within_conditioning=False, predicted_error_projected=3e-8,
                within_conditioning_projected=True,
            )
        ],
    )
    text = render("table", [report], [])
    header = next(line for line in text.splitlines() if "rank [K;F]" in line)
    assert "measured nullity" in header and "rel. error / predicted (projected)" in header
    row = next(line for line in text.splitlines() if line.split()[:2] == [str(layer.index), layer.module_path or layer.node])
    # each measured error next to what the conditioning predicts; an excess is marked
    assert row.rstrip().endswith("4.2e-12 / 3e-08") and " 0.25 / 1e-09 EXCEEDS " in row
    assert "verification: Confirmed: measured." in text
    # without measurements the columns are not shown
    report.verification = None
    assert "measured nullity" not in render("table", [report], [])


# --------------------------------------------------------------------------- errors (issue 11, item 6)
RUN_ERRORS = [
    ErrorRecord("models/bad.py", 3, None, "load", "syntax error: invalid syntax"),
    ErrorRecord("models/mlp.py", None, "ReluCNN", "verify", "--weights: checkpoint 'w.pt' does not match the model"),
    ErrorRecord(None, None, None, "config", "[tool.rgap-audit] unknown key 'fail_on'"),
]


def test_errors_are_in_the_json_report_and_counted(reports, findings):
    doc = json.loads(render("json", reports, findings, errors=RUN_ERRORS))
    jsonschema.Draft202012Validator(report_schema()).validate(doc)
    assert doc["errors"] == [asdict(e) for e in RUN_ERRORS]
    assert doc["summary"]["errors"] == 3 and doc["summary"]["models"] == 3
    empty = json.loads(render("json", [], [], errors=RUN_ERRORS[:1]))  # nothing audited: still a document that says why
    jsonschema.Draft202012Validator(report_schema()).validate(empty)
    assert empty["models"] == [] and empty["errors"][0]["stage"] == "load" and empty["summary"]["errors"] == 1
    broken = copy.deepcopy(doc)
    broken["errors"][0]["stage"] = "compile"  # not a stage
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(report_schema()).validate(broken)
    stages = report_schema()["$defs"]["error"]["properties"]["stage"]["enum"]
    assert stages == list(STAGES)


def test_errors_are_sarif_tool_execution_notifications(reports, findings, tmp_path):
    clean = sarif_log(reports, findings, cwd=str(tmp_path))
    sarif_validator().validate(clean)
    assert clean["runs"][0]["invocations"] == [{"executionSuccessful": True, "toolExecutionNotifications": []}]
    doc = json.loads(render("sarif", reports, findings, cwd=str(tmp_path), errors=RUN_ERRORS))
    sarif_validator().validate(doc)
    (run,) = doc["runs"]
    (inv,) = run["invocations"]
    assert inv["executionSuccessful"] is False
    notes = inv["toolExecutionNotifications"]
    assert [n["level"] for n in notes] == ["error"] * 3
    assert notes[0]["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "models/bad.py", "uriBaseId": "%SRCROOT%"}, "region": {"startLine": 3},
    }
    assert notes[1]["message"]["text"].startswith("ReluCNN: --weights") and notes[1]["properties"]["stage"] == "verify"
    assert "region" not in notes[1]["locations"][0]["physicalLocation"] and "locations" not in notes[2]
    assert len(run["results"]) == len(findings)  # the findings stay next to the errors
    assert run["properties"]["summary"]["errors"] == 3


def test_errors_are_github_error_annotations_and_in_the_summary_lines(reports, findings):
    lines = render("github", reports, findings, errors=RUN_ERRORS).splitlines()
    assert lines[:3] == [
        "::error file=models/bad.py,line=3,title=rgap-audit (load)::syntax error: invalid syntax",
        "::error file=models/mlp.py,title=rgap-audit (verify)::ReluCNN: --weights: checkpoint 'w.pt' does not match the model",
        "::error title=rgap-audit (config)::[tool.rgap-audit] unknown key 'fail_on'",
    ]
    tail = "; 3 errors (load, verify, config): the run is incomplete."
    assert lines[-1].endswith(tail)
    for fmt in ("concise", "table"):
        text = render(fmt, reports, findings, errors=RUN_ERRORS)
        assert text.splitlines()[-1].startswith("Found 14 findings") and text.splitlines()[-1].endswith(tail), fmt
        nothing = render(fmt, [], [], errors=RUN_ERRORS[:1]).splitlines()[-1]
        assert nothing == "No findings in 0 models; 1 error (load): the run is incomplete.", fmt  # never "All checks passed"
    table = render("table", reports, findings, errors=RUN_ERRORS)
    assert "errors:\n  models/bad.py:3: error: syntax error: invalid syntax (load)\n" in table
    assert render("concise", [], []).strip() == "All checks passed: 0 models, no findings."
