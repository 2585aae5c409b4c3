"""verify(): the --verify report, its inputs (seeded, tensor file, image), weights and errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from examples.mlp_bias import BiasedMLP
from examples.paper_nets import fcn3
from rgap_audit.analysis import Audit
from rgap_audit.errors import AuditError
from rgap_audit.instance import build_instance
from rgap_audit.layergraph import build_layer_graph
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import Basis, LayerRecord, ModelReport, ModelStatus, ModelVerdict, Verdict, plain
from rgap_audit.tracing import trace
from rgap_audit.verify import settle
from rgap_audit.verify import verify as verify_audit


def verify(loaded, options, report, **kwargs):
    """--verify of the audit whose static report is `report` (a stand-in), on the loaded model's instance,
    as the pipeline runs it: the record goes to the report, the verdict becomes the settled one."""
    inst = build_instance(loaded, AuditOptions(**{**vars(options), "batch_size": report.batch_size or options.batch_size}))
    out = verify_audit(Audit(report, inst, {}), **kwargs)
    report.verification = out
    report.verdict = settle(report.verdict, out, inst.batch)
    return out


def _report(model, shape, loss, deficits=None, recoverable=True, batch=1):
    """A stand-in for the static analysis' report: one record per weighted layer, keyed by node."""
    lg = build_layer_graph(trace(model, torch.zeros(1, *shape)))
    deficits = deficits or {}
    layers = []
    for i, n in enumerate(lg.weighted()):
        d = deficits.get(n, 0)
        layers.append(
            LayerRecord(
                index=i, node=n, op="Linear", kind="layer", module_path=lg.node(n).module_path,
                input_shape=list(lg.node(n).in_shape), output_shape=list(lg.node(n).out_shape),
                deficit=d, verdict=Verdict.DEFICIENT if d else Verdict.RECOVERABLE, basis=Basis.NUMERICAL,
            )
        )
    verdict = ModelVerdict(
        status=ModelStatus.RECOVERABLE_LAYERWISE if recoverable else ModelStatus.DEFICIENT, input_recoverable=recoverable,
        deficient_layers=len(deficits), total_deficit=sum(deficits.values()), input_deficit=0 if recoverable else 5,
        basis=Basis.NUMERICAL, summary="",
    )
    return ModelReport(file="m.py", model="M", input_shape=list(shape), batch_size=batch, loss=loss, seed=0,
                       dtype="float64", layers=layers, verdict=verdict)


def _fcn3():
    torch.manual_seed(0)
    model = fcn3()
    loaded = LoadedModel(file="examples/paper_nets.py", name="FCN3", module=model, input_shape=(1, 28, 28), loss="logistic")
    return loaded, _report(model, (1, 28, 28), "logistic")


def test_verify_confirms_and_writes_the_picture(tmp_path):
    loaded, report = _fcn3()
    out = verify(loaded, AuditOptions(seed=3), report, save_images=str(tmp_path))
    assert report.verification is out
    json.dumps(plain(out))  # JSON-ready
    assert out.attempted and out.confirmed is True and out.summary.startswith("Confirmed")
    assert report.verdict.basis.value == "verified"  # the verdict now rests on the measured reconstruction
    assert out.rel_error < 1e-10 and out.psnr_db > 150 and out.mse < 1e-15
    assert "peak 1.0" in out.scaling
    assert [entry.node for entry in out.layers] == [r.node for r in report.layers]
    assert all(entry.static_verdict == "recoverable" and entry.rel_error < 1e-10 for entry in out.layers)
    import base64
    import io

    import numpy as np
    from PIL import Image

    with Image.open(out.image) as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # the labelled figure: tiles side by side
    # the report keeps the pictures: the original tile is the attacked input on its own [min, max], 8 bits
    x = build_instance(loaded, AuditOptions(seed=3)).x.reshape(28, 28).numpy()
    (panel,) = out.panels
    assert panel.label == "plain R-GAP" and panel.rel_error == out.plain.rel_error
    assert [t.kind for t in panel.tiles] == ["original", "reconstruction", "rescaled", "difference"]
    tiles = {t.kind: t for t in panel.tiles}
    pixels = {k: np.asarray(Image.open(io.BytesIO(base64.b64decode(t.png)))) for k, t in tiles.items()}
    want = np.round((x - x.min()) / (x.max() - x.min()) * 255)
    np.testing.assert_array_equal(pixels["original"], want)
    np.testing.assert_array_equal(pixels["reconstruction"], want)  # relative error 1e-10: the same 8-bit picture
    assert tiles["original"].lo == pytest.approx(x.min()) and tiles["original"].hi == pytest.approx(x.max())
    assert 0 < tiles["difference"].hi < 1e-9  # |x' - x| on [0, its largest value]


