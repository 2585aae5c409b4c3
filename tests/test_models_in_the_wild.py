"""Model files as people write them (issue 11), each a small file of ours in tests/data/models_in_the_wild.

The claim of each test and its oracle:
* tuple / list / dict / dataclass outputs: the audit of the net returning (logits, extras) equals the
  audit of the same net returning its logits alone, and the shared gradient the instance holds is
  autograd's gradient of the cross-entropy of the declared (or first) output of the user's own model;
* packages: a file with relative imports loads by path and by dotted module name, with locations in
  the audited file, and leaves sys.path as it was;
* an import the model does not need: one error naming the module, the line and the remedy;
* forward(input, hidden), sequence-first: the traced graph computes the user's forward on the
  permuted input with the example hidden state (compared with a direct call), integer token ids stay
  integer, the gradient is autograd's of the NLL loss; a sequence-first net audits exactly as its
  batch-first twin;
* log-softmax heads: audited as the same net without the log-softmax (CE(log_softmax(z)) = CE(z)), the
  gradient is autograd's NLL gradient; the attack recovers the input; a softmax head is "not attempted"
  and its static report stays;
* GRU: not understood, with the recurrent reason (never "the input feeds several branches");
* einops Rearrange: audited exactly as the same net written with torch's permute / flatten / unflatten,
  whose outputs on the same weights are checked equal first.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rgap_audit.analysis import audit_instance
from rgap_audit.errors import AuditError
from rgap_audit.formats import render
from rgap_audit.instance import build_instance
from rgap_audit.loader import iter_models, load_models, package_of
from rgap_audit.options import AuditOptions
from rgap_audit.rules import evaluate, load_rules
from rgap_audit.verify import verify

WILD = Path(__file__).resolve().parent / "data" / "models_in_the_wild"
RULES = load_rules()


def loaded(file: str, name: str, **opts):
    (m,) = load_models(str(WILD / file), [name], AuditOptions(**opts))
    return m


def audited(file: str, name: str, **opts):
    m = loaded(file, name, **opts)
    options = AuditOptions(**opts)
    return audit_instance(build_instance(m, options), options)


def weighted_rows(report) -> list[tuple]:
    return [
        (r.module_path, r.unknowns, r.grad_rows, r.fwd_rows, r.rank, r.deficit, r.verdict.value)
        for r in report.layers
        if r.kind == "layer"
    ]


def autograd_gradient(model: torch.nn.Module, call, loss) -> dict[str, torch.Tensor]:
    """dL/dparam of the user's own model (a float64 copy in eval mode), by plain autograd."""
    m = copy.deepcopy(model).to(torch.float64).eval()
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(loss(call(m)), list(params.values()))
    return dict(zip(params, grads))


