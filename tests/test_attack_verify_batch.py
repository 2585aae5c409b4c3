"""--verify with a batch (B > 1): R-GAP as deployed on the summed gradient, measured against every sample.

Every measured number is recomputed here independently: the samples and labels from the seed, the shared
gradient as a sum of per-sample autograd gradients, the reconstruction by calling the engine directly,
the combination fit and the span distances with numpy's least squares.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.mlp_bias import BiasedMLP
from rgap_audit.analysis import Audit
from rgap_audit.attack import reconstruct
from rgap_audit.cli import main as cli_main
from rgap_audit.errors import AuditError
from rgap_audit.formats import FORMATS, render
from rgap_audit.formats.jsonreport import report_dict, report_schema
from rgap_audit.instance import build_instance
from rgap_audit.layergraph import build_layer_graph
from rgap_audit.losses import client_gradient, make_labels
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import Basis, LayerRecord, ModelReport, ModelStatus, ModelVerdict, Verdict, plain
from rgap_audit.tolerances import COMBINATION_TOL, EXACT
from rgap_audit.tracing import trace
from rgap_audit.verify import settle
from rgap_audit.verify import verify as verify_audit
from rgap_audit.verify.batch import span_leak as client_span_leak
from rgap_audit.verify.metrics import combination_fit

SHAPE = (1, 7, 7)


def verify(loaded, options, report, **kwargs):
    """--verify of the audit whose static report is `report` (a stand-in), on the loaded model's instance,
    as the pipeline runs it: the record goes to the report, the verdict becomes the settled one."""
    inst = build_instance(loaded, AuditOptions(**{**vars(options), "batch_size": report.batch_size or options.batch_size}))
    out = verify_audit(Audit(report, inst, {}), debug=options.debug, **kwargs)
    report.verification = out
    report.verdict = settle(report.verdict, out, inst.batch)
    return out


def span_leak(model, grads, x):
    """The span measurement of --verify on the client whose input is x and whose shared gradient is `grads`."""
    loaded = LoadedModel(file="m.py", name="M", module=model, input_shape=tuple(x.shape[1:]))
    inst = build_instance(loaded, AuditOptions(batch_size=x.shape[0], loss="logistic"))
    labels = make_labels("logistic", x.shape[0], 1, torch.Generator().manual_seed(0))
    client = inst.replay(x, labels)
    for k in client.param_grads:  # the gradient given, not the replay's
        client.param_grads[k] = grads[k].to(torch.float64)
    return client_span_leak(client)


def small_fcn() -> nn.Sequential:
    """FCN3 in miniature: 49-40-20-1, bias-free, LeakyReLU(0.2), logistic loss."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(49, 40, bias=False), nn.LeakyReLU(0.2),
        nn.Linear(40, 20, bias=False), nn.LeakyReLU(0.2),
        nn.Linear(20, 1, bias=False),
    )


def ce_nobias() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 8, bias=False), nn.Tanh(), nn.Linear(8, 4, bias=False))


def _report(model, shape, loss, recoverable, batch):
    """A stand-in for the static analysis' report (only the verdict matters to a batch verification)."""
    lg = build_layer_graph(trace(model, torch.zeros(1, *shape)))
    layers = [
        LayerRecord(index=i, node=n, op="Linear", kind="layer", module_path=lg.node(n).module_path,
                    input_shape=list(lg.node(n).in_shape), output_shape=list(lg.node(n).out_shape),
                    deficit=0, verdict=Verdict.RECOVERABLE, basis=Basis.NUMERICAL)
        for i, n in enumerate(lg.weighted())
    ]
    verdict = ModelVerdict(status=ModelStatus.DEFICIENT if recoverable is False else ModelStatus.RECOVERABLE_LAYERWISE, input_recoverable=recoverable,
                           deficient_layers=0, total_deficit=0, input_deficit=None, basis=Basis.NUMERICAL, summary="stand-in")
    return ModelReport(file="m.py", model="M", input_shape=list(shape), batch_size=batch, loss=loss, seed=0,
                       dtype="float64", layers=layers, verdict=verdict)