def test_verify_is_not_confirmed_when_the_static_verdict_says_safe():
    loaded, _ = _fcn3()
    report = _report(loaded.module, (1, 28, 28), "logistic", recoverable=False)
    before = report.verdict.basis
    out = verify(loaded, AuditOptions(), report)
    assert out.confirmed is False and out.summary.startswith("Not confirmed")
    # a demonstrated recovery outranks the analysis: the model verdict says so, and what it said before
    assert before != Basis.VERIFIED and report.verdict.basis == Basis.VERIFIED
    assert report.verdict.status == "recoverable-verified" and report.verdict.input_recoverable is True
    assert "the static analysis alone said" in report.verdict.summary and out.settled is not None


def test_verify_settles_an_undecided_verdict_when_the_attack_recovers_the_input():
    """CNN6-d: undecided statically (recoverable-given-pattern); the projected attack recovers it."""
    import sys
    from pathlib import Path

    from rgap_audit.analysis import audit_loaded
    from rgap_audit.rules import evaluate, load_rules

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from paper_nets import cnn6_d

    torch.manual_seed(0)
    loaded = LoadedModel(file="p.py", name="CNN6-d", module=cnn6_d(), input_shape=(3, 32, 32), loss="logistic")
    report = audit_loaded(loaded, AuditOptions())
    assert report.verdict.status == "recoverable-given-pattern" and report.verdict.input_recoverable is None
    assert "RGAP102" in {f.code for f in evaluate([report], load_rules())}
    out = verify(loaded, AuditOptions(), report)
    assert out.rel_error <= 1e-6 and out.confirmed is None  # not a confirmation: the analysis said nothing
    assert report.verdict.status == "recoverable-verified" and report.verdict.basis == Basis.VERIFIED
    codes = {f.code for f in evaluate([report], load_rules())}
    assert "RGAP101" in codes and "RGAP102" not in codes


def test_verify_on_a_saved_tensor_and_an_image(tmp_path):
    loaded, report = _fcn3()
    x = torch.rand(1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    out = verify(loaded, AuditOptions(), report, input=str(tmp_path / "x.pt"))
    assert out.rel_error < 1e-10 and out.input.endswith("x.pt")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 90)).save(tmp_path / "img.png")
    out = verify(loaded, AuditOptions(), report, input=str(tmp_path / "img.png"))
    assert out.attempted and out.rel_error < 1e-8


def test_verify_with_weights(tmp_path):
    loaded, report = _fcn3()
    other = fcn3()
    torch.save(other.state_dict(), tmp_path / "ok.pt")
    out = verify(loaded, AuditOptions(), report, weights=str(tmp_path / "ok.pt"))
    assert out.weights.endswith("ok.pt") and out.rel_error < 1e-10
    torch.save(BiasedMLP().state_dict(), tmp_path / "bad.pt")
    with pytest.raises(AuditError, match="does not match") as info:
        verify(loaded, AuditOptions(), report, weights=str(tmp_path / "bad.pt"))
    assert "\n" not in info.value.one_line()
    with pytest.raises(AuditError, match="no such file"):
        verify(loaded, AuditOptions(), report, weights=str(tmp_path / "missing.pt"))


