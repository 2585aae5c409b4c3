"""The op registry's claims, checked against the ops themselves.

Every "invertible" entry must round-trip through its inverse; every "not invertible" entry must have
a witness (two different inputs with the same output); every weighted layer's ConvSpec must compute
what the module computes and have the module's weight gradient; lookup must refine per instance.
"""

from __future__ import annotations

import operator

import pytest
import scipy.optimize
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.layergraph import build_layer_graph
from rgap_audit.ops import (
    ACTIVATION,
    AFFINE,
    EMBEDDING,
    IDENTITY,
    IO,
    LAYER,
    MERGE,
    NORM,
    OPS,
    PERMUTE,
    POOL,
    RESHAPE,
    UNKNOWN,
    check_model,
    lookup,
    wrappers,
)
from rgap_audit.tracing import trace

KINDS = {LAYER, ACTIVATION, RESHAPE, PERMUTE, IDENTITY, POOL, NORM, MERGE, AFFINE, EMBEDDING, IO, UNKNOWN}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- structure of the table
def test_every_entry_is_well_formed():
    for key, info in OPS.items():
        assert info.kind in KINDS, key
        assert info.why and "\n" not in info.why, key
        if info.kind == LAYER:
            assert info.conv_spec is not None and info.invertible, key
        if info.inverse is not None:
            assert info.invertible, key
        if info.kind == UNKNOWN:
            assert not info.invertible, key
        if info.kind == MERGE and info.invertible:  # only joins whose output holds each input as a slice
            assert info.name in ("cat", "stack"), key


def test_invertible_merges_hold_each_input_as_a_slice():
    """cat / stack are marked invertible: each input is read back from the output exactly."""
    a, b = rnd(2, 3, seed=1), rnd(2, 5, seed=2)
    out = OPS[torch.cat]
    assert out.invertible and torch.equal(torch.cat([a, b], 1)[:, :3], a) and torch.equal(torch.cat([a, b], 1)[:, 3:], b)
    c = rnd(2, 3, seed=3)
    assert OPS[torch.stack].invertible and torch.equal(torch.stack([a, c], 1)[:, 1], c)
    assert not OPS[operator.add].invertible  # a sum does not give its terms


def test_unknown_targets_are_never_safe():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    info = lookup(None, Custom())
    assert (info.kind, info.invertible, info.name) == (UNKNOWN, False, "Custom")
    assert lookup(torch.fft.fft).kind == UNKNOWN
    assert lookup("no_such_method").kind == UNKNOWN
    assert lookup([1, 2]).kind == UNKNOWN  # unhashable target


def test_subclasses_find_their_base_entry():
    class MyConv(nn.Conv2d):
        pass

    class SamePadConv(nn.Conv2d):  # computes something else than its base
        def forward(self, x):
            return super().forward(F.pad(x, (1, 0, 1, 0)))

    assert lookup(None, MyConv(2, 3, 3)).name == "Conv2d"
    odd = lookup(None, SamePadConv(2, 3, 3))
    assert odd.kind == UNKNOWN and "own forward" in odd.why
    assert lookup(None, nn.LazyLinear(3)).name == "Linear"
    assert lookup(None, nn.ReLU6()).name == "ReLU6"  # not its base Hardtanh
    assert lookup(None, nn.SyncBatchNorm(3)).kind == NORM
    assert lookup(None, nn.LSTM(2, 2)).kind == UNKNOWN


@pytest.mark.parametrize(
    "module, needle",
    [
        (nn.MultiheadAttention(8, 2), "add_bias_kv"),  # the configurations ops/attention.py does not decompose
        (nn.TransformerEncoderLayer(8, 2, 16), "rgap_audit.ops.attention"),
        (nn.TransformerDecoderLayer(8, 2, 16), "memory input"),
        (nn.Bilinear(2, 3, 4), "quadratic"),
        (nn.GRU(2, 3), "recurrent"),
    ],
)
def test_layers_not_understood_say_precisely_why(module, needle):
    info = lookup(None, module)
    assert info.kind == UNKNOWN and not info.invertible
    assert needle in info.why


