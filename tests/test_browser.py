"""The html report in a real browser: the paper networks' page (FCN3 and CNN6, --verify on the sample
picture) and a small CNN's identifiability page, each rendered from the JSON report by
`rgap-audit render`, opened in headless Chromium.

Claims and oracles: the DOM after load holds the tables and images the JSON report implies (one layer
row per record, one findings row per finding, the verdicts of the JSON); the page asks the network for
nothing (Chromium's net log, checked to catch a page that does make requests); the screenshot is not
blank (pixel variance); html5lib parses the file without a single parse error.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from browser import find_chromium, load

from rgap_audit import cli
from rgap_audit.formats.htmlreport import TABLE_HEADERS, VERIFY_HEADERS

html5lib = pytest.importorskip("html5lib")
pytest.importorskip("matplotlib")
CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get install chromium; .ci/run installs it)")
ROOT = Path(__file__).resolve().parent.parent
NS = "{http://www.w3.org/1999/xhtml}"

SMALL_CNN = """
import torch.nn as nn

def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(3 * 6 * 6, 1, bias=False))

RGAP_MODELS = {"SmallCNN": {"factory": small_cnn, "input_shape": (1, 6, 6), "loss": "logistic"}}
"""


def _run(*args: str) -> int:
    return cli.main(list(args))


def _report(tmp: Path, name: str, *args: str) -> tuple[dict, Path]:
    """--format json for `args`, then `rgap-audit render` of that file: the page comes from the JSON alone."""
    js, page = tmp / f"{name}.json", tmp / f"{name}.html"
    code = _run(*args, "--format", "json", "--output", str(js))
    assert code in (0, 1), code
    assert _run("render", str(js), "-o", str(page)) == 0
    return json.loads(js.read_text()), page


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    nets = str(ROOT / "examples" / "paper_nets.py")
    doc, page = _report(tmp, "paper", f"{nets}:FCN3", f"{nets}:CNN6", "--verify", "--input", "sample")
    return doc, page, load(CHROMIUM, page, tmp / "browser")


def _tree(text: str):
    return html5lib.parse(text, namespaceHTMLElements=True)


def _all(node, tag: str, cls: str | None = None):
    return [e for e in node.iter(f"{NS}{tag}") if cls is None or cls in (e.get("class") or "").split()]


def _text(e) -> str:
    return " ".join(" ".join(e.itertext()).split())


def test_html5lib_parses_the_file_without_errors(paper):
    _, page, _ = paper
    parser = html5lib.HTMLParser(strict=True)
    parser.parse(page.read_text(encoding="utf-8"))  # strict: raises on the first parse error
    assert parser.errors == []


def test_dom_has_the_tables_and_images_the_json_implies(paper):
    doc, _, loaded = paper
    root = _tree(loaded.dom)
    assert "FCN3" in _text(next(root.iter(f"{NS}title")))
    summary = next(t for t in _all(root, "table") if t.get("id") == "summary-table")
    rows = _all(summary, "tr")[1:]
    assert [_text(r).split()[0] for r in rows] == [m["model"] for m in doc["models"]] == ["FCN3", "CNN6"]
    for row, m in zip(rows, doc["models"]):
        assert m["verdict"]["status"] in _text(row) and "confirmed" in _text(row)
    sections = _all(root, "section", "model")
    assert len(sections) == 2
    for sec, m in zip(sections, doc["models"]):
        (layers,) = _all(sec, "table", "layers")
        head = [_text(th) for th in _all(layers, "th")]
        assert head == TABLE_HEADERS + VERIFY_HEADERS + ["details"]
        body = _all(next(layers.iter(f"{NS}tbody")), "tr")
        assert len(body) == len(m["layers"])
        for tr, rec in zip(body, m["layers"]):
            cells = [_text(td) for td in _all(tr, "td")]
            assert cells[2] == rec["op"] and cells[4] == ("" if rec["unknowns"] is None else str(rec["unknowns"]))
            assert cells[9] == ("" if rec["deficit"] is None else str(rec["deficit"]))
        imgs = _all(sec, "img")
        alts = [i.get("alt") for i in imgs]
        assert any("rank against unknowns" in a for a in alts) and any("original, reconstruction" in a for a in alts)
        assert any("relative error per layer" in a for a in alts)
        for img in imgs:  # every picture is inline, a PNG a person can see
            src = img.get("src")
            assert src.startswith("data:image/png;base64,")
            from PIL import Image

            with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
                assert im.format == "PNG" and im.size[0] >= 400
        mine = [f for f in doc["findings"] if f["model"] == m["model"]]
        (findings,) = _all(sec, "table", "findings")
        assert len(_all(findings, "tr", "finding")) == len(mine) > 0
        assert all(f["code"] in _text(findings) for f in mine)
        assert "Why it matters" in _text(findings)  # the rule's text travels with each finding


def test_page_makes_no_network_request(paper, tmp_path):
    _, page, loaded = paper
    assert loaded.page_requests == []
    root = _tree(loaded.dom)
    csp = [m.get("content") for m in _all(root, "meta") if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]
    assert not _all(root, "script") and not _all(root, "link")
    for e in root.iter():
        for attr in ("src", "href", "srcset", "action"):
            value = e.get(attr)
            assert value is None or value.startswith(("data:", "#")), (e.tag, attr, value[:80])
    # the check itself: a page that does load something from the network is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>x</title></head><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    assert load(CHROMIUM, bad, tmp_path / "b", height=400).page_requests == ["http://127.0.0.1:9/x.png"]


def test_screenshot_is_not_blank(paper):
    from PIL import Image

    _, _, loaded = paper
    with Image.open(loaded.screenshot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert px.shape[0] >= 2000 and px.shape[1] == 1280
    grey = px.mean(axis=2)
    assert grey.std() > 20  # text, tables and figures, not a flat page
    assert (grey < 200).mean() > 0.03  # a fair share of ink
    rgb = px.astype(np.int64)
    assert len(np.unique(rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2])) > 200  # the pictures' colours, not just ink on white


def test_identifiability_spectrum_in_the_browser(tmp_path):
    model = tmp_path / "small_cnn.py"
    model.write_text(SMALL_CNN)
    doc, page = _report(tmp_path, "small", str(model), "--identifiability", "--verify")
    loaded = load(CHROMIUM, page, tmp_path / "browser", height=1600)
    assert loaded.page_requests == []
    root = _tree(loaded.dom)
    (sec,) = _all(root, "section", "identifiability")
    assert doc["models"][0]["identifiability"]["summary"] in _text(sec)
    (img,) = _all(sec, "img")
    assert img.get("alt") == "SmallCNN: singular spectrum" and img.get("src").startswith("data:image/png;base64,")
