"""[tool.rgap-audit]: discovery by walking up, validation, per-model and per-file settings."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rgap_audit.config import find_config, load_config, settings_for
from rgap_audit.errors import AuditError


def pyproject(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(textwrap.dedent(body).lstrip("\n"))
    return path


FULL = """
[project]
name = "demo"

[tool.rgap-audit]
select = ["RGAP1", "rgap2"]
ignore = "RGAP301, RGAP302"
extend-select = ["RGAP9"]
fail-on = "error"
format = "sarif"
batch-size = 2
loss = "cross-entropy"
seed = 7
input-shape = "3x32x32"
memory-budget-mb = 512

[tool.rgap-audit.models.CNN6]
input-shape = [3, 16, 16]
loss = "logistic"

[tool.rgap-audit.per-file-settings."legacy/*.py"]
fail-on = "info"
batch-size = 8
models = { CNN6 = { batch-size = 4 } }

[tool.rgap-audit.per-file-ignores]
"experiments/*.py" = ["RGAP101"]
"test_*.py" = ["RGAP2"]
"""


def test_full_table_is_read_and_resolved(tmp_path):
    pyproject(tmp_path, FULL)
    s = settings_for(str(tmp_path / "models" / "net.py"))
    assert s.select == ["RGAP1", "RGAP2"] and s.ignore == ["RGAP301", "RGAP302"] and s.extend_select == ["RGAP9"]
    assert (s.fail_on, s.format, s.batch_size, s.loss, s.seed) == ("error", "sarif", 2, "cross-entropy", 7)
    assert s.input_shape == (3, 32, 32) and s.memory_budget_mb == 512.0
    assert s.models == {"CNN6": {"input_shape": (3, 16, 16), "loss": "logistic"}}
    assert s.file_ignores == []
    assert s.model_defaults() == {"input_shape": (3, 32, 32), "loss": "cross-entropy", "batch_size": 2}
    assert s.path.endswith("pyproject.toml")

    legacy = settings_for(str(tmp_path / "legacy" / "old.py"))
    assert (legacy.fail_on, legacy.batch_size) == ("info", 8)
    assert legacy.models["CNN6"] == {"input_shape": (3, 16, 16), "loss": "logistic", "batch_size": 4}
    assert settings_for(str(tmp_path / "experiments" / "x.py")).file_ignores == ["RGAP101"]
    assert settings_for(str(tmp_path / "deep" / "er" / "test_net.py")).file_ignores == ["RGAP2"]  # name-only glob


def test_nearest_pyproject_with_the_section_wins(tmp_path):
    pyproject(tmp_path, '[tool.rgap-audit]\nseed = 1\n')
    pyproject(tmp_path / "pkg", '[project]\nname = "inner"\n')  # no section: passed over
    pyproject(tmp_path / "pkg" / "sub", '[tool.rgap-audit]\nseed = 3\n')
    assert settings_for(str(tmp_path / "pkg" / "net.py")).seed == 1
    assert settings_for(str(tmp_path / "pkg" / "sub" / "net.py")).seed == 3
    assert find_config(tmp_path / "pkg" / "sub").path.endswith("sub/pyproject.toml")


def test_no_config_anywhere_is_fine(tmp_path):
    pyproject(tmp_path, '[project]\nname = "x"\n')
    s = settings_for(str(tmp_path / "net.py"))
    assert s.select is None and s.path is None and s.models == {}


def test_changes_to_the_file_are_seen(tmp_path):
    path = pyproject(tmp_path, '[tool.rgap-audit]\nseed = 1\n')
    assert settings_for(str(tmp_path / "a.py")).seed == 1
    path.write_text('[tool.rgap-audit]\nseed = 22\n')
    import os

    os.utime(path, ns=(1, 10**18))  # a different mtime even on coarse clocks
    assert settings_for(str(tmp_path / "a.py")).seed == 22


@pytest.mark.parametrize(
    "body, needle",
    [
        ("[tool.rgap-audit]\nselct = ['RGAP1']\n", "unknown key 'selct'"),
        ("[tool.rgap-audit.models.Net]\ninput_shape = [3]\n", "unknown key 'input_shape'"),
        ("[tool.rgap-audit.per-file-settings.'a.py']\nformat = 'json'\n", "unknown key 'format'"),
        ("[tool.rgap-audit]\nfail-on = 'fatal'\n", "fail-on must be one of info, warning, error"),
        ("[tool.rgap-audit]\nformat = 'xml'\n", "format must be one of"),
        ("[tool.rgap-audit]\nloss = 'mse'\n", "loss must be one of"),
        ("[tool.rgap-audit]\nbatch-size = 0\n", "batch-size must be an integer >= 1"),
        ("[tool.rgap-audit]\nseed = 'x'\n", "seed must be an integer"),
        ("[tool.rgap-audit]\ninput-shape = 'a,b'\n", "input-shape"),
        ("[tool.rgap-audit]\nmemory-budget-mb = -1\n", "memory-budget-mb must be a positive number"),
        ("[tool.rgap-audit]\nselect = 3\n", "select must be a list of rule codes"),
        ("[tool.rgap-audit]\nselect = [\n", "invalid TOML"),
        ("[tool.rgap-audit.models.Net]\nbatch-dim = -1\n", "batch-dim: batch_dim must be an integer >= 0"),
        ("[tool.rgap-audit.models.Net]\noutput = 1.5\n", "output: output must be an index or a key"),
        ("[tool.rgap-audit.models.Net]\nprivate-input = true\n", "private-input: private_input must be a position"),
    ],
)
def test_bad_configuration_names_key_and_file(tmp_path, body, needle):
    path = pyproject(tmp_path, body)
    with pytest.raises(AuditError) as info:
        load_config(path)
    assert needle in info.value.cause
    assert info.value.file == str(path)
    assert "\n" not in info.value.one_line()


def test_per_model_output_and_batch_dim_override_the_declaration(tmp_path):
    """[tool.rgap-audit.models.NAME] output / batch-dim sit above the file's RGAP_MODELS (tests/data models)."""
    import shutil

    from rgap_audit.analysis import audit_instance
    from rgap_audit.instance import build_instance
    from rgap_audit.loader import load_models
    from rgap_audit.options import AuditOptions

    wild = Path(__file__).resolve().parent / "data" / "models_in_the_wild"
    shutil.copy(wild / "tuple_outputs.py", tmp_path / "tuple_outputs.py")
    pyproject(tmp_path, "[tool.rgap-audit.models.FeaturesThenLogits]\noutput = 0\n")
    settings = settings_for(str(tmp_path / "tuple_outputs.py"))
    assert settings.models == {"FeaturesThenLogits": {"output": 0}}
    (m,) = load_models(str(tmp_path / "tuple_outputs.py"), ["FeaturesThenLogits"], AuditOptions(), per_model=settings.models)
    assert m.call.output == 0  # the declaration said 1
    report = audit_instance(build_instance(m, AuditOptions()), AuditOptions()).report
    assert report.output.startswith("[0] of the tuple of 2") and report.input_shape == [1, 12, 12]
    assert report.layers[0].output_shape == [1, 216]  # the features: no layer above them