# ----------------------------------------------------------------------------- inverses round-trip
def _prelu_positive() -> nn.PReLU:
    m = nn.PReLU(num_parameters=3)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.1, 0.5, 2.0]))
    return m


def _bn_eval(cls=nn.BatchNorm2d) -> nn.Module:
    m = cls(3)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.3, -1.0, 2.0]))
        m.running_var.copy_(torch.tensor([0.5, 2.0, 0.1]))
        m.weight.copy_(torch.tensor([1.5, -0.7, 0.2]))
        m.bias.copy_(torch.tensor([0.1, 0.0, -3.0]))
    return m.double().eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LeakyReLU(0.2),
        nn.Sigmoid,
        nn.Tanh,
        lambda: nn.ELU(0.7),
        lambda: nn.Softplus(beta=2.0),
        nn.Softsign,
        nn.LogSigmoid,
        _prelu_positive,
        _bn_eval,
        lambda: _bn_eval(nn.BatchNorm1d),
        nn.Identity,
        lambda: nn.Dropout(0.5).eval(),
        lambda: nn.AvgPool2d(1),
    ],
    ids=["leaky", "sigmoid", "tanh", "elu", "softplus", "softsign", "logsigmoid", "prelu", "bn2d", "bn1d", "identity", "dropout", "avgpool-k1"],
)
def test_invertible_modules_round_trip(make):
    m = make().double()
    info = lookup(None, m)
    assert info.invertible and info.inverse is not None, info
    z = rnd(4, 3) if isinstance(m, nn.BatchNorm1d) else 2 * rnd(2, 3, 5, 4)
    with torch.no_grad():
        y = m(z)
    back = info.inverse(m, {}, y)
    torch.testing.assert_close(back, z, rtol=1e-7, atol=1e-9)


