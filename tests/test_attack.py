"""Closed-form R-GAP reconstruction (rgap_audit.attack): paper networks, heads, ReLU, error cases.

Every error is computed against the true input of the run, never against a stored number.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from examples.mlp_bias import BiasedMLP
from examples.paper_nets import cnn6, cnn6_d, fcn3
from rgap_audit.attack import reconstruct
from rgap_audit.attack.heads import F_MIN, U_STAR, logistic_f, logistic_roots
from rgap_audit.convspec import ConvSpec
from rgap_audit.errors import AuditError
from rgap_audit.losses import loss_value


def _grads(model: nn.Module, x: torch.Tensor, loss: str, label) -> dict[str, torch.Tensor]:
    model = model.double()
    dtype = torch.float64 if loss == "logistic" else torch.long
    lab = torch.tensor([label], dtype=dtype)
    out = model(x)
    names = [n for n, _ in model.named_parameters()]
    gs = torch.autograd.grad(loss_value(loss, out, lab), [p for _, p in model.named_parameters()])
    return dict(zip(names, gs))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(-1) - b.reshape(-1)).norm() / b.norm())


def _negative_margin_label(model: nn.Module, x: torch.Tensor) -> float:
    """The logistic label that makes the margin y*mu negative: one root, no ambiguity."""
    with torch.no_grad():
        mu = float(model.double()(x).reshape(-1)[0])
    return -1.0 if mu > 0 else 1.0


# ----------------------------------------------------------------------------- paper networks
def test_cnn6_float64_random_input_recovered():
    torch.manual_seed(0)
    model = cnn6().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    y = _negative_margin_label(model, x)
    rec = reconstruct(model, _grads(model, x, "logistic", y), (3, 32, 32), "logistic", true_input=x)
    assert rec.complete and rec.projected is None
    assert _rel(rec.input, x) < 1e-6
    assert rec.label == y and rec.label_status == "recovered"
    assert rec.gradient_residual < 1e-8
    # every layer's recovered input, measured against the true layer inputs of x
    assert [s.op for s in rec.layers] == ["Linear"] + ["Conv2d"] * 6
    for step in rec.layers:
        assert step.rel_error is not None and step.rel_error < 1e-6, step
        assert step.nullity == 0


def test_fcn3_exact_up_to_rounding():
    torch.manual_seed(1)
    model = fcn3().double()
    x = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    y = _negative_margin_label(model, x)
    rec = reconstruct(model, _grads(model, x, "logistic", y), (1, 28, 28), "logistic")
    assert rec.input.shape == (1, 1, 28, 28)
    assert _rel(rec.input, x) < 1e-12
    assert rec.label == y


def test_biased_mlp_exact_and_label_from_bias():
    torch.manual_seed(2)
    model = BiasedMLP().double()
    x = torch.randn(1, 64, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "cross-entropy", 7), (64,), "cross-entropy", true_input=x)
    assert _rel(rec.input, x) < 1e-12
    assert rec.label == 7 and rec.label_status == "recovered"
    assert "bias" in rec.layers[0].method and "bias leak" in rec.layers[1].method
    assert rec.layers[1].residual_bias < 1e-10  # the chain's k agrees with the bias gradient


def test_cnn6_d_plain_degrades_at_the_deficient_layer_projected_recovers():
    from rgap_audit.rank import layer_rank_counting

    torch.manual_seed(0)
    model = cnn6_d().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    y = _negative_margin_label(model, x)
    rec = reconstruct(model, _grads(model, x, "logistic", y), (3, 32, 32), "logistic", true_input=x)
    errs = [s.rel_error for s in rec.layers]  # measured by the engine against the true layer inputs of x
    # the rank analysis marks conv2 (node _2) deficient: unknowns - closed-form rank = 280
    conv2 = model[2]
    spec = ConvSpec.from_module(conv2, (12, 17, 17))
    deficit = spec.n_in - layer_rank_counting(spec)
    assert deficit == 280
    names = [s.node for s in rec.layers]
    i2 = names.index("_2")
    assert rec.layers[i2].nullity == deficit
    assert all(s.nullity == 0 for j, s in enumerate(rec.layers) if j != i2)
    # exact above conv2, the error enters at conv2's input and reaches the input
    assert max(errs[:i2]) < 1e-8
    assert errs[i2] > 1e-2
    assert _rel(rec.input, x) > 1e-2
    # projected variant: only the known directions of z below conv2 -> the input comes back
    assert rec.projected is not None
    assert _rel(rec.projected.input, x) < 1e-6
    assert rec.best() is rec.projected


# ----------------------------------------------------------------------------- logistic head
def test_logistic_roots_cover_both_branches():
    assert logistic_f(U_STAR) == pytest.approx(F_MIN, abs=1e-15)
    for u in (-30.0, -3.0, -0.1, 0.0, 0.4, 1.0, 2.0, 5.0, 40.0):
        roots = logistic_roots(logistic_f(u))
        assert any(abs(r - u) <= 1e-9 * max(1.0, abs(u)) for r in roots), (u, roots)
        assert len(roots) == (2 if u > 0 and abs(u - U_STAR) > 1e-6 else 1)
        for r in roots:
            assert logistic_f(r) == pytest.approx(logistic_f(u), rel=1e-12, abs=1e-300)
    assert logistic_roots(F_MIN - 1e-3) == []


def test_logistic_two_roots_resolved_by_the_layers_below():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 40, bias=False), nn.Sigmoid(), nn.Linear(40, 1, bias=False)).double()
    x = torch.randn(1, 12, dtype=torch.float64)
    with torch.no_grad():
        mu = float(model(x))
    y = 1.0 if mu > 0 else -1.0  # positive margin: <w, dL/dw> lies in (F_MIN, 0)
    rec = reconstruct(model, _grads(model, x, "logistic", y), (12,), "logistic")
    assert rec.head["two_roots"] and rec.head["candidates"] == 4
    assert any(abs(r - abs(mu)) < 1e-9 for r in rec.head["roots"])
    assert _rel(rec.input, x) < 1e-10
    assert rec.label == y and rec.alternatives == []


def test_logistic_two_roots_in_a_homogeneous_net_are_reported():
    # bias-free LeakyReLU nets are positively homogeneous: x and c*x give the same gradient
    torch.manual_seed(4)
    model = fcn3().double()
    x = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    y = -_negative_margin_label(model, x)
    rec = reconstruct(model, _grads(model, x, "logistic", y), (1, 28, 28), "logistic")
    assert rec.head["two_roots"] and len(rec.alternatives) == 1
    assert any("positively homogeneous" in w for w in rec.warnings)
    best = min(_rel(c, x) for c in [rec.input, *rec.alternatives])
    assert best < 1e-10
    c = float(rec.alternatives[0].reshape(-1) @ rec.input.reshape(-1) / rec.input.norm() ** 2)
    assert c > 0 and _rel(rec.alternatives[0], c * rec.input) < 1e-10


def test_logistic_regression_sign_ambiguity_is_reported():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 1, bias=False)).double()
    x = torch.randn(1, 10, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "logistic", _negative_margin_label(model, x)), (10,), "logistic")
    assert rec.label_status == "ambiguous"
    assert min(_rel(c, x) for c in [rec.input, *rec.alternatives]) < 1e-12


# ----------------------------------------------------------------------------- cross-entropy heads, convs
def test_cross_entropy_without_bias_recovers_label_and_scale():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv1d(2, 6, 5, stride=2, padding=1, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 15, 4, bias=False)
    ).double()
    x = torch.randn(1, 2, 31, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "cross-entropy", 2), (2, 31), "cross-entropy")
    assert rec.label == 2 and rec.label_status == "recovered"
    assert _rel(rec.input, x) < 1e-10


def test_two_class_cross_entropy_without_bias():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.LeakyReLU(0.1), nn.Linear(16, 2, bias=False)).double()
    x = torch.randn(1, 8, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "cross-entropy", 1), (8,), "cross-entropy")
    found = [rec.input, *rec.alternatives]
    assert min(_rel(c, x) for c in found) < 1e-10
    assert rec.label == 1 or rec.label_status == "ambiguous"


def test_grouped_dilated_strided_conv_with_bias_and_sigmoid():
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(4, 16, 3, stride=2, padding=1, groups=2, bias=True),
        nn.Sigmoid(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4, bias=True),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 5),
    ).double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "cross-entropy", 4), (4, 8, 8), "cross-entropy", true_input=x)
    assert rec.label == 4
    assert _rel(rec.input, x) < 1e-8
    for s in rec.layers[1:]:
        assert s.residual_bias is not None and s.residual_bias < 1e-8  # biases used as checks


def test_relu_mlp_reports_lost_rows():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(10, 30, bias=False), nn.ReLU(), nn.Linear(30, 3, bias=False)).double()
    x = torch.randn(1, 10, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "cross-entropy", 0), (10,), "cross-entropy")
    assert _rel(rec.input, x) < 1e-10  # the gradient rows alone pin down a bias-free Linear's input
    assert rec.layers[1].rows_lost > 0 and any("ReLU" in n for n in rec.layers[1].notes)


def test_walk_reads_through_an_op_it_cannot_invert():
    """Max-pooling has no inverse, but at a fixed arg-max it is linear: the layer below is solved over its own
    input with the pooled values as forward rows (the one-layer form of a joint segment's solve)."""
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3, bias=False)
    ).double()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    grads = _grads(model, x, "cross-entropy", 1)
    given = reconstruct(model, grads, (1, 8, 8), "cross-entropy", true_input=x)
    step = given.layers[1]
    assert "read through MaxPool" in step.method and step.pattern == "given" and step.nullity == 0
    assert given.complete and _rel(given.input, x) < 1e-10  # 36 gradient + 64 pooled rows determine 64 unknowns
    assert given.label == 1
    # from the gradient alone the arg-max pattern is estimated, and the report says so
    alone = reconstruct(model, grads, (1, 8, 8), "cross-entropy")
    assert alone.layers[1].pattern == "estimated" and not alone.patterns_given()