def _loaded(model, shape, loss, name="M"):
    return LoadedModel(file="m.py", name=name, module=model, input_shape=shape, loss=loss)


def _seeded(seed, batch, shape, loss, out_features):
    """The samples and labels verify draws: one generator, inputs first (float64 uniform), then labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=gen, dtype=torch.float64)
    return x, make_labels(loss, batch, out_features, gen)


def _per_sample_sum(model, x, loss, labels):
    """The shared gradient built independently: one autograd call per sample, then the sum."""
    m = copy.deepcopy(model).to(torch.float64)
    names = [n for n, _ in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    for n in range(x.shape[0]):
        out = m(x[n : n + 1]).reshape(1, -1)
        if loss == "logistic":
            value = F.softplus(-labels[n] * out[0, 0])
        else:
            value = F.cross_entropy(out, labels[n : n + 1])
        for t, g in zip(total, torch.autograd.grad(value, params)):
            t += g
    return dict(zip(names, total))


def _np_distance(G: np.ndarray, v: np.ndarray) -> float:
    """Relative distance of v to the row space of G, by least squares on G^T (numpy, independent of the SVD)."""
    a, *_ = np.linalg.lstsq(G.T, v, rcond=None)
    return float(np.linalg.norm(G.T @ a - v) / np.linalg.norm(v))


# ----------------------------------------------------------------------------- the attack as deployed
def test_small_fcn_batch2_confirms_not_recoverable_and_finds_a_combination():
    torch.manual_seed(0)
    model = small_fcn()
    report = _report(model, SHAPE, "logistic", False, 2)
    out = verify(_loaded(model, SHAPE, "logistic"), AuditOptions(seed=0, batch_size=2), report)
    json.dumps(plain(out))  # JSON-ready
    assert report.verification is out
    assert out.attempted and out.batch_size == 2 and out.outcome == "reconstructed"
    assert out.confirmed is True and out.summary.startswith("Confirmed")
    assert report.verdict.basis == Basis.VERIFIED
    assert all(p.rel_error > EXACT and not p.recovered for p in out.per_sample)

    # the samples, the labels and the shared gradient, independently
    x, labels = _seeded(0, 2, SHAPE, "logistic", 1)
    assert out.labels == labels.tolist()
    shared = _per_sample_sum(model, x, "logistic", labels)
    client = client_gradient(model, x, "logistic", labels)
    assert shared.keys() == client.keys()
    for k in shared:
        torch.testing.assert_close(client[k], shared[k], rtol=1e-12, atol=1e-15)

    # the attack itself, run here on the independent gradient: per-sample errors and the nearest sample agree
    rec = reconstruct(model, shared, SHAPE, "logistic")
    cands = [rec.input, *rec.alternatives] + ([rec.projected.input, *rec.projected.alternatives] if rec.projected else [])
    cands = [c for c in cands if c is not None]
    assert len(cands) == out.candidates >= 1
    errs = [min(float((c.reshape(SHAPE) - x[n]).norm() / x[n].norm()) for c in cands) for n in range(2)]
    for n in range(2):
        assert out.per_sample[n].rel_error == pytest.approx(errs[n], rel=1e-8)
    assert out.nearest_sample == int(np.argmin(errs))
    assert out.rel_error == pytest.approx(min(errs), rel=1e-8)

    # combination fit against numpy's least squares on the same reconstruction
    X = x.reshape(2, -1).numpy().T
    y = cands[0].reshape(-1).numpy()
    c, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = float(np.linalg.norm(X @ c - y) / np.linalg.norm(y))
    comb = out.combination
    assert comb.candidate == "plain"
    np.testing.assert_allclose(comb.coefficients, c, rtol=1e-6, atol=1e-12)
    assert comb.residual_rel == pytest.approx(resid, abs=1e-12)
    # R-GAP recovers a combination of the two samples (not either one): both coefficients matter
    assert resid <= COMBINATION_TOL and comb.combination is True and "combination of the samples" in out.summary
    assert min(abs(v) for v in c) > 1e-3
    # the last layer R-GAP solves had to fit a gradient no single input produces
    assert out.layers and max(e.residual_grad or 0.0 for e in out.layers) > 1e-3


def test_combination_fit_negative_controls():
    gen = torch.Generator().manual_seed(5)
    samples = torch.rand((2, *SHAPE), generator=gen, dtype=torch.float64)
    other = torch.rand(SHAPE, generator=gen, dtype=torch.float64)
    fit = combination_fit(samples, other)  # a random vector is not a combination of two samples in 49 dimensions
    assert fit.residual_rel > 0.3 and not fit.fills_input_space and fit.samples_rank == 2
    exact = combination_fit(samples, 2.0 * samples[0] - 0.5 * samples[1])
    np.testing.assert_allclose(exact.coefficients, [2.0, -0.5], rtol=1e-10)
    assert exact.residual_rel < 1e-12
    many = combination_fit(torch.rand((5, 3), generator=gen, dtype=torch.float64), torch.rand(3, generator=gen, dtype=torch.float64))
    assert many.fills_input_space is True  # 5 samples span R^3: "a combination" would say nothing


def test_a_batch_that_spans_the_input_space_claims_no_combination():
    # 8 samples of a 6-entry input: any reconstruction is a combination of them, so none is claimed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.LeakyReLU(0.2), nn.Linear(5, 1, bias=False))
    out = verify(_loaded(model, (6,), "logistic"), AuditOptions(seed=0, batch_size=8), _report(model, (6,), "logistic", False, 8))
    if out.outcome == "reconstructed":
        comb = out.combination
        assert comb.fills_input_space is True and comb.samples_rank == 6 and comb.combination is False
        assert "span the whole input space" in out.summary and "combination of the samples (" not in out.summary
    else:
        assert out.combination is None and out.reason


def test_static_recoverable_or_undecided_is_never_confirmed_by_one_input():
    torch.manual_seed(0)
    model = small_fcn()
    for static in (True, None):
        report = _report(model, SHAPE, "logistic", static, 2)
        out = verify(_loaded(model, SHAPE, "logistic"), AuditOptions(seed=0, batch_size=2), report)
        assert out.confirmed is None and "cannot confirm recovery of 2 samples" in out.summary
        assert report.verdict.basis == Basis.NUMERICAL  # not VERIFIED


def test_a_recovered_sample_contradicts_a_not_recoverable_verdict(tmp_path):
    # two identical samples with the same label: the summed gradient is twice one sample's, and the bias leak
    # of BiasedMLP's first layer gives that sample back exactly
    seed = next(s for s in range(200) if len(set(make_labels("cross-entropy", 2, 10, torch.Generator().manual_seed(s)).tolist())) == 1)
    gen = torch.Generator().manual_seed(123)
    one = torch.rand(64, generator=gen, dtype=torch.float64)
    torch.save(torch.stack([one, one]), tmp_path / "twins.pt")
    torch.manual_seed(0)
    model = BiasedMLP()
    report = _report(model, (64,), "cross-entropy", False, 2)
    out = verify(_loaded(model, (64,), "cross-entropy"), AuditOptions(seed=seed, batch_size=2), report, input=str(tmp_path / "twins.pt"))
    assert out.input.endswith("twins.pt") and out.outcome == "reconstructed"
    assert all(p.recovered and p.rel_error <= EXACT for p in out.per_sample)
    assert out.confirmed is False and out.summary.startswith("Not confirmed")
    assert report.verdict.basis == Basis.NUMERICAL
    assert out.span_leak.numerical_rank == 1  # two equal samples span one direction


# ----------------------------------------------------------------------------- the span leak
def test_span_leak_of_a_biased_first_linear_with_three_samples():
    torch.manual_seed(0)
    model = BiasedMLP()
    out = verify(_loaded(model, (64,), "cross-entropy"), AuditOptions(seed=0, batch_size=3), _report(model, (64,), "cross-entropy", False, 3))
    leak = out.span_leak
    assert out.span_leak_reason is None and leak.layer and leak.parameter == "fc1.weight"
    assert leak.numerical_rank == 3 and leak.all_in_row_space is True
    assert len(leak.distance_rel) == 3 and max(leak.distance_rel) <= 1e-8
    sv = leak.singular_values_rel
    assert sv[2] > 1e-3 and sv[3] < leak.rank_rtol  # three clear directions, then numerical zero
    assert "span" in leak.summary and "rank 3" in leak.summary

    # independently: the summed gradient's fc1 rows, numpy's rank, numpy's least-squares distances
    x, labels = _seeded(0, 3, (64,), "cross-entropy", 10)
    G = _per_sample_sum(model, x, "cross-entropy", labels)["fc1.weight"].numpy()
    assert np.linalg.matrix_rank(G) == 3
    for n in range(3):
        assert _np_distance(G, x[n].numpy()) < 1e-8
    # negative control: a fresh random vector is far from the 3-dimensional row space in R^64
    r = torch.rand(64, generator=torch.Generator().manual_seed(99), dtype=torch.float64).numpy()
    assert _np_distance(G, r) > 0.3


def test_span_leak_is_skipped_with_a_reason_for_other_first_layers():
    gen = torch.Generator().manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(2 * 5 * 5, 1, bias=False))
    x = torch.rand((2, *SHAPE), generator=gen, dtype=torch.float64)
    grads = client_gradient(conv, x, "logistic", torch.tensor([1.0, -1.0], dtype=torch.float64))
    leak, why = span_leak(conv, grads, x)
    assert leak is None and "not a Linear" in why
    act_first = nn.Sequential(nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 1))
    x6 = torch.rand((2, 6), generator=gen, dtype=torch.float64)
    leak, why = span_leak(act_first, client_gradient(act_first, x6, "logistic", torch.tensor([1.0, 1.0], dtype=torch.float64)), x6)
    assert leak is None and "before any weighted layer" in why
    # a Linear behind a Flatten is found (positive control for the walk through reshapes)
    torch.manual_seed(0)
    fcn = small_fcn()
    leak, why = span_leak(fcn, client_gradient(fcn, x, "logistic", torch.tensor([1.0, -1.0], dtype=torch.float64)), x)
    assert why is None and leak.numerical_rank == 2 and leak.all_in_row_space


# ----------------------------------------------------------------------------- when the engine cannot proceed
def test_cross_entropy_batch_is_reported_not_crashed():
    torch.manual_seed(0)
    model = BiasedMLP()
    out = verify(_loaded(model, (64,), "cross-entropy"), AuditOptions(seed=0, batch_size=3), _report(model, (64,), "cross-entropy", False, 3))
    json.dumps(plain(out))
    assert out.attempted is True and out.batch_size == 3 and len(out.per_sample) == 3
    x, labels = _seeded(0, 3, (64,), "cross-entropy", 10)
    assert len(set(labels.tolist())) == 3  # three labels: three negative entries in the summed dL/db
    assert out.outcome == "reconstructed"  # the unrecoverable label is tried over every class
    # the engine reads fc1's bias leak x' = dW^T db / |db|^2 = sum_n (k_n . db / |db|^2) x_n
    k = [_per_sample_sum(model, x[n : n + 1], "cross-entropy", labels[n : n + 1])["fc1.bias"] for n in range(3)]
    db = sum(k)
    want = [float(kn @ db / (db @ db)) for kn in k]
    assert out.combination.combination is True and out.combination.residual_rel < 1e-8
    np.testing.assert_allclose(out.combination.coefficients, want, rtol=1e-6)
    assert out.span_leak.numerical_rank == 3


def test_a_head_that_refuses_the_summed_gradient_is_a_measured_outcome():
    torch.manual_seed(0)
    model = ce_nobias()
    report = _report(model, (10,), "cross-entropy", False, 2)
    out = verify(_loaded(model, (10,), "cross-entropy"), AuditOptions(seed=0, batch_size=2), report)
    assert out.outcome == "refused" and out.reason.startswith("head ")
    assert out.confirmed is None and out.summary.startswith("Not confirmed either way")
    assert report.verdict.basis == Basis.NUMERICAL
    # the same model on one sample is attacked normally: the refusal is the batch's doing
    rep1 = _report(model, (10,), "cross-entropy", True, 1)
    one = verify(_loaded(model, (10,), "cross-entropy"), AuditOptions(seed=0), rep1)
    assert one.attempted and one.batch_size is None and one.rel_error is not None


def test_bad_inputs_are_still_audit_errors(tmp_path):
    torch.manual_seed(0)
    model = small_fcn()
    loaded = _loaded(model, SHAPE, "logistic")
    report = _report(model, SHAPE, "logistic", False, 2)
    from PIL import Image

    Image.new("L", (7, 7)).save(tmp_path / "a.png")
    with pytest.raises(AuditError, match="an image is one sample") as info:
        verify(loaded, AuditOptions(batch_size=2), report, input=str(tmp_path / "a.png"))
    assert "\n" not in info.value.one_line()
    torch.save(torch.rand(1, *SHAPE), tmp_path / "one.pt")
    with pytest.raises(AuditError, match=r"shape \(1, 1, 7, 7\).*\(2, 1, 7, 7\)"):
        verify(loaded, AuditOptions(batch_size=2), report, input=str(tmp_path / "one.pt"))
    torch.save(torch.full((2, *SHAPE), float("nan")), tmp_path / "nan.pt")
    with pytest.raises(AuditError, match="NaN"):
        verify(loaded, AuditOptions(batch_size=2), report, input=str(tmp_path / "nan.pt"))
    # a model R-GAP cannot attack at all is a limit of the attack (issue 11): not attempted, with the reason,
    # neither an error of the input nor a batch outcome
    sig = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())
    result = verify(_loaded(sig, (4,), "logistic"), AuditOptions(batch_size=2), _report(sig, (4,), "logistic", False, 2))
    assert result.attempted is False and result.summary.startswith("Not attempted: unsupported head")


# ----------------------------------------------------------------------------- report formats, images, CLI
def test_batch_verification_in_json_table_and_every_format():
    torch.manual_seed(0)
    model = small_fcn()
    ok = _report(model, SHAPE, "logistic", False, 2)
    verify(_loaded(model, SHAPE, "logistic"), AuditOptions(seed=0, batch_size=2), ok)
    ce = ce_nobias()
    refused = _report(ce, (10,), "cross-entropy", False, 2)
    refused.model = "CE"
    verify(_loaded(ce, (10,), "cross-entropy"), AuditOptions(seed=0, batch_size=2), refused)
    single = _report(model, SHAPE, "logistic", True, 1)
    single.model = "One"
    verify(_loaded(model, SHAPE, "logistic"), AuditOptions(seed=0), single)
    validator = jsonschema.Draft202012Validator(report_schema())
    doc = report_dict([ok, refused, single], [])
    validator.validate(doc)
    # the schema constrains the batch keys: a batch verification without its per-sample results is invalid
    for key, value in (("per_sample", None), ("combination", {"coefficients": "x"}), ("span_leak_reason", None)):
        bad = json.loads(json.dumps(doc))
        ver = bad["models"][0]["verification"]
        if key == "span_leak_reason":
            ver["span_leak"] = None
        if value is None:
            ver.pop(key)
        else:
            ver[key] = value
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)
    # the analysis' undecided status for FCN3 at B = 2 (docs/DESIGN.md) is a valid report too
    ok.verdict.status, ok.verdict.input_recoverable = ModelStatus.RECOVERABLE_GIVEN_PATTERN, None
    validator.validate(report_dict([ok], []))
    ok.verdict.status, ok.verdict.input_recoverable = ModelStatus.DEFICIENT, False
    text = render("table", [ok, refused, single], [])
    block = text.split("M - input")[1].split("CE - input")[0]
    assert "per sample: #0 rel. error" in block and "#1 rel. error" in block
    assert "combination fit: coefficients [" in block and "span leak: The weight gradient" in block
    assert "outcome=reconstructed" in block and "measured nullity" not in block  # no per-layer columns for B > 1
    ce_block = text.split("CE - input")[1]
    assert "not reconstructed" in ce_block and "span leak:" in ce_block
    for fmt in FORMATS:
        assert render(fmt, [ok, refused, single], []).endswith("\n")


def test_save_images_one_row_per_sample(tmp_path):
    torch.manual_seed(0)
    model = small_fcn()
    out = verify(_loaded(model, SHAPE, "logistic"), AuditOptions(seed=0, batch_size=2), _report(model, SHAPE, "logistic", False, 2),
                 save_images=str(tmp_path))
    import base64
    import io

    from PIL import Image

    x, _ = _seeded(0, 2, SHAPE, "logistic", 1)
    with Image.open(out.image) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] / 4  # the labelled figure: two rows of tiles
    assert [p.label.split(" (")[0] for p in out.panels] == ["sample 0", "sample 1"]
    for n, p in enumerate(out.panels):  # row n compares sample n (on its own [min, max]) with its nearest candidate
        assert p.rel_error == out.per_sample[n].rel_error and p.psnr_db == out.per_sample[n].psnr_db
        xn = x[n, 0].numpy()
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(p.tiles[0].png))))
        np.testing.assert_array_equal(got, np.round((xn - xn.min()) / (xn.max() - xn.min()) * 255))


MODEL_FILE = """
import torch.nn as nn

