"""The command line: targets, flags and config precedence, exit codes, one-line errors.

Two layers of tests:
* orchestration tests run `main()` in-process with small stand-in stages (analysis, rules,
  suppression, formats) so that exit codes, selection, config precedence and error handling are
  checked fast and independently of the analysis;
* end-to-end tests run `python -m rgap_audit` in a subprocess on real files with the real stages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from rgap_audit import cli, formats, pipeline
from rgap_audit.errors import AuditError
from rgap_audit.pipeline import split_target
from rgap_audit.records import SEVERITIES, Finding

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def run_cli(*args: str, cwd: Path | str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m rgap_audit ARGS` as a user runs it (no TTY: default format concise)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("CI", None)
    return subprocess.run(
        [sys.executable, "-m", "rgap_audit", *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )


# --------------------------------------------------------------------------- stand-in stages

LEAKY = """
import torch.nn as nn

class Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.out = nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.out(self.fc(x))
"""


class Stages:
    """Stand-in stages (analysis, rules, suppressions, formats, verify) put into the pipeline for one test.

    The fake rules produce, per report, RGAP101 (error) at the model line and RGAP201 (warning) and
    RGAP301 (info) at the first layer's line; a model named `Untraceable` raises a trace error.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: dict[str, list] = {"audit": [], "evaluate": [], "render": [], "verify": []}
        monkeypatch.setattr(pipeline, "build_instance", lambda loaded, options: (loaded, options))
        monkeypatch.setattr(pipeline, "audit_instance", lambda inst, options: types.SimpleNamespace(report=self.audit_loaded(*inst), instance=inst))
        monkeypatch.setattr(pipeline, "load_rules", lambda: ["rule-objects"])
        monkeypatch.setattr(pipeline, "evaluate", self.evaluate)
        monkeypatch.setattr(pipeline, "select_rules", self.select_rules)
        monkeypatch.setattr(
            pipeline,
            "fails",
            lambda findings, fail_on: any(SEVERITIES.index(f.severity) >= SEVERITIES.index(fail_on) for f in findings if not f.suppressed),
        )
        monkeypatch.setattr(pipeline, "apply_suppressions", self.suppress)
        monkeypatch.setattr(pipeline, "verify", self.verify)
        monkeypatch.setattr(pipeline, "settle", lambda verdict, result, batch=1: verdict)
        monkeypatch.setattr(formats, "render", self.render)

    def audit_loaded(self, loaded, options):
        self.calls["audit"].append((loaded, options))
        if loaded.name == "Untraceable":
            raise AuditError("cannot trace with torch.fx: data-dependent control flow", loaded.file, loaded.name, 9)
        first = next(iter(loaded.layer_locations.values()), loaded.location)
        return types.SimpleNamespace(
            file=loaded.file, model=loaded.name, model_line=loaded.location.line, layer_line=first.line, verdict=None, batch_size=1
        )

    def select_rules(self, rules, select=None, ignore=None, extend_select=None):
        for code in (select or []) + (ignore or []) + (extend_select or []):
            if not code.startswith("RGAP"):
                raise AuditError(f"unknown rule code or prefix {code!r} in select")
        return rules

    def evaluate(self, reports, rules, select=None, ignore=None, extend_select=None):
        self.calls["evaluate"].append({"select": select, "ignore": ignore, "extend_select": extend_select})
        out = []
        for r in reports:
            for code, sev, line in (("RGAP101", "error", r.model_line), ("RGAP201", "warning", r.layer_line), ("RGAP301", "info", r.layer_line)):
                chosen = select is None or any(code.startswith(s) for s in select) or any(code.startswith(s) for s in extend_select or [])
                if chosen and not any(code.startswith(i) for i in ignore or []):
                    out.append(Finding(code, "fake", sev, f"{code} fired", r.file, line, 1, r.model))
        return out

    def suppress(self, findings):
        for f in findings:
            text = Path(f.file).read_text().splitlines()[f.line - 1]
            m = re.search(r"#\s*rgap:\s*ignore\[([^\]]*)\]", text)
            if m and f.code in [c.strip() for c in m.group(1).split(",")]:
                f.suppressed = True
        return findings

    def render(self, fmt, reports, findings, show_suppressed=False, rules=None, cwd=None, exit_code=None, errors=()):
        self.calls["render"].append(fmt)
        self.calls.setdefault("errors", []).append(list(errors))
        shown = [f for f in findings if show_suppressed or not f.suppressed]
        lines = [f"{fmt}|{f.file}:{f.line}:{f.col}: {f.code} {f.message}{' (suppressed)' * f.suppressed}\n" for f in shown]
        return "".join(lines + [f"{fmt}|error {e.stage}: {e.message}\n" for e in errors])

    def verify(self, audit, input=None, weights=None, save_images=None, debug=False, seeds=None, criterion=None):
        self.calls["verify"].append({"input": input, "weights": weights, "save_images": save_images})
        self.calls.setdefault("verify_options", []).append((seeds, criterion))
        return {}


