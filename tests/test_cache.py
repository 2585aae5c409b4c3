"""The results cache (rgap_audit.cache): a cached run prints what a fresh run prints, and never serves a
stale or corrupt entry.

Oracles: the fresh run of the same file and options (--no-cache) for every cached output; the analysis
patched to fail, so a run that does not fail can only have come from the cache; a change of a layer's
width (in the model file, or in a project file it imports) must give the fresh run's new ranks; the
modules Python itself imported while loading a package model must all be part of the key.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
from pathlib import Path

import pytest

from rgap_audit import cache as cache_mod
from rgap_audit.cli import main

MODEL = """\
import torch.nn as nn

WIDTH = {width}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, WIDTH, 3, stride=2, padding=1, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.fc = nn.Linear(WIDTH * 4 * 4, 1, bias=False)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


RGAP_MODELS = {{"Net": {{"factory": Net, "input_shape": (1, 8, 8)}}}}
"""


@pytest.fixture(autouse=True)
def _cache_on(monkeypatch):
    monkeypatch.delenv("RGAP_AUDIT_NO_CACHE", raising=False)
    monkeypatch.delenv("RGAP_AUDIT_CACHE_DIR", raising=False)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _untimed(obj):
    """The document without wall times (two runs never share them) and the cache mark."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in ("seconds", "timings", "cached")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _json(out: str) -> dict:
    return _untimed(json.loads(out))


def _no_analysis(monkeypatch) -> None:
    from rgap_audit import pipeline

    def boom(*_a, **_k):
        raise AssertionError("the analysis ran: the result did not come from the cache")

    monkeypatch.setattr(pipeline, "audit_instance", boom)


def test_a_cached_run_prints_what_a_fresh_run_prints(tmp_path, capsys, monkeypatch):
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(width=4))
    cdir = tmp_path / "cache"
    fresh = _run(capsys, str(model), "--format", "concise", "--no-cache")
    first = _run(capsys, str(model), "--format", "concise", "--cache-dir", str(cdir))
    assert first == fresh and fresh[0] == 1  # RGAP101 is an error: exit code 1
    assert (cdir / ".gitignore").read_text().splitlines()[-1] == "*"
    assert len(list(cdir.glob("*.entry"))) == 1
    fresh_json = _run(capsys, str(model), "--format", "json", "--no-cache")
    _no_analysis(monkeypatch)
    cached = _run(capsys, str(model), "--format", "concise", "--cache-dir", str(cdir))
    assert cached == fresh
    code, out, _ = _run(capsys, str(model), "--format", "json", "--cache-dir", str(cdir))
    assert code == fresh_json[0]
    assert [m["cached"] for m in json.loads(out)["models"]] == [True]
    assert [m["cached"] for m in json.loads(fresh_json[1])["models"]] == [False]
    assert _json(out)["models"] == _json(fresh_json[1])["models"]
    assert _json(out)["findings"] == _json(fresh_json[1])["findings"]
    table = _run(capsys, str(model), "--format", "table", "--cache-dir", str(cdir))[1]
    assert "from the cache" in table
    # the rules run again on cached reports: another selection gives the fresh run's findings
    sel_cached = _run(capsys, str(model), "--format", "concise", "--cache-dir", str(cdir), "--select", "RGAP2")
    monkeypatch.undo()
    monkeypatch.delenv("RGAP_AUDIT_NO_CACHE", raising=False)
    assert sel_cached == _run(capsys, str(model), "--format", "concise", "--no-cache", "--select", "RGAP2")


def _ranks(out: str) -> list[tuple[int | None, int | None]]:
    return [(layer["unknowns"], layer["rank"]) for layer in json.loads(out)["models"][0]["layers"] if layer["unknowns"] is not None]