# ----------------------------------------------------------------------------- bad input
def _fcn3_case():
    torch.manual_seed(11)
    model = fcn3().double()
    x = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    return model, x, _grads(model, x, "logistic", 1.0)


def test_unsupported_loss_is_an_audit_error():
    model, _, g = _fcn3_case()
    with pytest.raises(AuditError, match="unsupported loss"):
        reconstruct(model, g, (1, 28, 28), "mse")


@pytest.mark.parametrize("bad", ["nan", "inf", "missing", "shape"])
def test_bad_gradients_are_audit_errors(bad):
    model, _, g = _fcn3_case()
    name = "1.weight"
    if bad == "nan":
        g[name] = g[name].clone()
        g[name][0, 0] = math.nan
    elif bad == "inf":
        g[name] = g[name].clone()
        g[name][0, 0] = math.inf
    elif bad == "missing":
        del g[name]
    else:
        g[name] = g[name][:, :10]
    with pytest.raises(AuditError) as info:
        reconstruct(model, g, (1, 28, 28), "logistic")
    assert "\n" not in info.value.one_line()


def test_wrong_true_input_shape_and_unsupported_head():
    model, _, g = _fcn3_case()
    with pytest.raises(AuditError, match="true input"):
        reconstruct(model, g, (1, 28, 28), "logistic", true_input=torch.zeros(5))
    head = nn.Sequential(nn.Linear(6, 1, bias=False), nn.Sigmoid()).double()
    xs = torch.randn(1, 6, dtype=torch.float64)
    with pytest.raises(AuditError, match="unsupported head"):
        reconstruct(head, _grads(head, xs, "logistic", 1.0), (6,), "logistic")


