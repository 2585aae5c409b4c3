"""Inline suppressions: `# rgap: ignore[...]` comments on the line a finding points at."""

from __future__ import annotations

from rgap_audit.formats import render
from rgap_audit.rules import evaluate, fails, load_rules
from rgap_audit.suppress import apply, parse_comment, parse_directives, read_directives
from rgap_fixtures import MLP_SOURCE, deficient_cnn, leaky_mlp, line_of, write_source

RULES = load_rules()


def test_directive_forms():
    assert parse_comment("# rgap: ignore") is None  # every code
    assert parse_comment("# rgap: ignore[RGAP101]") == {"RGAP101"}
    assert parse_comment("#rgap:ignore[ rgap101 , RGAP203 ]") == {"RGAP101", "RGAP203"}
    assert parse_comment("# bias kept on purpose  # rgap: ignore[RGAP2]") == {"RGAP2"}
    assert parse_comment("# noqa: RGAP101") is False
    assert parse_comment("# rgap: ignore-file") is False  # not a directive of ours
    assert parse_comment("# rgap: ignore[RGAP101") is False  # unclosed: ignored, never a blanket
    assert parse_comment("# rgap: ignored") is False
    assert parse_comment("# rgap: ignore[]") == frozenset()  # names nothing: suppresses nothing


def test_directives_come_from_comments_only():
    source = '''\
x = "# rgap: ignore"  # a string is not a comment
y = """
# rgap: ignore[RGAP101]
"""
z = 1  # rgap: ignore[RGAP203]
w = 2  # RGAP: IGNORE
'''
    assert parse_directives(source) == {5: {"RGAP203"}, 6: None}


def test_directives_survive_a_file_that_does_not_tokenize_to_the_end():
    source = "a = 1  # rgap: ignore[RGAP101]\nb = (\n"
    assert parse_directives(source) == {1: {"RGAP101"}}


def test_encoding_cookie_is_honoured(tmp_path):
    path = tmp_path / "latin.py"
    path.write_bytes("# -*- coding: latin-1 -*-\nname = 'caf\xe9'  # rgap: ignore[RGAP201]\n".encode("latin-1"))
    assert read_directives(str(path)) == {2: {"RGAP201"}}
    assert read_directives(str(tmp_path / "missing.py")) == {}


def _with_comment(source: str, needle: str, comment: str) -> str:
    lines = source.splitlines()
    i = line_of(source, needle) - 1
    lines[i] += f"  {comment}"
    return "\n".join(lines) + "\n"


def test_a_comment_on_the_layer_line_suppresses_that_code_only(tmp_path):
    source = _with_comment(MLP_SOURCE, "self.fc1 =", "# rgap: ignore[RGAP201]")
    file = write_source(tmp_path, source=source)
    findings = evaluate([leaky_mlp(file, source)], RULES, suppressions=True)
    suppressed = {(f.code, f.node) for f in findings if f.suppressed}
    assert suppressed == {("RGAP201", "fc1")}
    # the model-level error is still active: the run still fails
    assert fails(findings, "error")


def test_the_string_that_looks_like_a_directive_suppresses_nothing(tmp_path):
    file = write_source(tmp_path)  # MLP_SOURCE has "# rgap: ignore[RGAP201]" inside a string on line 3
    report = leaky_mlp(file)
    report.layers[2].location.line = line_of(MLP_SOURCE, "NOTE =")  # point the leak at that line
    findings = evaluate([report], RULES, suppressions=True)
    assert not any(f.suppressed for f in findings)


def test_bare_directive_and_prefixes(tmp_path):
    source = _with_comment(MLP_SOURCE, "class BiasedMLP", "# rgap: ignore")
    source = _with_comment(source, "self.fc1 =", "# rgap: ignore[RGAP2]")
    file = write_source(tmp_path, source=source)
    findings = evaluate([leaky_mlp(file, source)], RULES, suppressions=True)
    by = {(f.code, f.node): f.suppressed for f in findings}
    assert by[("RGAP101", None)] and by[("RGAP201", "fc1")]
    assert by[("RGAP202", "fc2")] is False  # another line
    assert fails(findings, "info")  # fc2's info is still active
    assert not fails(findings, "warning")  # everything at warning or above is accepted


def test_apply_with_in_memory_sources_and_two_models_in_one_file():
    file = "models/mlp.py"
    source = _with_comment(MLP_SOURCE, "self.conv1 =", "# rgap: ignore[RGAP203, RGAP101]")
    findings = evaluate([leaky_mlp(file, source), deficient_cnn(file, source)], RULES)
    assert not any(f.suppressed for f in findings)  # evaluate leaves them alone by default
    out = apply(findings, sources={file: source})
    assert out == findings
    assert {(f.code, f.node) for f in findings if f.suppressed} == {("RGAP203", "conv1")}
    findings2 = evaluate([deficient_cnn(file, source)], RULES, suppressions={file: source})
    assert [f.code for f in findings2 if f.suppressed] == ["RGAP203"]


def test_suppressed_findings_are_hidden_unless_asked_for(tmp_path):
    source = _with_comment(MLP_SOURCE, "self.fc1 =", "# rgap: ignore[RGAP201]")
    file = write_source(tmp_path, source=source)
    report = leaky_mlp(file, source)
    findings = evaluate([report], RULES, suppressions=True)
    hidden = render("concise", [report], findings)
    assert "RGAP201" not in hidden and "1 suppressed" in hidden
    shown = render("concise", [report], findings, show_suppressed=True)
    assert any(line.endswith("[suppressed]") and " RGAP201 " in line for line in shown.splitlines())