def tiny():
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.LeakyReLU(0.2), nn.Linear(5, 1, bias=False))

RGAP_MODELS = {"Tiny": {"factory": tiny, "input_shape": (6,), "loss": "logistic"}}
"""


def test_cli_batch_verify_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("tiny.py").write_text(MODEL_FILE, encoding="utf-8")
    code = cli_main(["tiny.py", "--batch-size", "2", "--verify", "--format", "json", "--fail-on", "info"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    jsonschema.Draft202012Validator(report_schema()).validate(doc)
    ver = doc["models"][0]["verification"]
    assert ver["batch_size"] == 2 and ver["attempted"] is True and len(ver["per_sample"]) == 2
    assert code == (1 if doc["summary"]["findings"] else 0) and "Traceback" not in err
    Path("img.png").write_bytes(b"")
    code = cli_main(["tiny.py", "--batch-size", "2", "--verify", "--input", "img.png"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "an image is one sample" in err


def test_an_engine_crash_is_recorded_but_propagates_under_debug(monkeypatch):
    import rgap_audit.verify.batch as ver

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ver, "attack_graph", crash)
    torch.manual_seed(0)
    model = BiasedMLP()
    report = _report(model, (64,), "cross-entropy", False, 2)
    out = verify(_loaded(model, (64,), "cross-entropy"), AuditOptions(seed=0, batch_size=2), report)
    assert out.outcome == "engine-error" and "RuntimeError: boom" in out.reason
    with pytest.raises(RuntimeError, match="boom"):
        verify(_loaded(model, (64,), "cross-entropy"), AuditOptions(seed=0, batch_size=2, debug=True), report)