def test_relu_cnn_projected_variant_estimates_the_pattern():
    from examples.relu_cnn import ReluCNN

    torch.manual_seed(1)
    model = ReluCNN().double()
    x = torch.randn(1, 1, 14, 14, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "cross-entropy", 7), (1, 14, 14), "cross-entropy", true_input=x)
    assert rec.label == 7
    deficient = [s for s in rec.layers if s.nullity]
    assert [s.node for s in deficient] == ["features_2"] and deficient[0].rows_lost > 0
    assert _rel(rec.input, x) > 1e-2  # plain R-GAP: the minimum-norm guess below the deficient layer
    assert _rel(rec.projected.input, x) < 1e-8  # ReLU zeros constrain the carried directions


class _PermuteNet(nn.Module):
    """Conv, eval-mode BatchNorm, Tanh, permute, a constant affine map, flatten and x @ W (a Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Tanh()
        self.W = nn.Parameter(torch.randn(288, 5) * 0.1)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x))).permute(0, 2, 3, 1)
        return (h * 2.0 + 1.0).flatten(1) @ self.W


def test_links_through_batchnorm_permute_affine_and_matmul():
    torch.manual_seed(12)
    model = _PermuteNet().double()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.weight.data.uniform_(0.5, 1.5)
    model.bn.bias.data.normal_()
    model.eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    rec = reconstruct(model, _grads(model, x, "cross-entropy", 3), (3, 6, 6), "cross-entropy")
    assert rec.complete and rec.label == 3
    assert _rel(rec.input, x) < 1e-10
    assert rec.gradient_residual < 1e-10  # the W of x @ W gets its gradient in its own orientation