def test_verify_bad_inputs(tmp_path):
    loaded, report = _fcn3()
    torch.save(torch.rand(3, 5), tmp_path / "wrong.pt")
    with pytest.raises(AuditError, match="shape"):
        verify(loaded, AuditOptions(), report, input=str(tmp_path / "wrong.pt"))
    torch.save(torch.full((1, 28, 28), float("nan")), tmp_path / "nan.pt")
    with pytest.raises(AuditError, match="NaN"):
        verify(loaded, AuditOptions(), report, input=str(tmp_path / "nan.pt"))
    mlp = LoadedModel(file="m.py", name="MLP", module=BiasedMLP(), input_shape=(64,))
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(AuditError, match="image"):
        verify(mlp, AuditOptions(), _report(mlp.module, (64,), "cross-entropy"), input=str(tmp_path / "a.png"))
    with pytest.raises(AuditError, match="unsupported loss|loss"):
        verify(loaded, AuditOptions(loss="hinge"), _report(loaded.module, (1, 28, 28), None))


def test_verify_nan_weights_give_a_one_line_error(tmp_path):
    loaded, report = _fcn3()
    sd = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    sd["1.weight"][0, 0] = float("inf")
    torch.save(sd, tmp_path / "inf.pt")
    with pytest.raises(AuditError, match="NaN or Inf"):
        verify(loaded, AuditOptions(), report, weights=str(tmp_path / "inf.pt"))


def test_verify_batch_runs_the_attack_on_the_summed_gradient():
    # the batch path itself is tested in test_attack_verify_batch.py; here: FCN3 no longer skips B > 1
    loaded, _ = _fcn3()
    report = _report(loaded.module, (1, 28, 28), "logistic", batch=2)
    out = verify(loaded, AuditOptions(batch_size=2), report)
    assert out.attempted is True and out.batch_size == 2 and len(out.per_sample) == 2
    assert out.confirmed is None and "cannot confirm recovery of 2 samples" in out.summary
    assert report.verdict.basis == Basis.NUMERICAL


def test_verify_reports_the_projected_variant_for_a_deficient_layer():
    # a narrow middle conv (6 -> 4 channels, stride 2) is deficient; the conv below it is not
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=1, padding=1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 16, 3, stride=1, padding=1, bias=False), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 1, bias=False),
    )
    loaded = LoadedModel(file="m.py", name="Narrow", module=model, input_shape=(2, 9, 9), loss="logistic")
    probe = verify(loaded, AuditOptions(seed=2), _report(model, (2, 9, 9), "logistic"))
    deficient = {e.node: e.measured_nullity for e in probe.layers if e.measured_nullity}
    assert deficient, "the narrow conv should be deficient"
    report = _report(model, (2, 9, 9), "logistic", deficits=deficient)
    out = verify(loaded, AuditOptions(seed=2), report)
    assert out.projected is not None
    entry = next(e for e in out.layers if e.node in deficient)
    assert entry.static_deficit == entry.measured_nullity
    assert out.plain.rel_error > 1e-3
    # the pattern below the deficient layer is estimated (not given) and settles: the input comes back
    assert out.projected.rel_error < 1e-8
    assert out.confirmed is True and "projected" in out.summary


def test_python_api_audit_model_then_verify_matches_the_attack_run_by_hand():
    """rgap_audit.audit_model keeps the instance for rgap_audit.verify.verify: its report is audit()'s,
    and the verification's error is that of reconstruct() on the instance's own client gradient."""
    import rgap_audit
    from rgap_audit.losses import client_gradient

    torch.manual_seed(0)
    model = fcn3()
    got = rgap_audit.audit_model(model, (1, 28, 28), seed=3)
    ref = rgap_audit.audit(model, (1, 28, 28), seed=3)
    assert [(r.node, r.rank, r.deficit) for r in got.report.layers] == [(r.node, r.rank, r.deficit) for r in ref.layers]
    result = verify_audit(got)
    inst = got.instance
    x = inst.x.detach().to(torch.float64)
    grads = client_gradient(model, x, inst.loss, inst.labels)
    rec = rgap_audit.reconstruct(model, grads, (1, 28, 28), inst.loss)
    by_hand = float((rec.best().input.reshape(x.shape) - x).norm() / x.norm())
    assert result.rel_error is not None and result.rel_error < 1e-10
    assert by_hand < 1e-10
    assert settle(got.report.verdict, result).status == got.report.verdict.status  # confirmed, not changed