def assert_same_gradients(inst, expected: dict[str, torch.Tensor]) -> None:
    assert set(inst.param_grads) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(inst.param_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- outputs
@pytest.mark.parametrize(
    "name, picked, described",
    [
        ("LeNetShapes", lambda out: out[0], "[0] of the tuple of 2"),
        ("FeaturesThenLogits", lambda out: out[1], "[1] of the tuple of 2"),
        ("DictOutputs", lambda out: out["logits"], "['logits'] of the dict of 3"),
        ("DataclassOutputs", lambda out: out.logits, ".logits of the ClassifierOutput of 2"),
    ],
)
def test_several_outputs_audit_the_logits(name, picked, described):
    audit = audited("tuple_outputs.py", name)
    plain = audited("tuple_outputs.py", "LeNetLogits")
    report, inst = audit.report, audit.instance
    assert report.output is not None and report.output.startswith(described)
    assert plain.report.output is None
    assert weighted_rows(report) == weighted_rows(plain.report) and report.verdict.status == plain.report.verdict.status
    labels = inst.labels
    expected = autograd_gradient(
        inst.loaded.module, lambda m: picked(m(inst.x)), lambda out: F.cross_entropy(out, labels, reduction="sum")
    )
    assert_same_gradients(inst, expected)
    assert any(w.startswith("forward returns several outputs: the loss sees") for w in report.warnings)
    assert f"audited output: {report.output}" in render("table", [report], [])


def test_an_unknown_output_key_is_one_error_listing_the_outputs():
    m = loaded("tuple_outputs.py", "WrongKey")
    with pytest.raises(AuditError) as exc:
        build_instance(m, AuditOptions())
    cause = exc.value.cause
    assert "output 'scores' is not among the outputs of forward" in cause and "'logits'" in cause and "RGAP_MODELS" in cause


def test_tuple_output_model_is_recovered_by_the_attack():
    result = verify(audited("tuple_outputs.py", "LeNetShapes"))
    assert result.attempted and result.confirmed is True and result.rel_error is not None and result.rel_error <= 1e-6


# --------------------------------------------------------------------------- packages
def test_a_package_file_with_relative_imports_loads_by_path_and_by_dotted_name(monkeypatch):
    before = list(sys.path)
    (by_path,) = load_models(str(WILD / "flpkg" / "models" / "cnn.py"), None, AuditOptions())
    assert sys.path == before
    source = (WILD / "flpkg" / "models" / "cnn.py").read_text().splitlines()
    line = next(i for i, t in enumerate(source, 1) if "conv_block(1, 4, 2)" in t)
    assert by_path.layer_locations["features.0"].line == line  # the call in the audited file, not blocks.py
    assert by_path.layer_locations["classifier"].line == next(i for i, t in enumerate(source, 1) if "self.classifier" in t)
    monkeypatch.chdir(WILD)
    from rgap_audit.pipeline import split_target

    assert split_target("flpkg.models.cnn:SmallCNN") == (os.path.join("flpkg", "models", "cnn.py"), "SmallCNN")
    (by_name,) = load_models(split_target("flpkg.models.cnn:SmallCNN")[0], ["SmallCNN"], AuditOptions())
    assert by_name.file == os.path.join("flpkg", "models", "cnn.py")
    a = evaluate([audit_instance(build_instance(by_path, AuditOptions()), AuditOptions()).report], RULES)
    b = evaluate([audit_instance(build_instance(by_name, AuditOptions()), AuditOptions()).report], RULES)
    assert [(f.code, f.line, f.col, f.node) for f in a] == [(f.code, f.line, f.col, f.node) for f in b]
    # the package's own module (imported by flpkg/models/__init__.py) is untouched by the audit's copy
    real = sys.modules["flpkg.models.cnn"]
    assert Path(real.__file__).resolve() == (WILD / "flpkg" / "models" / "cnn.py").resolve()
    assert type(by_name.module).__module__ != real.__name__


def test_package_of_stops_at_the_first_folder_without_init(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "__init__.py").write_text("")
    (tmp_path / "a" / "b" / "__init__.py").write_text("")
    assert package_of(str(tmp_path / "a" / "b" / "m.py")) == ("a.b", str(tmp_path))
    (tmp_path / "my-models").mkdir()
    (tmp_path / "my-models" / "__init__.py").write_text("")  # not importable as a package name
    assert package_of(str(tmp_path / "my-models" / "m.py")) == (None, str(tmp_path / "my-models"))
    assert package_of(str(tmp_path / "m.py")) == (None, str(tmp_path))


# --------------------------------------------------------------------------- an import the model does not need
def test_an_unavailable_data_library_is_one_error_with_the_remedy():
    (err,) = list(iter_models(str(WILD / "data_imports.py"), None, AuditOptions()))
    assert isinstance(err, AuditError)
    source = (WILD / "data_imports.py").read_text().splitlines()
    assert err.line == next(i for i, t in enumerate(source, 1) if t.startswith("from rgap_test_absent_fl_datasets"))
    assert "No module named 'rgap_test_absent_fl_datasets'" in err.cause
    assert "install the package that provides 'rgap_test_absent_fl_datasets'" in err.cause
    assert "a small file that imports only the model code" in err.cause
    assert str(WILD) not in sys.path


# --------------------------------------------------------------------------- forward(input, hidden), sequence-first
@pytest.mark.parametrize("name, batch", [("LSTM-LM", 1), ("LSTM-LM", 2), ("GRU-LM", 1)])
def test_two_argument_sequence_first_language_model(name, batch):
    audit = audited("language_model.py", name, batch_size=batch)
    inst, report = audit.instance, audit.report
    assert not inst.x.is_floating_point() and tuple(inst.x.shape) == (batch, 6)  # token ids, batch first
    assert [n.op for n in inst.gm.graph.nodes].count("placeholder") == 1
    model = copy.deepcopy(inst.loaded.module).to(torch.float64).eval()
    with torch.no_grad():
        hidden = model.init_hidden(batch)
        expected, _ = model(inst.x.T, hidden)  # the user's forward on (T, B) tokens and the example hidden state
        traced = inst.gm(inst.x)
    torch.testing.assert_close(F.log_softmax(traced, dim=1), expected)  # the head's log-softmax is folded into the loss
    assert inst.rows == 6 * batch and inst.labels.shape == (6 * batch,)  # one label per token
    expected_grads = autograd_gradient(
        inst.loaded.module,
        lambda m: m(inst.x.T, m.init_hidden(batch))[0],
        lambda out: F.nll_loss(out, inst.labels, reduction="sum"),
    )
    assert_same_gradients(inst, expected_grads)
    assert report.private_input.startswith("argument 0 (input) of 2") and "batch dimension 1" in report.private_input
    rnn = next(r for r in report.layers if r.module_path == "rnn")
    assert rnn.verdict.value == "not-understood" and "recurrent" in rnn.reason
    assert report.verdict.input_recoverable is None and "does not understand" in report.verdict.summary
    result = verify(audit)
    assert result.attempted is False and "integer token ids" in result.summary


def test_a_two_argument_forward_without_example_inputs_says_what_to_declare():
    errs = [e for e in iter_models(str(WILD / "language_model.py"), ["Undeclared-LM"], AuditOptions()) if isinstance(e, AuditError)]
    (err,) = errs
    assert "forward takes 2 arguments (input, hidden)" in err.cause and "example_inputs" in err.cause


def test_a_sequence_first_input_audits_as_its_batch_first_twin():
    seq = audited("language_model.py", "SeqFirstMLP")
    flat = audited("language_model.py", "BatchFirstMLP")
    assert weighted_rows(seq.report) == weighted_rows(flat.report) and seq.report.verdict.status == flat.report.verdict.status
    x = seq.instance.x
    model = copy.deepcopy(seq.instance.loaded.module).to(torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(seq.instance.gm(x), model(x.permute(1, 0, 2)))
    result = verify(seq)
    assert result.confirmed is True and result.rel_error <= 1e-6


# --------------------------------------------------------------------------- softmax heads
@pytest.mark.parametrize("name", ["LogSoftmax", "LogSoftmaxModule"])
def test_a_log_softmax_head_is_audited_as_the_logits_with_nll_training(name):
    audit = audited("heads.py", name)
    logits = audited("heads.py", "Logits")
    inst = audit.instance
    assert weighted_rows(audit.report) == weighted_rows(logits.report)
    assert audit.report.verdict.status == logits.report.verdict.status
    assert any("folded into the cross-entropy loss" in w for w in audit.report.warnings)
    expected = autograd_gradient(inst.loaded.module, lambda m: m(inst.x), lambda out: F.nll_loss(out, inst.labels, reduction="sum"))
    assert_same_gradients(inst, expected)
    result = verify(audit)
    assert result.confirmed is True and result.rel_error <= 1e-6


def test_a_softmax_head_is_not_attempted_and_the_static_report_stays():
    audit = audited("heads.py", "Softmax")
    before = audit.report.verdict
    result = verify(audit)
    assert result.attempted is False and "unsupported head" in result.summary and "softmax" in result.summary
    assert audit.report.verdict == before and audit.report.layers


# --------------------------------------------------------------------------- recurrent layers
def test_a_gru_is_not_understood_with_its_reason():
    report = audited("gru_classifier.py", "GRUClassifier").report
    assert report.verdict.input_recoverable is None
    assert "feeds several branches" not in report.verdict.summary
    assert "the input reaches gru (GRU), which the analysis does not understand: recurrent" in report.verdict.summary
    codes = {(f.code, f.node) for f in evaluate([report], RULES)}
    assert ("RGAP401", "gru") in codes
    assert ("RGAP205", "fc") in codes and ("RGAP201", "fc") not in codes  # the head reads GRU features, not the input
    items = [r for r in report.layers if r.node in ("getitem", "getitem_1")]
    assert [r.op for r in items] == ["output-item"] and not any(c == "RGAP301" and n in ("getitem", "getitem_1") for c, n in codes)


# --------------------------------------------------------------------------- einops
@pytest.mark.parametrize("name", ["ConvPatches", "LinearPatches"])
def test_einops_rearrange_audits_as_torch_permutations(name):
    pytest.importorskip("einops", reason="einops is not installed: its Rearrange entry is not registered")
    ein = audited("einops_patches.py", name)
    ref = audited("einops_patches.py", f"{name}Torch")
    with torch.no_grad():  # the two are the same function: same constructor order, same seed, same weights
        torch.testing.assert_close(ein.instance.gm(ein.instance.x), ref.instance.gm(ein.instance.x))
    assert weighted_rows(ein.report) == weighted_rows(ref.report) and ein.report.verdict == ref.report.verdict
    assert not any(r.verdict.value == "not-understood" for r in ein.report.layers)