def test_changing_a_layer_width_invalidates_the_entry(tmp_path, capsys):
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(width=4))
    cdir = str(tmp_path / "cache")
    before = _run(capsys, str(model), "--format", "json", "--cache-dir", cdir)
    model.write_text(MODEL.format(width=2))
    after = _run(capsys, str(model), "--format", "json", "--cache-dir", cdir)
    fresh = _run(capsys, str(model), "--format", "json", "--no-cache")
    assert [m["cached"] for m in json.loads(after[1])["models"]] == [False]
    assert _ranks(after[1]) == _ranks(fresh[1]) != _ranks(before[1])
    assert len(list(Path(cdir).glob("*.entry"))) == 1  # the edited file's entry replaced the old one


def test_changing_an_imported_project_file_invalidates_the_entry(tmp_path, capsys):
    helper = "rgap_cache_widths"
    (tmp_path / f"{helper}.py").write_text("WIDTH = 4\n")
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(width=f"__import__('{helper}').WIDTH").replace("import torch.nn as nn", f"import torch.nn as nn\nimport {helper}"))
    cdir = str(tmp_path / "cache")
    try:
        before = _run(capsys, str(model), "--format", "json", "--cache-dir", cdir)
        again = _run(capsys, str(model), "--format", "json", "--cache-dir", cdir)
        assert [m["cached"] for m in json.loads(again[1])["models"]] == [True]
        (tmp_path / f"{helper}.py").write_text("WIDTH = 2\n")
        sys.modules.pop(helper, None)  # a new process would import the edited helper
        after = _run(capsys, str(model), "--format", "json", "--cache-dir", cdir)
        sys.modules.pop(helper, None)
        fresh = _run(capsys, str(model), "--format", "json", "--no-cache")
    finally:
        sys.modules.pop(helper, None)
    assert [m["cached"] for m in json.loads(after[1])["models"]] == [False]
    assert _ranks(after[1]) == _ranks(fresh[1]) != _ranks(before[1])


def test_options_that_change_a_report_are_part_of_the_key(tmp_path, capsys):
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(width=4))
    cdir = str(tmp_path / "cache")
    _run(capsys, str(model), "--format", "json", "--cache-dir", cdir)
    for extra in (["--seed", "3"], ["--batch-size", "2"], ["--memory-budget-mb", "500"], ["--identifiability"], ["--no-config"]):
        code, out, _ = _run(capsys, str(model), "--format", "json", "--cache-dir", cdir, *extra)
        assert [m["cached"] for m in json.loads(out)["models"]] == [False], extra


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign-class", "not-reports"])
def test_a_corrupt_entry_is_ignored_with_a_warning(tmp_path, capsys, damage):
    global MARKER
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(width=4))
    cdir = tmp_path / "cache"
    fresh = _run(capsys, str(model), "--format", "concise", "--cache-dir", str(cdir))
    (entry,) = cdir.glob("*.entry")
    data = entry.read_bytes()
    head = data.split(b"\n", 1)[0] + b"\n"
    MARKER = str(tmp_path / "executed")
    body = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00\xffnot an entry at all",
        "foreign-class": head + pickle.dumps([_Evil()]),
        "not-reports": head + pickle.dumps({"a": 1}),
    }[damage]
    entry.write_bytes(body)
    code, out, err = _run(capsys, str(model), "--format", "concise", "--cache-dir", str(cdir))
    assert (code, out) == fresh[:2]
    assert "warning: ignoring a corrupt cache entry" in err and str(entry) in err
    assert not Path(MARKER).exists()  # never unpickled into a call
    # the entry was rewritten: the next run is served from it without a warning
    code, out, err = _run(capsys, str(model), "--format", "json", "--cache-dir", str(cdir))
    assert [m["cached"] for m in json.loads(out)["models"]] == [True] and "warning" not in err