@pytest.fixture
def stages(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PRE_COMMIT", raising=False)
    return Stages(monkeypatch)


def main(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- orchestration


def test_exit_codes_and_fail_on(stages, capsys, tmp_path):
    path = write(tmp_path, "leaky.py", LEAKY)
    code, out, err = main(capsys, path)
    assert code == 1 and err == ""
    assert {line.split()[1] for line in out.splitlines()} == {"RGAP101", "RGAP201", "RGAP301"}
    assert out.startswith("concise|")  # not a TTY: concise
    assert main(capsys, path, "--ignore", "RGAP1,RGAP2")[0] == 0  # only info left, fail-on warning
    assert main(capsys, path, "--ignore", "RGAP1,RGAP2", "--fail-on", "info")[0] == 1
    assert main(capsys, path, "--select", "RGAP2", "--fail-on", "error")[0] == 0
    assert stages.calls["evaluate"][-1]["select"] == ["RGAP2"]


def test_suppression_comment_and_show_suppressed(stages, capsys, tmp_path):
    text = LEAKY.replace("class Leaky(nn.Module):", "class Leaky(nn.Module):  # rgap: ignore[RGAP101]")
    text = text.replace("self.fc = nn.Linear(4, 2)", "self.fc = nn.Linear(4, 2)  # rgap: ignore[RGAP201]")
    path = write(tmp_path, "leaky.py", text)
    code, out, _ = main(capsys, path)
    assert code == 0 and "RGAP101" not in out and "RGAP301" in out
    code, out, _ = main(capsys, path, "--show-suppressed")
    assert code == 0 and "RGAP101 RGAP101 fired (suppressed)" in out


def test_config_is_used_and_flags_override_it(stages, capsys, tmp_path):
    path = write(tmp_path, "models/leaky.py", LEAKY)
    write(
        tmp_path,
        "pyproject.toml",
        """
        [tool.rgap-audit]
        ignore = ["RGAP1"]
        extend-select = ["RGAP9"]
        fail-on = "error"
        format = "github"
        seed = 5
        batch-size = 3
        memory-budget-mb = 100

        [tool.rgap-audit.models.Leaky]
        loss = "logistic"

        [tool.rgap-audit.per-file-ignores]
        "models/*.py" = ["RGAP3"]
        """,
    )
    code, out, _ = main(capsys, path)
    assert code == 0  # RGAP101 ignored by config, fail-on error
    assert out.startswith("github|") and "RGAP301" not in out
    loaded, options = stages.calls["audit"][-1]
    assert (options.seed, options.memory_budget_mb, options.batch_size) == (5, 100.0, None)
    assert (loaded.batch_size, loaded.loss) == (3, "logistic")  # config lands on the model, flags on the options
    assert stages.calls["evaluate"][-1] == {"select": None, "ignore": ["RGAP1", "RGAP3"], "extend_select": ["RGAP9"]}

    code, out, _ = main(capsys, path, "--ignore", "RGAP2", "--fail-on", "warning", "--format", "concise", "--seed", "9", "--batch-size", "2", "--extend-select", "RGAP8")
    assert code == 1 and out.startswith("concise|") and "RGAP101" in out
    assert stages.calls["evaluate"][-1] == {"select": None, "ignore": ["RGAP2", "RGAP3"], "extend_select": ["RGAP9", "RGAP8"]}
    loaded, options = stages.calls["audit"][-1]
    assert (options.seed, options.batch_size) == (9, 2)

    code, out, _ = main(capsys, path, "--no-config")
    assert code == 1 and out.startswith("concise|") and "RGAP101" in out
    assert stages.calls["audit"][-1][1].seed == 0


def test_bad_config_is_one_line_exit_2(stages, capsys, tmp_path):
    path = write(tmp_path, "leaky.py", LEAKY)
    write(tmp_path, "pyproject.toml", "[tool.rgap-audit]\nfail_on = 'error'\n")
    code, out, err = main(capsys, path)
    cause = "[tool.rgap-audit] unknown key 'fail_on'; allowed: " + ", ".join(__import__("rgap_audit.config", fromlist=["TOP_KEYS"]).TOP_KEYS)
    assert code == 2 and err.strip() == f"pyproject.toml: error: {cause}"
    assert out == f"concise|error config: {cause}\n"  # the report carries the error too, once
    assert main(capsys, path, "--no-config")[0] == 1


def test_output_file_and_format_from_extension(stages, capsys, tmp_path):
    path = write(tmp_path, "leaky.py", LEAKY)
    code, out, _ = main(capsys, path, "--output", "report.sarif")
    assert code == 1 and out == ""
    assert (tmp_path / "report.sarif").read_text().startswith("sarif|")
    main(capsys, path, "-o", "report.json")
    assert (tmp_path / "report.json").read_text().startswith("json|")
    main(capsys, path, "-o", "report.txt", "--format", "table")
    assert (tmp_path / "report.txt").read_text().startswith("table|")


def test_several_files_continue_past_errors(stages, capsys, tmp_path):
    good = write(tmp_path, "good.py", LEAKY)
    bad = write(tmp_path, "bad.py", "def f(:\n")
    untraceable = write(tmp_path, "untraceable.py", LEAKY.replace("Leaky", "Untraceable"))
    code, out, err = main(capsys, bad, good, str(tmp_path / "missing.py"), untraceable, "--fail-on", "error")
    assert code == 2
    assert err.splitlines() == [
        f"{bad}:1: error: syntax error: invalid syntax",
        f"{tmp_path / 'missing.py'}: error: no such file",
        f"{untraceable}:9: Untraceable: error: cannot trace with torch.fx: data-dependent control flow",
    ]
    assert "good.py" in out and "Traceback" not in err  # the good file was still audited and reported


def test_github_format_annotates_broken_files(stages, capsys, tmp_path):
    bad = write(tmp_path, "bad.py", "import torch\nclass Net(:\n")
    code, out, err = main(capsys, bad, "--format", "github")
    assert code == 2 and err.count("\n") == 1
    (errors,) = stages.calls["errors"]  # the renderer gets the error (formats.github turns it into ::error)
    assert [(e.file, e.line, e.model, e.stage) for e in errors] == [(bad, 2, None, "load")]
    assert out == "github|error load: syntax error: invalid syntax\n"


def test_targets_with_names_are_grouped_per_file(stages, capsys, tmp_path):
    path = write(
        tmp_path,
        "two.py",
        """
        import torch.nn as nn
        def a() -> nn.Module:
            return nn.Linear(3, 1)
        def b() -> nn.Module:
            return nn.Linear(5, 1)
        """,
    )
    code, out, err = main(capsys, f"{path}:b", f"{path}:a", f"{path}:b")
    assert [c[0].name for c in stages.calls["audit"]] == ["b", "a"]
    code, out, err = main(capsys, f"{path}:zz")
    assert code == 2 and err.strip() == f"{path}: zz: error: no model named 'zz' in this file (models here: a, b)"


def test_verify_flags_are_passed_through(stages, capsys, tmp_path):
    path = write(tmp_path, "leaky.py", LEAKY)
    main(capsys, path, "--verify", "--input", "x.pt", "--weights", "w.pt", "--save-images", "out")
    assert stages.calls["verify"] == [{"input": "x.pt", "weights": "w.pt", "save_images": "out"}]
    code, _, err = main(capsys, path, "--weights", "w.pt")
    assert code == 2 and "need --verify" in err


def test_verify_seeds_and_leak_thresholds_from_flags_and_config(stages, capsys, tmp_path):
    path = write(tmp_path, "leaky.py", LEAKY)
    main(capsys, path, "--verify")
    seeds, crit = stages.calls["verify_options"][-1]
    assert (seeds, crit.leak_psnr_db, crit.leak_ssim) == (3, 30.0, 0.9)  # the defaults
    (tmp_path / "pyproject.toml").write_text("[tool.rgap-audit]\nverify-seeds = 5\nleak-psnr = 40\nleak-ssim = 0.8\n")
    main(capsys, path, "--verify")
    seeds, crit = stages.calls["verify_options"][-1]
    assert (seeds, crit.leak_psnr_db, crit.leak_ssim) == (5, 40.0, 0.8)
    assert "40 dB" in crit.rule and "SSIM >= 0.8" in crit.rule  # the definition printed with the verification
    main(capsys, path, "--verify", "--verify-seeds", "2", "--leak-psnr", "25", "--leak-ssim", "0.95")  # flags win
    seeds, crit = stages.calls["verify_options"][-1]
    assert (seeds, crit.leak_psnr_db, crit.leak_ssim) == (2, 25.0, 0.95)
    code, _, err = main(capsys, path, "--verify-seeds", "2")
    assert code == 2 and "need --verify" in err
    for bad in (["--verify-seeds", "0"], ["--leak-ssim", "1.5"], ["--leak-psnr", "-3"]):
        code, _, err = main(capsys, path, "--verify", *bad)
        assert code == 2 and bad[0] in err
    (tmp_path / "pyproject.toml").write_text("[tool.rgap-audit]\nleak-ssim = 2\n")
    code, _, err = main(capsys, path, "--verify")
    assert code == 2 and "leak-ssim must be a number in (0, 1]" in err and "pyproject.toml" in err


def test_allow_no_models_skips_files_without_models(stages, capsys, tmp_path):
    utils = write(tmp_path, "utils.py", "def helper():\n    return 1\n")
    model = write(tmp_path, "leaky.py", LEAKY)
    code, out, err = main(capsys, utils, model, "--allow-no-models", "--fail-on", "error")
    assert code == 1 and err == "" and "leaky.py" in out
    code, _, err = main(capsys, utils, "--allow-no-models")
    assert code == 0 and err == ""
    code, _, err = main(capsys, utils)
    assert code == 2 and "no model found" in err


def test_user_prints_stay_off_stdout(stages, capsys, tmp_path):
    text = LEAKY.replace("import torch.nn as nn", "import sys\nimport torch.nn as nn\nprint('importing')")
    text = text.replace("super().__init__()", "super().__init__()\n        print('building'); print('warn', file=sys.stderr)")
    path = write(tmp_path, "noisy.py", text)
    code, out, err = main(capsys, path, "--format", "json")
    assert out.startswith("json|") and "importing" not in out + err and "building" not in out + err
    code, out, err = main(capsys, path, "--format", "json", "--debug")
    assert "importing" in err and "building" in err and "warn" in err and "importing" not in out


def test_internal_errors_are_one_line_unless_debug(stages, capsys, tmp_path, monkeypatch):
    path = write(tmp_path, "leaky.py", LEAKY)

    def broken(inst, options):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "audit_instance", broken)
    code, _, err = main(capsys, path)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"{path}: Leaky: error: internal error: ZeroDivisionError") and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.main([path, "--debug"])
    assert str(tmp_path) not in sys.path  # the loader's sys.path entry is gone at once, not at interpreter exit


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "no files given"),
        (["x.py", "--format", "xml"], "invalid choice: 'xml'"),
        (["x.py", "--input-shape", "3,a"], "invalid input shape"),
        (["x.py", "--batch-size", "0"], "expected a positive integer"),
        (["x.py", "--fail-on", "fatal"], "invalid choice"),
        (["x.py", "--memory-budget-mb", "-3"], "expected a positive number"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["x.py", "--select", "E501"], "unknown rule code or prefix 'E501'"),
    ],
)
def test_usage_errors_exit_2(stages, capsys, args, needle):
    code, out, err = main(capsys, *args)
    assert code == 2 and needle in err and err.count("\n") == 1 and out == ""


