"""--batch-sizes: the parser, one audit per size, both attackers side by side, the table and the JSON lines.

Oracles: each BatchPoint against a separate audit of the same model at that batch size (rgap_audit.audit,
the static verdict of attacker (a)) and against the first Linear's gradient measured directly (numpy's
rank of dL/dW = sum_n k_n x_n^T, attacker (b)); the JSON document against the shipped schema.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from rgap_audit import cli
from rgap_audit.analysis import audit_model
from rgap_audit.formats.jsonreport import report_schema
from rgap_audit.records import SCHEMA_VERSION
from tests.test_cli import run_cli, write

MLP = """
import torch.nn as nn

class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 6, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Linear(6, 1, bias=False)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))

RGAP_MODELS = {"Mlp": {"factory": Mlp, "input_shape": (12,), "loss": "logistic"}}
"""


def test_batch_sizes_parser() -> None:
    assert cli._batch_sizes("1,2,4,8") == [1, 2, 4, 8]
    assert cli._batch_sizes("1..64") == [1, 2, 4, 8, 16, 32, 64]
    assert cli._batch_sizes("3..20") == [3, 6, 12]
    assert cli._batch_sizes("2, 2, 1") == [2, 1]
    for bad in ("0", "8..2", "a,b", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            cli._batch_sizes(bad)


def test_sweep_json_lines_match_separate_audits(tmp_path: Path) -> None:
    path = write(tmp_path, "mlp.py", MLP)
    out = tmp_path / "r.json"
    proc = run_cli(path, "--batch-sizes", "1,2,3", "--format", "json", "-o", str(out))
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, report_schema())
    assert doc["schema_version"] == SCHEMA_VERSION
    (model,) = doc["models"]
    assert model["batch_size"] == 1  # the report is the first size's
    points = model["batch_sweep"]
    assert [p["batch_size"] for p in points] == [1, 2, 3]
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlp_sweep", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for p in points:
        torch.manual_seed(0)
        checked = audit_model(mod.Mlp(), (12,), batch_size=p["batch_size"], loss="logistic", seed=0)
        rep = checked.report
        assert p["status"] == rep.verdict.status.value
        assert p["input_deficit"] == rep.verdict.input_deficit
        if p["batch_size"] == 1:
            assert p["span_rank"] is None and rep.verdict.attacker is None
            continue
        assert rep.verdict.attacker and "dL/dz" in rep.verdict.attacker
        # attacker (b): the rank of the shared first-layer gradient, measured here with numpy
        inst = checked.instance
        first = next(r.node for r in rep.layers if r.reads_input)
        x = inst.values[inst.graph.data_args(first)[0]].detach().reshape(p["batch_size"], -1).numpy()
        k = inst.grads[first].detach().reshape(p["batch_size"], -1).numpy()
        assert p["span_rank"] == np.linalg.matrix_rank(k.T @ x) == p["batch_size"]
        assert p["span_leak"] is True


def test_sweep_table_and_usage_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "mlp.py", MLP)
    proc = run_cli(path, "--batch-sizes", "1..4", "--format", "table")
    assert proc.returncode in (0, 1), proc.stderr
    text = proc.stdout
    assert "batch sizes (the rows above are batch 1):" in text
    for b in (1, 2, 4):
        assert f"  B={b}: (a) " in text
    assert "attacker: given each sample's dL/dz" not in text.split("batch sizes")[0]  # the B = 1 report names none
    both = run_cli(path, "--batch-size", "2", "--batch-sizes", "1,2")
    assert both.returncode == 2 and "not both" in both.stderr
    bad = run_cli(path, "--batch-sizes", "0,2")
    assert bad.returncode == 2 and "positive integer" in bad.stderr
