"""--defences against independent oracles.

* The accountant: epsilon of one Gaussian release from Opacus' RDP accountant is an upper bound on the exact
  epsilon of the analytic Gaussian mechanism (Balle & Wang 2018, solved here with scipy), and Opacus' other
  accountant (PRV) agrees with the exact value; the report's epsilon is the RDP accountant's, called directly.
* The noise sweep (CNN6, FCN3): the measured error grows with sigma within its spread over noise draws; the attack run
  through the Python API on gradients the test noises itself lands below the threshold at 0.3 x the reported sigma
  and above it at 3 x; the first-order prediction matches the measured error in the linear regime, and the worst
  case bound lies above it.
* Compression: top-k, fp16 and int8 against numpy implementations; the reported level stops the attack when the
  test compresses the gradient itself and calls the API.
* Architecture edits: every suggested edit, applied and re-audited, is not recoverable, and the dense whole-chain
  system of tests/oracles.py (autograd only) agrees that the input layer is deficient; the same edit written by
  hand gives the same deficit; CNN6's conv2 36 -> 20 (CNN6-d) is not an edit that works.
* Batch size: each point is the audit at that batch size called through the API.
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from rgap_audit import audit, audit_model, reconstruct
from rgap_audit.defence import apply_edit
from rgap_audit.defence.accountant import privacy_cost
from rgap_audit.defence.architecture import architecture_defence
from rgap_audit.defence.batch import batch_defence
from rgap_audit.defence.compression import compression_defence
from rgap_audit.defence.gradients import to_fp16, to_int8, top_k
from rgap_audit.defence.noise import noise_defence
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import ArchitectureEdit, ModelStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from paper_nets import cnn6, fcn3

from oracles import dense_chain_deficits

opacus = pytest.importorskip("opacus")
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),  # inside Opacus' PRV accountant
    pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning"),  # Opacus' RDP at sigma << 1
]


# ----------------------------------------------------------------------------- the accountant
def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity 1 and noise sigma (Balle & Wang 2018, Theorem 8):
    delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma), solved for eps."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gap(eps: float) -> float:
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta

    return float(brentq(gap, 0.0, 500.0))


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_one_release_epsilon_bounds_the_exact_gaussian_mechanism(sigma):
    from opacus.accountants import PRVAccountant

    cost = privacy_cost(sigma, delta=1e-5, rounds=10, sample_rate=0.1)
    exact = analytic_gaussian_epsilon(sigma, 1e-5)
    assert cost.epsilon_one_release is not None and cost.epsilon_one_release >= exact * (1 - 1e-9)
    assert cost.epsilon_one_release < 1.6 * exact  # RDP's conversion is loose, not wildly so
    prv = PRVAccountant()
    prv.history.append((sigma, 1.0, 1))
    assert prv.get_epsilon(delta=1e-5) == pytest.approx(exact, rel=0.02)


def test_rounds_epsilon_is_the_accountant_called_directly_and_close_to_prv():
    from opacus.accountants import PRVAccountant, RDPAccountant

    cost = privacy_cost(1.1, delta=1e-5, rounds=200, sample_rate=0.02)
    rdp = RDPAccountant()
    rdp.history.append((1.1, 0.02, 200))
    assert cost.epsilon_rounds == pytest.approx(rdp.get_epsilon(delta=1e-5), rel=1e-12)
    prv = PRVAccountant()
    prv.history.append((1.1, 0.02, 200))
    eps_prv = prv.get_epsilon(delta=1e-5)
    assert eps_prv <= cost.epsilon_rounds * 1.01 and eps_prv > 0.6 * cost.epsilon_rounds
    assert cost.epsilon_one_release is not None and cost.epsilon_rounds < 200 * cost.epsilon_one_release


# ----------------------------------------------------------------------------- the noise sweep
@pytest.fixture(scope="module", params=["CNN6", "FCN3"])
def swept(request):
    make, shape = {"CNN6": (cnn6, (3, 32, 32)), "FCN3": (fcn3, (1, 28, 28))}[request.param]
    torch.manual_seed(0)
    model = make()
    checked = audit_model(model, shape, loss="logistic")
    return model, shape, checked.instance, noise_defence(checked.instance)


def _api_error(model, grads, shape, x) -> float:
    """The attack through the Python API (a fresh trace of the model); the closest equally consistent input counts."""
    rec = reconstruct(model, grads, shape, "logistic", true_input=x)
    cands = [c for r in [rec, rec.projected] if r is not None and r.input is not None for c in [r.input, *r.alternatives]]
    if not cands:
        return math.inf
    return min(float((c.reshape(x.shape) - x).norm() / x.norm()) for c in cands)


def test_measured_error_grows_with_sigma_within_its_spread(swept):
    *_, noise = swept
    pts = noise.points
    first_above = next(i for i, p in enumerate(pts) if p.median_rel_error is None or p.median_rel_error > noise.threshold)
    for a, b in itertools.pairwise(pts[: first_above + 1]):
        lo_b = min(e for e in b.rel_errors if e is not None)
        assert b.median_rel_error is None or b.median_rel_error >= min(e for e in a.rel_errors if e is not None)
        assert lo_b >= 0.5 * max(e for e in a.rel_errors if e is not None)


def test_reported_sigma_separates_the_attack_run_directly(swept):
    model, shape, inst, noise = swept
    assert noise.sigma_stop is not None and noise.sigma_stop_low <= noise.sigma_stop <= noise.sigma_stop_high
    clean = {k: v.detach().clone() for k, v in inst.param_grads.items()}
    c = math.sqrt(sum(float((g**2).sum()) for g in clean.values()))
    assert noise.clip_norm == pytest.approx(c, rel=1e-12)
    errors = {}
    for factor in (0.3, 3.0):
        sigma = factor * noise.sigma_stop
        runs = []
        for seed in range(3):
            gen = torch.Generator().manual_seed(1000 + seed)
            noisy = {k: g + sigma * c * torch.randn(g.shape, generator=gen, dtype=torch.float64) for k, g in clean.items()}
            runs.append(_api_error(model, noisy, shape, inst.x))
        errors[factor] = statistics.median(runs)
    assert errors[0.3] < noise.threshold < errors[3.0], errors


def test_prediction_matches_the_linear_regime_and_the_bound_lies_above(swept):
    *_, noise = swept
    linear = [p for p in noise.points if p.median_rel_error is not None and p.median_rel_error < noise.threshold / 20]
    assert len(linear) >= 3
    for p in linear:
        assert p.predicted_rel_error is not None and p.bound_rel_error is not None
        assert 1 / 3 < p.median_rel_error / p.predicted_rel_error < 3
        assert p.bound_rel_error >= p.median_rel_error
    assert noise.sigma_stop_bound is not None and noise.sigma_stop_bound <= noise.sigma_stop
    shares = [g.share for g in noise.layers if g.share is not None]
    assert sum(shares) == pytest.approx(1.0, rel=1e-9)


def test_reported_epsilon_is_the_accountant_called_directly(swept):
    from opacus.accountants import RDPAccountant

    *_, noise = swept
    acc = RDPAccountant()
    acc.history.append((noise.sigma_stop, 1.0, 1))
    assert noise.privacy is not None and noise.privacy.epsilon_one_release == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)


# ----------------------------------------------------------------------------- compression
def test_compressors_against_numpy():
    gen = torch.Generator().manual_seed(3)
    g = {"a": torch.randn(7, 11, generator=gen, dtype=torch.float64), "b": torch.randn(5, generator=gen, dtype=torch.float64)}
    for p in (0.9, 0.3, 0.01):
        kept = top_k(g, p)
        for name, t in g.items():
            a = t.numpy().ravel()
            k = max(1, math.ceil(p * a.size))
            want = np.zeros_like(a)
            idx = np.argsort(-np.abs(a), kind="stable")[:k]
            want[idx] = a[idx]
            np.testing.assert_array_equal(kept[name].numpy().ravel(), want)
    half = to_fp16(g)
    np.testing.assert_array_equal(half["a"].numpy(), g["a"].numpy().astype(np.float16).astype(np.float64))
    q = to_int8(g)
    for name, t in g.items():
        scale = float(np.abs(t.numpy()).max()) / 127
        steps = q[name].numpy() / scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
        assert np.abs(q[name].numpy() - t.numpy()).max() <= scale / 2 + 1e-15


def test_compression_level_stops_the_attack_run_directly():
    torch.manual_seed(0)
    model = fcn3()
    inst = audit_model(model, (1, 28, 28), loss="logistic").instance
    found = compression_defence(inst)
    clean = {k: v.detach().clone() for k, v in inst.param_grads.items()}
    assert _api_error(model, clean, (1, 28, 28), inst.x) < 1e-10
    for p in found.points:
        assert p.stops == (p.rel_error is None or p.rel_error > found.threshold)
    if found.topk_stop is not None:
        pruned = {}
        for k, t in clean.items():
            a = t.numpy().ravel().copy()
            keep = max(1, math.ceil(found.topk_stop * a.size))
            a[np.argsort(-np.abs(a), kind="stable")[keep:]] = 0
            pruned[k] = torch.from_numpy(a.reshape(t.shape))
        assert _api_error(model, pruned, (1, 28, 28), inst.x) > found.threshold
    milder = [p for p in found.points if p.method == "top-k" and found.topk_stop is not None and p.keep_fraction > found.topk_stop]
    assert all(not p.stops for p in milder)


# ----------------------------------------------------------------------------- architecture edits
def small_net(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 8, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 1, bias=False),
    )


def test_every_suggested_edit_re_audits_deficient_and_the_dense_chain_agrees():
    torch.manual_seed(0)
    model = small_net()
    checked = audit_model(model, (3, 8, 8), loss="logistic")
    assert checked.report.verdict.input_recoverable is True
    assert dense_chain_deficits(model, (3, 8, 8), "logistic")[0] == 0
    loaded = LoadedModel(file="<test>", name="Small", module=model, input_shape=(3, 8, 8), loss="logistic")
    found = architecture_defence(loaded, AuditOptions(loss="logistic"), checked.instance.graph,
                                 {n: s.spec for n, s in checked.systems.items()}, budget_s=120)
    assert found.edits and found.best is found.edits[0] and not found.failed
    for e in found.edits:
        edited = apply_edit(model, e, (3, 8, 8))
        again = audit(edited, (3, 8, 8), loss="logistic")
        assert again.verdict.input_recoverable is False and again.verdict.input_deficit == e.input_deficit
        if not any(isinstance(m, nn.Sequential) for m in edited.children()):  # the oracle walks a flat chain
            assert dense_chain_deficits(edited, (3, 8, 8), "logistic")[0] == e.input_deficit
        assert e.params_lost == sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in edited.parameters())
    costs = [(e.params_lost, e.macs_lost) for e in found.edits]
    assert costs == sorted(costs)
    best = found.best
    assert (best.layer, best.attribute, best.old) == ("0", "out_channels", [8])
    by_hand = small_net(width=best.new[0])  # the machine-readable edit, applied without apply_edit
    assert dense_chain_deficits(by_hand, (3, 8, 8), "logistic")[0] == best.input_deficit > 0
    wider = small_net(width=best.new[0] + 1)  # the search reports the largest width that works
    assert audit(wider, (3, 8, 8), loss="logistic").verdict.input_recoverable is not False


def test_cnn6_conv2_to_20_channels_is_not_an_edit_that_works():
    torch.manual_seed(0)
    model = cnn6()
    edit = ArchitectureEdit("2", "_2", "out_channels", [36], [20], ModelStatus.UNKNOWN, None, 0, 0.0, 0, "2: out_channels 36 -> 20")
    edited = apply_edit(model, edit, (3, 32, 32))
    assert edited[4].in_channels == 20  # the layer reading it follows its new width
    verdict = audit(edited, (3, 32, 32), loss="logistic").verdict
    assert verdict.status == ModelStatus.RECOVERABLE_GIVEN_PATTERN and verdict.input_recoverable is not False


# ----------------------------------------------------------------------------- batch size
def test_batch_threshold_points_are_the_audits_at_each_batch_size():
    torch.manual_seed(0)
    model = fcn3()
    checked = audit_model(model, (1, 28, 28), loss="logistic")
    loaded = LoadedModel(file="<test>", name="FCN3", module=model, input_shape=(1, 28, 28), loss="logistic")
    found = batch_defence(loaded, AuditOptions(loss="logistic"), checked.report, max_batch=3)
    for p in found.points:
        v = audit(model, (1, 28, 28), batch_size=p.batch_size, loss="logistic").verdict
        assert (p.status, p.input_deficit) == (v.status, v.input_deficit)
    stop = next((p.batch_size for p in found.points if p.input_recoverable is not True), None)
    assert found.batch_stop == stop and stop is not None and stop > 1
    assert "RGAP403" in found.caveat and found.verification is not None and found.verification.batch_size == stop


def test_python_api_returns_the_record_the_parts_compute():
    from rgap_audit import defences
    from rgap_audit.defence import DefenceOptions

    torch.manual_seed(0)
    model = fcn3()
    found = defences(model, (1, 28, 28), loss="logistic", options=DefenceOptions(parts=("compression", "architecture")))
    assert found.noise is None and found.batch is None and found.compression is not None and found.architecture is not None
    inst = audit_model(model, (1, 28, 28), loss="logistic").instance
    direct = compression_defence(inst)
    assert [(p.method, p.keep_fraction, p.rel_error) for p in found.compression.points] == [
        (p.method, p.keep_fraction, p.rel_error) for p in direct.points
    ]
    with pytest.raises(ValueError, match="unknown defence part"):
        defences(model, (1, 28, 28), options=DefenceOptions(parts=("bogus",)))