def test_split_target_and_default_format(tmp_path, monkeypatch):
    assert split_target("a/b.py:Net") == ("a/b.py", "Net")
    assert split_target("a/b.py") == ("a/b.py", None)
    assert split_target("a/b.py:CNN6-d") == ("a/b.py", "CNN6-d")
    odd = tmp_path / "odd:name.py"
    odd.write_text("")
    assert split_target(str(odd)) == (str(odd), None)  # an existing path is never split
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PRE_COMMIT", raising=False)
    assert cli.default_format("r.sarif") == "sarif" and cli.default_format("r.sarif.json") == "sarif"
    assert cli.default_format("r.json") == "json" and cli.default_format("r.txt") == "concise"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert cli.default_format(None) == "table"
    monkeypatch.setenv("PRE_COMMIT", "1")
    assert cli.default_format(None) == "concise"


# --------------------------------------------------------------------------- load errors (issue 4, item 7)

# name, file text, words the stderr line must contain, model named in the line
LOAD_ERRORS = [
    ("missing", None, ["no such file"], None),
    ("syntax", "import torch\nclass Net(:\n", [":2:", "syntax error"], None),
    ("import", "import torch\nimport not_a_real_package_xyz\n", [":2:", "importing the file failed", "not_a_real_package_xyz"], None),
    ("nomodel", "import torch\nWIDTH = 3\n", ["no model found"], None),
    ("needsargs", "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self, width):\n        super().__init__()\n", [":2:", "Net(width)", "constructor arguments"], None),
    ("noshape", "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.c = nn.Conv2d(3, 4, 3)\n", [":2:", "input shape unknown", "--input-shape"], "Net"),
    ("toolarge", "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(100_000, 100_000)\n", [":2:", "too large for the memory budget"], "Net"),
    ("ctorfails", "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        raise ValueError('no')\n", [":5:", "constructing the model failed: ValueError: no"], "Net"),
]


