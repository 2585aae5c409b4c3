"""`rgap-audit --defences` end to end on FCN3 (examples/paper_nets.py): the JSON validates against the shipped schema
(2.3) and carries every part; the table prints the block; the html page (from the JSON alone) shows the
defences section with its figure; --save-images writes the curve; the RGAP5xx rules fire with the measured values.
Usage errors are one line and exit code 2. Oracle: the schema, and the records the same run produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from rgap_audit import cli
from rgap_audit.defence import DefenceOptions
from rgap_audit.formats import render
from rgap_audit.formats.jsonreport import report_dict, report_schema
from rgap_audit.pipeline import Pipeline, Request
from rgap_audit.records import SCHEMA_VERSION

pytest.importorskip("opacus")
pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("defences")
    req = Request(targets=[str(ROOT / "examples" / "paper_nets.py:FCN3")], no_config=True, save_images=str(out),
                  defences=DefenceOptions())
    pipe = Pipeline(req, lambda err: None)
    assert pipe.check_selection()
    result = pipe.run()
    assert not result.errors, [e.cause for e in result.errors]
    return result, out


def test_json_has_every_part_and_validates(run):
    result, _ = run
    doc = report_dict(result.reports, result.findings)
    jsonschema.Draft202012Validator(report_schema()).validate(doc)
    assert doc["schema_version"] == SCHEMA_VERSION == "2.4"
    d = doc["models"][0]["defences"]
    assert d["noise"]["sigma_stop"] > 0 and d["noise"]["privacy"]["epsilon_one_release"] > 0
    assert d["compression"]["points"] and d["batch"]["points"][0]["batch_size"] == 1
    # a Linear's gradient alone determines its input (rows k_j x): no narrower width, so no single edit, protects FCN3
    arch = d["architecture"]
    assert arch["tried"] > 0 and arch["best"] is None and arch["edits"] == [] and "no single edit" in arch["summary"]
    codes = {f.code: f.message for f in result.findings}
    noise = result.reports[0].defences.noise
    assert "RGAP501" in codes and f"{noise.sigma_stop:.2g}" in codes["RGAP501"]
    assert "RGAP502" not in codes


def test_table_html_and_images(run):
    result, out = run
    table = render("table", result.reports, result.findings)
    noise = result.reports[0].defences.noise
    assert "defences (measured" in table and noise.summary in table and "architecture:" in table
    page = render("html", result.reports, result.findings)
    assert 'class="defences"' in page and "relative error against the noise multiplier" in page
    assert noise.image is not None and Path(noise.image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(noise.image).parent == out


def test_defence_usage_errors_are_one_line(capsys):
    assert cli.main([str(ROOT / "examples" / "paper_nets.py"), "--clip-norm", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need --defences" in err[0]
    assert cli.main([str(ROOT / "examples" / "paper_nets.py"), "--defences", "noise,bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown part(s) bogus" in err[0]


def test_schema_documents_the_version():
    schema = report_schema()
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert "defences" in json.dumps(schema["$defs"]["model"]["properties"]["defences"])
