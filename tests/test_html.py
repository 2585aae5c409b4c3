"""The html format without a browser: it is rendered from the JSON document alone, shows what the
table format shows, keeps what it does not know, parses with html5lib without errors, loads nothing
from the network, and fails with one clear line where it cannot run.

Oracles: the `--format table` rows of the same records (same columns, same values), the JSON
document (the page from `render` of the JSON file equals the page of the run), html5lib's strict parser.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from rgap_audit import cli
from rgap_audit.errors import AuditError
from rgap_audit.formats import render
from rgap_audit.formats.htmlreport import TABLE_HEADERS, render_html
from rgap_audit.formats.jsonreport import report_dict, report_schema
from rgap_audit.formats.table import layer_rows
from rgap_audit.records import Verification
from rgap_audit.rules import evaluate, load_rules
from rgap_audit.verify.images import panel
from rgap_audit.verify.metrics import image_metrics
from rgap_fixtures import deficient_cnn, leaky_mlp, undecided

html5lib = pytest.importorskip("html5lib")
pytest.importorskip("matplotlib")
NS = "{http://www.w3.org/1999/xhtml}"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def reports():
    cnn = deficient_cnn()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rec = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cnn.verification = Verification(attempted=True, confirmed=False, summary="Not confirmed: a test.", rel_error=1e-3, tolerance=1e-6,
                                    panels=[panel("plain R-GAP", x, rec, image_metrics(x, rec))])
    return [leaky_mlp(), cnn, undecided()]


@pytest.fixture
def findings(reports):
    return evaluate(reports, load_rules())


def _parse(text: str):
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=True)
    root = parser.parse(text)
    assert parser.errors == []
    return root


def _cells(tr) -> list[str]:
    return [" ".join(" ".join(td.itertext()).split()) for td in tr.iter(f"{NS}td")]


def test_page_is_the_page_of_its_json_document(reports, findings, tmp_path):
    """`--format html` and `render` of the JSON written by `--format json` give the same page, byte for byte."""
    page = render("html", reports, findings, exit_code=1)
    js = tmp_path / "r.json"
    js.write_text(render("json", reports, findings, exit_code=1))
    doc = json.loads(js.read_text())
    jsonschema.Draft202012Validator(report_schema()).validate(doc)  # exit_code and the panels are in the schema
    assert doc["summary"]["exit_code"] == 1 and doc["models"][1]["verification"]["panels"][0]["tiles"][0]["kind"] == "original"
    assert render_html(doc) == page
    out = tmp_path / "r.html"
    assert cli.main(["render", str(js), "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == page
    assert "exit status <strong>1</strong>" in page


def test_layer_table_has_the_table_formats_columns_and_values(reports, findings):
    root = _parse(render("html", reports, findings))
    tables = [t for t in root.iter(f"{NS}table") if "layers" in (t.get("class") or "")]
    assert len(tables) == len(reports)
    for table, report in zip(tables, reports):
        head = [" ".join(th.itertext()).strip() for th in table.iter(f"{NS}th")]
        assert head[: len(TABLE_HEADERS)] == TABLE_HEADERS
        body = list(next(table.iter(f"{NS}tbody")).iter(f"{NS}tr"))
        want = layer_rows(report)
        assert len(body) == len(want)
        for tr, row in zip(body, want):
            got = _cells(tr)
            # the same values as --format table (its verdict cell shortens the reason; the page keeps it whole)
            assert got[:10] == ["" if v is None else str(v) for v in row[:10]]
            assert got[10].startswith(str(row[10]).split(":")[0])
    deficient = [tr for tr in root.iter(f"{NS}tr") if "deficient" in (tr.get("class") or "").split()]
    assert [_cells(tr)[1] for tr in deficient] == ["conv1"]  # the deficit is marked where it is


def test_findings_carry_rule_text_and_location(reports, findings):
    text = render("html", reports, findings)
    rules = {r.code: r for r in load_rules()}
    for f in findings:
        assert f"{f.file}:{f.line}:{f.col}" in text
        assert rules[f.code].why.split(".")[0].replace("'", "&#x27;").replace('"', "&quot;")[:40] in text


def test_no_network_and_inline_images_only(reports, findings):
    text = render("html", reports, findings)
    root = _parse(text)
    assert not list(root.iter(f"{NS}script")) and not list(root.iter(f"{NS}link"))
    srcs = [e.get("src") for e in root.iter(f"{NS}img")]
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)  # rank charts and the reconstruction
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", text)
    assert "url(" not in text and "@import" not in text


def test_unknown_keys_rows_errors_and_defences_are_shown(reports, findings):
    """A newer schema (a row of a new kind, a defences section, an errors array) renders instead of failing."""
    doc = report_dict(reports, findings)
    doc = copy.deepcopy(doc)
    row = dict(doc["models"][1]["layers"][0], kind="segment", node="seg0", segment_rows=4321)
    doc["models"][1]["layers"].insert(0, row)
    doc["models"][1]["defences"] = {"noise": [{"sigma": 1e-3, "psnr_db": 41.5}, {"sigma": 1e-2, "psnr_db": 17.25}]}
    doc["errors"] = [{"file": "models/bad.py", "line": 7, "model": "Bad", "stage": "load", "message": "cannot import torchvision"}]
    text = render_html(doc)
    _parse(text)
    assert 'data-kind="segment"' in text and "segment_rows" in text and "4321" in text
    assert 'class="defences"' in text and "17.2" in text and "41.5" in text
    assert "models/bad.py:7:" in text and "cannot import torchvision" in text and "[load]" in text


def test_errors_of_the_run_are_on_the_page(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    out = tmp_path / "r.html"
    code = cli.main([str(tmp_path / "broken.py"), "--output", str(out)])  # the extension chooses html
    assert code == 2
    text = out.read_text(encoding="utf-8")
    _parse(text)
    assert "boom at import" in text and "exit status <strong>2</strong>" in text
    assert capsys.readouterr().err.count("\n") == 1  # still one line on stderr


def test_render_subcommand_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": [\n  1,\n')
    assert cli.main(["render", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{bad}:3: error: not a JSON report")
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert cli.main(["render", str(tmp_path / "other.json")]) == 2
    assert "not an rgap-audit JSON report" in capsys.readouterr().err
    assert cli.main(["render", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the report" in capsys.readouterr().err


def test_missing_matplotlib_is_one_clear_line(monkeypatch, tmp_path, capsys, reports, findings):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["examples/paper_nets.py:FCN3", "--format", "html"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'rgap-audit[report]'" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails: the renderer says the same
    with pytest.raises(AuditError, match=r"rgap-audit\[report\]"):
        render("html", reports, findings)


def test_core_audit_never_imports_matplotlib(tmp_path):
    code = (
        "import sys; from rgap_audit import cli; "
        f"rc = cli.main([{str(ROOT / 'examples' / 'paper_nets.py:FCN3')!r}, '--verify', '--format', 'json', '-o', {str(tmp_path / 'r.json')!r}]); "
        "assert rc in (0, 1), rc; print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
    assert json.loads((tmp_path / "r.json").read_text())["models"][0]["verification"]["panels"]  # pictures kept all the same


def test_format_from_extension():
    assert cli.default_format("out/report.html") == "html" and cli.default_format("r.HTM") == "html"