@pytest.mark.parametrize("name, text, words, model", LOAD_ERRORS, ids=[e[0] for e in LOAD_ERRORS])
def test_load_error_is_one_line_exit_2(stages, capsys, tmp_path, name, text, words, model):
    path = str(tmp_path / f"{name}.py")
    if text is not None:
        write(tmp_path, f"{name}.py", text)
    code, out, err = main(capsys, path)
    assert code == 2 and out == f"concise|error load: {err.split(' error: ', 1)[1]}"  # in the report too, at stage load
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(path + ":") and all(w in err for w in words), err
    if model:
        assert f": {model}: error: " in err
    assert stages.calls["audit"] == []


def test_load_errors_in_a_real_process(tmp_path):
    """All broken files in one real run: one line each, no traceback, exit 2, the good file still audited."""
    paths = []
    for name, text, _, _ in LOAD_ERRORS:
        if text is not None:
            write(tmp_path, f"{name}.py", text)
        paths.append(f"{name}.py")
    result = run_cli(*paths, "--fail-on", "error", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == len(LOAD_ERRORS), result.stderr
    for line, (name, _, words, model) in zip(lines, LOAD_ERRORS):
        assert line.startswith(f"{name}.py:") and all(w in line for w in words), line
        if model:
            assert f": {model}: error: " in line


# --------------------------------------------------------------------------- end to end (real stages)

UNTRACEABLE = """
import torch
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)
"""

FORWARD_FAILS = """
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        self.out = nn.Linear(5, 1, bias=False)

    def forward(self, x):
        return self.out(self.fc(x))
"""


def test_trace_errors_name_the_line(tmp_path, monkeypatch, capsys):
    """Real stages, in-process (the real-process behaviour is covered above and below)."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "untraceable.py", UNTRACEABLE)
    write(tmp_path, "fails.py", FORWARD_FAILS)
    write(tmp_path, "ok.py", LEAKY)
    code, out, err = main(capsys, "untraceable.py", "fails.py", "ok.py", "--format", "concise")
    assert code == 2 and "Traceback" not in err  # torch.fx's ShapeProp prints one: held back
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("untraceable.py:10: Net: error: ") and "control flow" in lines[0]
    assert lines[1].startswith("fails.py:10: Net: error: ") and "forward failed" in lines[1] and "mat1 and mat2" in lines[1]
    assert "ok.py" in out  # the good file is still reported


def test_example_end_to_end_with_source_locations(tmp_path):
    """The biased MLP: exit 1, a JSON report, findings at the class line and at the `nn.Linear(` call."""
    result = run_cli("examples/mlp_bias.py", "--format", "json")
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    source = (EXAMPLES / "mlp_bias.py").read_text().splitlines()
    fc1 = next(i for i, t in enumerate(source, 1) if "self.fc1" in t)
    cls = next(i for i, t in enumerate(source, 1) if t.startswith("class BiasedMLP"))
    where = {(f["code"], f["node"]): (f["file"], f["line"], f["col"]) for f in report["findings"]}
    assert where[("RGAP201", "fc1")] == ("examples/mlp_bias.py", fc1, source[fc1 - 1].index("nn.Linear") + 1)
    assert where[("RGAP101", None)] == ("examples/mlp_bias.py", cls, 1)


def test_rules_and_rule_subcommands():
    listing = run_cli("rules")
    assert listing.returncode == 0 and "RGAP" in listing.stdout
    code = re.search(r"RGAP\d+", listing.stdout).group(0)
    explained = run_cli("rule", code.lower())
    assert explained.returncode == 0 and code in explained.stdout
    unknown = run_cli("rule", "RGAP999")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "RGAP999" in unknown.stderr


TINY = """
import torch.nn as nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 4, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.fc2 = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
"""


def test_verify_identifiability_and_their_errors(tmp_path, monkeypatch, capsys):
    """Real stages, in-process."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "tiny.py", TINY)
    import torch
    torch.save({"x": 1}, tmp_path / "bad.pt")
    code, out, err = main(capsys, "tiny.py", "--verify", "--identifiability", "--save-images", "img", "--format", "json")
    assert code == 1 and err == "", err
    (model,) = json.loads(out)["models"]
    assert model["verification"]["confirmed"] is True
    ident = model.get("identifiability") or next(w for w in model["warnings"] if w.startswith("identifiability:"))
    assert ident
    assert (tmp_path / "img" / "Tiny-spectrum.png").is_file()
    # a checkpoint that does not fit: one line, exit 2, no traceback
    code, out, err = main(capsys, "tiny.py", "--verify", "--weights", "bad.pt")
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("tiny.py: Tiny: error: --weights") and "bad.pt" in err


def test_a_failing_verify_keeps_the_model_and_its_findings_and_is_one_more_error(tmp_path, monkeypatch, capsys):
    """Real stages, in-process: --verify with a checkpoint that does not fit the model."""
    import jsonschema
    import torch

    from rgap_audit.formats.jsonreport import report_schema

    monkeypatch.chdir(tmp_path)
    write(tmp_path, "tiny.py", TINY)
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
    code, static, _ = main(capsys, "tiny.py", "--format", "json")
    assert code == 1
    base = json.loads(static)
    code, out, err = main(capsys, "tiny.py", "--verify", "--weights", "bad.pt", "--format", "json")
    assert code == 2 and err.count("\n") == 1
    doc = json.loads(out)
    jsonschema.Draft202012Validator(report_schema()).validate(doc)
    (model,) = doc["models"]
    def untimed(layers):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in layers]

    assert model["model"] == "Tiny" and model["verdict"] == base["models"][0]["verdict"]
    assert untimed(model["layers"]) == untimed(base["models"][0]["layers"])
    assert doc["findings"] == base["findings"] and doc["summary"]["findings"] == base["summary"]["findings"] > 0
    cause = err.split(" error: ", 1)[1].strip()
    assert doc["errors"] == [{"file": "tiny.py", "line": None, "model": "Tiny", "stage": "verify", "message": cause}]
    assert model["verification"]["attempted"] is False and cause in model["verification"]["summary"]
    code, out, _ = main(capsys, "tiny.py", "--verify", "--weights", "bad.pt", "--format", "sarif")
    (run,) = json.loads(out)["runs"]
    assert code == 2 and len(run["results"]) == len(base["findings"])
    (inv,) = run["invocations"]
    assert inv["executionSuccessful"] is False and inv["toolExecutionNotifications"][0]["properties"]["stage"] == "verify"
    code, out, _ = main(capsys, "tiny.py", "--verify", "--weights", "bad.pt", "--format", "concise")
    assert code == 2 and out.splitlines()[-1].endswith("; 1 error (verify): the run is incomplete.")
    assert sum(1 for line in out.splitlines() if " RGAP" in line) == len(base["findings"])


def test_a_tuple_output_model_in_a_real_process_with_debug():
    """The R-GAP authors' (logits, shapes) style: audited, and --debug prints no traceback at exit."""
    result = run_cli("tests/data/models_in_the_wild/tuple_outputs.py:LeNetShapes", "--debug", "--format", "json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    import jsonschema

    from rgap_audit.formats.jsonreport import report_schema

    doc = json.loads(result.stdout)
    jsonschema.Draft202012Validator(report_schema()).validate(doc)
    (model,) = doc["models"]
    assert model["output"].startswith("[0] of the tuple of 2") and doc["errors"] == []