def test_functional_inverses_read_keyword_arguments():
    z = rnd(50)
    for fn, kwargs in ((F.leaky_relu, {"negative_slope": 0.3}), (F.elu, {"alpha": 0.5}), (F.softplus, {"beta": 3.0})):
        y = fn(z, **kwargs)
        torch.testing.assert_close(lookup(fn).inverse(None, kwargs, y), z, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- non-invertibility witnesses
def _root(f, lo, hi):
    return scipy.optimize.brentq(f, lo, hi, xtol=1e-15)


def _witness_not_monotone(fn, x_right: float, lo: float, argmin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two scalars on either side of the minimum with the same value."""
    def f(t: float) -> float:
        return float(fn(torch.tensor(t, dtype=torch.float64)))

    target = f(x_right)
    x_left = _root(lambda t: f(t) - target, lo, argmin)
    return torch.tensor([x_right], dtype=torch.float64), torch.tensor([x_left], dtype=torch.float64)


def _pair(module_or_fn, a, b):
    f = module_or_fn
    with torch.no_grad():
        return f(a), f(b)


NON_INVERTIBLE = {
    "relu": lambda: (nn.ReLU(), torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 2.0])),
    "relu6": lambda: (nn.ReLU6(), torch.tensor([7.0]), torch.tensor([9.0])),
    "hardtanh": lambda: (nn.Hardtanh(), torch.tensor([2.0]), torch.tensor([5.0])),
    "hardsigmoid": lambda: (nn.Hardsigmoid(), torch.tensor([4.0]), torch.tensor([5.0])),
    "gelu": lambda: (nn.GELU(), *_witness_not_monotone(F.gelu, -0.3, -6.0, -0.7517916)),
    "silu": lambda: (nn.SiLU(), *_witness_not_monotone(F.silu, -0.5, -20.0, -1.2784645)),
    "mish": lambda: (nn.Mish(), *_witness_not_monotone(F.mish, -0.5, -20.0, -1.19264)),
    "hardswish": lambda: (nn.Hardswish(), torch.tensor([-4.0]), torch.tensor([-5.0])),
    "softmax": lambda: (nn.Softmax(dim=-1), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 4.0, 5.0]])),
    "logsoftmax": lambda: (nn.LogSoftmax(dim=-1), torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])),
    "layernorm": lambda: (nn.LayerNorm(4), torch.tensor([[1.0, 2.0, 0.0, 5.0]]), torch.tensor([[4.0, 5.0, 3.0, 8.0]])),
    "groupnorm": lambda: (  # each group of 2 channels shifted by its own constant
        nn.GroupNorm(2, 4),
        torch.tensor([[[1.0], [2.0], [0.0], [5.0]]]),
        torch.tensor([[[2.0], [3.0], [-2.0], [3.0]]]),
    ),
    "instancenorm": lambda: (nn.InstanceNorm1d(2), torch.tensor([[[1.0, 3.0], [0.0, 1.0]]]), torch.tensor([[[5.0, 7.0], [7.0, 8.0]]])),
    "maxpool": lambda: (nn.MaxPool1d(2), torch.tensor([[[1.0, 5.0]]]), torch.tensor([[[2.0, 5.0]]])),
    "adaptivemaxpool": lambda: (nn.AdaptiveMaxPool1d(1), torch.tensor([[[1.0, 5.0]]]), torch.tensor([[[2.0, 5.0]]])),
    "avgpool": lambda: (nn.AvgPool1d(2), torch.tensor([[[1.0, 5.0]]]), torch.tensor([[[2.0, 4.0]]])),
    "adaptiveavgpool": lambda: (nn.AdaptiveAvgPool2d(1), torch.tensor([[[[1.0, 5.0]]]]), torch.tensor([[[[2.0, 4.0]]]])),
    "bn-no-running-stats": lambda: (
        nn.BatchNorm1d(1, track_running_stats=False).eval(),
        torch.tensor([[1.0], [3.0]]),
        torch.tensor([[5.0], [7.0]]),
    ),
}


@pytest.mark.parametrize("name", sorted(NON_INVERTIBLE))
def test_non_invertible_entries_have_a_witness(name):
    m, a, b = NON_INVERTIBLE[name]()
    m = m.double()
    a, b = a.double(), b.double()
    assert not torch.equal(a, b)
    ya, yb = _pair(m, a, b)
    torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-9)
    info = lookup(None, m)
    assert not info.invertible and info.kind != UNKNOWN, info


def test_instance_refinements():
    bn = _bn_eval()
    assert lookup(None, bn).invertible
    with torch.no_grad():
        bn.weight[1] = 0.0
    info = lookup(None, bn)
    assert not info.invertible and info.inverse is None and "channel(s) 1" in info.why
    neg = nn.PReLU(2)
    with torch.no_grad():
        neg.weight.copy_(torch.tensor([0.3, -0.2]))
    assert not lookup(None, neg).invertible
    # channel 1 has slope -0.2: x = -1 and x = 0.2 both give 0.2
    with torch.no_grad():
        torch.testing.assert_close(neg(torch.tensor([[-1.0, -1.0]])), neg(torch.tensor([[-1.0, 0.2]])))
    assert lookup(None, nn.AvgPool2d(1)).invertible and not lookup(None, nn.AvgPool2d(2)).invertible


def test_batchnorm_train_mode_is_flagged():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    warnings = check_model(model)
    assert [p for p, _ in warnings] == ["1"] and "training mode" in warnings[0][1]
    assert check_model(model.eval()) == []
    always = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)).eval()
    (w,) = check_model(always)
    assert "batch statistics" in w[1]
    assert not lookup(None, always[0]).invertible


# ----------------------------------------------------------------------------- weighted layers: ConvSpec
CONVS = {
    "conv1d-dilated": (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=1, dilation=2), (4, 23)),
    "conv2d-depthwise": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), (8, 9, 9)),
    "conv2d-depthwise-multiplier": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4), (4, 6, 7)),
    "conv2d-groups-dilation": (lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2), (4, 9, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (3, 2, 2), stride=(1, 2, 1), padding=1), (2, 4, 5, 3)),
    "linear": (lambda: nn.Linear(5, 3), (5,)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_module_conv_spec_matches_module(name):
    make, in_shape = CONVS[name]
    m = make().double()
    info = lookup(None, m)
    assert info.kind == LAYER
    spec = info.conv_spec(m, (), {}, in_shape)
    x = rnd(3, *in_shape, seed=1)
    torch.testing.assert_close(spec.forward(x), m(x))
    # the normalised gradient constraints are the module's weight gradient
    k = torch.randn_like(m(x))
    (g,) = torch.autograd.grad((m(x) * k).sum(), m.weight)
    torch.testing.assert_close(spec.weight_grad(x, k), g)


def test_linear_leading_dimensions_are_samples():
    m = nn.Linear(4, 3).double()
    x = rnd(2, 5, 4)
    spec = lookup(None, m).conv_spec(m, (), {}, (5, 4))
    assert spec.in_shape == (4,)
    torch.testing.assert_close(spec.forward(x.reshape(-1, 4)).reshape(2, 5, 3), m(x))


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3, 3))  # groups=2 over 4 input channels
        self.v = nn.Parameter(torch.randn(6 * 3 * 3, 5))  # x @ v
        self.u = nn.Parameter(torch.randn(2, 5))  # x @ u.T

    def forward(self, x):
        h = F.conv2d(x, self.w, None, 2, 1, 1, 2)
        h = torch.matmul(torch.tanh(h).flatten(1), self.v)
        return h @ self.u.t()


def test_functional_and_matmul_layers_are_normalised():
    model = _Functional().double()
    x = rnd(1, 4, 6, 6)
    gm = trace(model, x)
    lg = build_layer_graph(gm)
    names = lg.weighted()
    targets = {lg.node(n).fx.target for n in names}
    assert targets == {F.conv2d, wrappers.linear_matmul, wrappers.linear_matmul_t}
    values = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out
            return out

    Rec(gm).run(x)
    for n in names:
        spec = lg.conv_spec(n)
        src = lg.data_args(n)[0]
        inp = values[src]
        out = spec.forward(inp.reshape(-1, *spec.in_shape)).reshape(values[n].shape)
        torch.testing.assert_close(out, values[n])
    # x @ v: the ConvSpec weight is v^T, so the shared gradient of v is the transpose of the spec's
    (mm,) = [n for n in names if lg.node(n).fx.target is wrappers.linear_matmul]
    spec = lg.conv_spec(mm)
    inp = values[lg.data_args(mm)[0]].detach()
    k = rnd(*values[mm].shape, seed=3)
    v = gm.v.detach().requires_grad_(True)
    (gv,) = torch.autograd.grad((torch.matmul(inp, v) * k).sum(), v)
    torch.testing.assert_close(spec.weight_grad(inp, k), gv.T)


def test_exported_aten_ops_are_all_registered():
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.ln = nn.LayerNorm(8)
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            h = F.leaky_relu(self.c(x), 0.1)
            h = F.max_pool2d(h, 2) + F.avg_pool2d(h, 2)
            h = torch.cat([F.gelu(h), F.silu(h)], dim=1)  # (1, 8, 4, 4)
            h = F.adaptive_avg_pool2d(h, 2).flatten(2).transpose(1, 2)  # (1, 4, 8)
            h = self.l(self.ln(h)).permute(0, 2, 1).unsqueeze(1)
            return torch.softmax(h, dim=-1).mean(dim=(1, 3))

    ep = torch.export.export(Wide().eval(), (torch.randn(1, 3, 8, 8),), strict=False)
    targets = {n.target for n in ep.module().graph.nodes if n.op == "call_function"}
    missing = [t for t in targets if lookup(t).kind == UNKNOWN]
    assert not missing, missing
    assert len(targets) >= 14