def test_no_cache_verify_and_a_failing_file_write_nothing(tmp_path, capsys):
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(width=4))
    cdir = tmp_path / "cache"
    _run(capsys, str(model), "--format", "concise", "--cache-dir", str(cdir), "--no-cache")
    _run(capsys, str(model), "--format", "concise", "--cache-dir", str(cdir), "--verify", "--verify-seeds", "1")
    assert not list(cdir.glob("*.entry"))
    broken = tmp_path / "broken.py"
    broken.write_text("import torch.nn as nn\nraise RuntimeError('cannot load')\n")
    code, _out, _err = _run(capsys, str(broken), "--format", "concise", "--cache-dir", str(cdir))
    assert code == 2 and not list(cdir.glob("*.entry"))


def test_a_file_without_models_is_served_from_the_cache(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "utils.py"
    plain.write_text("def helper():\n    return 1\n")
    cdir = str(tmp_path / "cache")
    assert _run(capsys, str(plain), "--allow-no-models", "--cache-dir", cdir) == (0, "", "")
    from rgap_audit import pipeline

    def boom(*_a, **_k):
        raise AssertionError("the file was loaded again")

    monkeypatch.setattr(pipeline, "iter_models", boom)
    assert _run(capsys, str(plain), "--allow-no-models", "--cache-dir", cdir) == (0, "", "")


def test_cache_dir_in_the_configuration(tmp_path, capsys, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.rgap-audit]\ncache-dir = "build/rgap"\n')
    model = tmp_path / "net.py"
    model.write_text(MODEL.format(width=4))
    monkeypatch.chdir(tmp_path)
    _run(capsys, "net.py", "--format", "concise")
    assert len(list((tmp_path / "build" / "rgap").glob("*.entry"))) == 1
    assert not (tmp_path / cache_mod.DEFAULT_DIR).exists()
    (tmp_path / "pyproject.toml").write_text("[tool.rgap-audit]\ncache-dir = 3\n")
    code, _out, err = _run(capsys, "net.py", "--format", "concise")
    assert code == 2 and "cache-dir must be a folder path" in err


def test_project_sources_cover_what_python_imports(tmp_path):
    """Every project module Python runs while the loader imports a package's model file is in the key."""
    from rgap_audit.loader import load_models

    data = Path(__file__).parent / "data" / "models_in_the_wild"
    target = data / "flpkg" / "models" / "cnn.py"
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", None) or "").startswith(str(data.resolve()))]:
        sys.modules.pop(name)  # imported by another test: Python must run them again here
    before = set(sys.modules)
    from rgap_audit.options import AuditOptions

    load_models(str(target), None, AuditOptions())
    imported = {
        os.path.abspath(m.__file__)
        for name, m in list(sys.modules.items())
        if name not in before and getattr(m, "__file__", None) and os.path.abspath(m.__file__).startswith(str(data.resolve()))
    }
    sources = set(cache_mod.project_sources(str(target)))
    assert imported and imported <= sources, imported - sources
    assert {str((data / "flpkg" / f).resolve()) for f in ("utils.py", "models/blocks.py", "__init__.py")} <= sources


def test_relative_and_lazy_imports_are_followed(tmp_path):
    pkg = tmp_path / "proj" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "model.py").write_text(
        textwrap.dedent(
            """\
            from .. import shared
            from ..helpers import widths
            def build():
                from . import late
                return late
            """
        )
    )
    (pkg / "shared.py").write_text("")
    (pkg / "helpers.py").write_text("import pkg.deep.leaf\nwidths = 3\n")
    (pkg / "deep").mkdir()
    (pkg / "deep" / "__init__.py").write_text("")
    (pkg / "deep" / "leaf.py").write_text("")
    (pkg / "sub" / "late.py").write_text("")
    (pkg / "unused.py").write_text("")
    got = {os.path.relpath(p, pkg) for p in cache_mod.project_sources(str(pkg / "sub" / "model.py"))}
    assert got == {
        "__init__.py", "sub/__init__.py", "sub/model.py", "shared.py", "helpers.py", "deep/__init__.py", "deep/leaf.py", "sub/late.py",
    }
