"""Transposed convolutions (ConvTranspose1d/2d/3d, F.conv_transpose*, aten.conv_transpose*).

The analysis solves a transposed convolution as the equivalent stride-1 convolution of its input with
zeros inserted (rgap_audit/convtranspose.py). Everything here is checked against systems built from
the module itself with autograd, in the layer's actual input coordinates: K = d(dL/dW)/dx for a fixed
output gradient k (the Jacobian of autograd.grad with create_graph), F = dz/dx; ranks by
dense SVD. The end-to-end audits are checked against one dense system over all layer inputs of the
chain (the construction of test_analysis.py, written here with torch.func.functional_call so that it
needs nothing from the layer but its forward).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracles import dense_chain_deficits, dense_k
from rgap_audit.analysis import audit
from rgap_audit.attack import reconstruct
from rgap_audit.convtranspose import ConvTransposeSpec
from rgap_audit.errors import AttackUnsupported
from rgap_audit.layergraph import build_layer_graph
from rgap_audit.losses import loss_value, make_labels
from rgap_audit.ops import LAYER, lookup
from rgap_audit.rank import ForwardInfo, layer_rank
from rgap_audit.records import Verdict
from rgap_audit.tracing import trace

_EPS = float(np.finfo(np.float64).eps)
CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ----------------------------------------------------------------------------- dense references
def _module(nd: int, cin: int, cout: int, k, s, p, op=0, g: int = 1, d=1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cls = CONVT[nd - 1]
    return cls(cin, cout, k, stride=s, padding=p, output_padding=op, groups=g, dilation=d, bias=False).double()


def dense_f(m: nn.Module, x: torch.Tensor) -> np.ndarray:
    """F: Jacobian of the layer wrt its input, (N * n_out, N * n_in)."""
    j = torch.autograd.functional.jacobian(lambda xx: m(xx), x.detach(), vectorize=True)
    return j.reshape(-1, x.numel()).detach().numpy()


def _rank(a: np.ndarray) -> int:
    """Numerical rank; asserts that the spectrum has a clear gap there (a well-posed comparison)."""
    if a.size == 0 or not np.any(a):
        return 0
    s = np.linalg.svd(a, compute_uv=False)
    r = int((s > max(a.shape) * _EPS * s[0]).sum())
    assert s[r - 1] / s[0] > 1e-9, f"no clear numerical rank: sigma_{r - 1}/sigma_0 = {s[r - 1] / s[0]:.1e}"
    if r < s.size:
        assert s[r] / s[0] < 1e-12, f"no clear numerical rank: sigma_{r}/sigma_0 = {s[r] / s[0]:.1e}"
    return r


def _stack(*blocks: np.ndarray) -> np.ndarray:
    return np.vstack([b / np.linalg.norm(b) for b in blocks if b.size and np.linalg.norm(b) > 0])


# ----------------------------------------------------------------------------- configurations
# (nd, cin, cout, kernel, stride, padding, output_padding, groups, dilation, spatial input, samples)
CONFIGS = {
    "1d-s1": (1, 2, 3, 3, 1, 0, 0, 1, 1, (6,), 1),
    "1d-s2-op1": (1, 3, 2, 3, 2, 1, 1, 1, 1, (5,), 1),
    "1d-s3-op2-cout>cin": (1, 2, 4, 4, 3, 1, 2, 1, 1, (4,), 1),
    "1d-dilation2": (1, 2, 2, 3, 2, 1, 1, 1, 2, (5,), 1),
    "1d-cropped-k1-p1": (1, 2, 3, 1, 2, 1, 1, 1, 1, (5,), 1),
    "1d-cropped-both-ends": (1, 2, 3, 3, 2, 4, 1, 1, 1, (7,), 1),
    "1d-2samples": (1, 2, 2, 3, 2, 0, 0, 1, 1, (4,), 2),
    "2d-s2-p1-op1": (2, 2, 3, 3, 2, 1, 1, 1, 1, (4, 4), 1),
    "2d-cout<cin-k4": (2, 4, 2, 4, 2, 1, 0, 1, 1, (3, 3), 1),
    "2d-groups2": (2, 4, 6, 3, 2, 0, 0, 2, 1, (3, 3), 1),
    "2d-depthwise": (2, 3, 3, 3, 2, 1, 1, 3, 1, (3, 3), 1),
    "2d-s3": (2, 1, 3, 3, 3, 0, 0, 1, 1, (3, 3), 1),
    "2d-dilation2-op1": (2, 2, 2, 3, 2, 2, 1, 1, 2, (3, 3), 1),
    "2d-rect": (2, 2, 3, (3, 2), (2, 1), (1, 0), (1, 0), 1, 1, (3, 4), 1),
    "2d-2samples": (2, 2, 2, 2, 2, 0, 0, 1, 1, (3, 3), 2),
    "2d-cin>>cout": (2, 8, 1, 2, 2, 0, 0, 1, 1, (3, 3), 1),
    "1d-narrow-overlap": (1, 4, 1, 3, 2, 1, 0, 1, 1, (6,), 1),
    "1d-narrow-2samples": (1, 3, 1, 3, 2, 1, 1, 1, 1, (5,), 2),
    "2d-wide-input": (2, 2, 1, 3, 2, 1, 0, 1, 1, (5, 5), 1),
    "2d-groups-narrow": (2, 6, 2, 3, 2, 1, 1, 2, 1, (3, 3), 1),
    "3d-s2": (3, 2, 2, 2, 2, 0, 0, 1, 1, (2, 2, 2), 1),
    "3d-narrow": (3, 9, 1, 2, 2, 0, 0, 1, 1, (2, 2, 2), 1),
    "3d-s2-p1-op1": (3, 1, 2, 3, 2, 1, 1, 1, 1, (2, 2, 2), 1),
}


def _instance(cfg, seed: int = 0):
    nd, cin, cout, k, s, p, op, g, d, sp, n = cfg
    m = _module(nd, cin, cout, k, s, p, op, g, d, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, cin, *sp, generator=gen, dtype=torch.float64)
    z = m(x).detach()
    kk = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    spec = ConvTransposeSpec.from_module(m, tuple(x.shape[1:]))
    return m, spec, x, kk


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_equivalent_convolution_is_the_layer(name):
    """The equivalent stride-1 convolution on the zero-inserted input reproduces z and dL/dW exactly."""
    m, spec, x, kk = _instance(CONFIGS[name])
    emb = spec.embedding()
    z = m(x).detach()
    assert spec.out_shape == tuple(z.shape[1:])
    torch.testing.assert_close(spec.forward(x), z)
    torch.testing.assert_close(emb.spec.forward(emb.embed(x)), z)
    (gw,) = torch.autograd.grad((m(x) * kk).sum(), m.weight)
    torch.testing.assert_close(spec.weight_grad(x, kk), gw)
    torch.testing.assert_close(spec.grad_from_equivalent(emb.spec.weight_grad(emb.embed(x), kk)), gw)
    # every actual entry that has a place sits at a distinct position; the rest of the input is known
    placed = emb.index[emb.index >= 0]
    assert np.unique(placed).size == placed.size
    known = emb.known_mask(x.shape[0], None)
    assert int((~known).sum()) == x.shape[0] * spec.in_channels * placed.size


def _check_layer(spec, m, x, kk, fwd: ForwardInfo, f_rows: np.ndarray | None, known: torch.Tensor | None = None):
    """layer_rank against dense SVDs of K and [K; F] (columns of known entries dropped) and its null basis."""
    kmat = dense_k(m, x, kk)
    keep = np.ones(x.numel(), dtype=bool) if known is None else ~known.reshape(-1).numpy()
    res = layer_rank(spec, kk, fwd, known=known, want_null=True)
    assert res.unknowns == int(keep.sum())
    assert res.grad_rows == m.weight.numel()
    rank_k = _rank(kmat[:, keep])
    assert res.rank_grad == rank_k
    assert res.rank_grad_counting >= rank_k  # a proven upper bound
    full = kmat[:, keep] if f_rows is None else _stack(kmat[:, keep], f_rows[:, keep])
    rank = _rank(full)
    assert res.rank == rank and res.deficit == res.unknowns - rank
    # the null basis: actual input coordinates, orthonormal, zero on known entries, annihilated by K and F
    null = res.null_basis.numpy()
    assert null.shape == (x.numel(), res.deficit)
    np.testing.assert_allclose(null.T @ null, np.eye(res.deficit), atol=1e-9)
    assert not np.any(null[~keep])
    assert np.linalg.norm(kmat @ null) <= 1e-8 * max(1.0, np.linalg.norm(kmat))
    if f_rows is not None:
        assert np.linalg.norm(f_rows @ null) <= 1e-8 * max(1.0, np.linalg.norm(f_rows))
    return res


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_rank_matches_dense_svd_with_z_known(name):
    m, spec, x, kk = _instance(CONFIGS[name])
    _check_layer(spec, m, x, kk, ForwardInfo(), dense_f(m, x))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_rank_matches_dense_svd_gradient_only(name):
    m, spec, x, kk = _instance(CONFIGS[name])
    res = _check_layer(spec, m, x, kk, ForwardInfo(none=True, rows=0), None)
    assert res.fwd_rows == 0


@pytest.mark.parametrize("name", ["1d-s2-op1", "2d-s2-p1-op1", "2d-groups2", "1d-cropped-both-ends", "3d-s2-p1-op1"])
def test_layer_rank_with_known_inputs_and_carried_directions(name):
    """A known-input mask given in ACTUAL coordinates, and directions of z left undetermined above."""
    m, spec, x, kk = _instance(CONFIGS[name], seed=3)
    gen = torch.Generator().manual_seed(7)
    known = torch.rand(x.shape, generator=gen) < 0.3
    n_out = kk.numel()
    u, _ = torch.linalg.qr(torch.randn(n_out, max(1, n_out // 5), generator=gen, dtype=torch.float64))
    q, _ = np.linalg.qr(u.numpy(), mode="complete")
    f_rows = q[:, u.shape[1] :].T @ dense_f(m, x)  # only the directions of z orthogonal to u are known
    _check_layer(spec, m, x, kk, ForwardInfo(unknown=u), f_rows, known=known)


def test_the_configurations_cover_deficient_and_full_rank_layers():
    """The comparisons above are not vacuous: some layers lose directions, some gradients are not full rank."""
    deficits, known_z, cropped = [], [], []
    for cfg in CONFIGS.values():
        _m, spec, _x, kk = _instance(cfg)
        res = layer_rank(spec, kk, ForwardInfo(none=True, rows=0), want_null=False)
        assert res.rank_grad == res.rank_grad_counting  # the closed form's generic value, here
        deficits.append(res.deficit)
        res = layer_rank(spec, kk, ForwardInfo(), want_null=False)
        known_z.append((res.rank_grad < res.rank < res.unknowns, res.deficit))
        cropped.append(spec.embedding().n_cropped)
    assert sum(d == 0 for d in deficits) >= 5 and sum(d > 0 for d in deficits) >= 5
    assert sum(partial for partial, _ in known_z) >= 4  # forward rows add rank, yet directions remain
    assert sum(d == 0 for _, d in known_z) >= 5
    assert sum(c > 0 for c in cropped) == 2


# ----------------------------------------------------------------------------- hypothesis: random configs
@st.composite
def convt_configs(draw):
    nd = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 1, 2]))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    p = draw(st.integers(0, d * (k - 1) + 1))  # one past d*(k-1): input entries that reach no output
    op = draw(st.integers(0, max(s, d) - 1))
    h = draw(st.integers(2, 5 if nd == 1 else 3))
    n = draw(st.integers(1, 2))
    out = (h - 1) * s - 2 * p + d * (k - 1) + op + 1
    if out < 1:
        p = 0
    return (nd, cin, cout, k, s, p, op, g, d, (h,) * nd, n)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(convt_configs())
def test_random_configs_match_dense_svd(cfg):
    m, spec, x, kk = _instance(cfg)
    _check_layer(spec, m, x, kk, ForwardInfo(), dense_f(m, x))


# ----------------------------------------------------------------------------- end to end
def _decoder(width: int = 4, last: int = 2, relu: bool = False) -> nn.Sequential:
    act = nn.ReLU if relu else (lambda: nn.LeakyReLU(0.2))
    return nn.Sequential(
        nn.Linear(6, width * 3 * 3, bias=False),
        nn.Unflatten(1, (width, 3, 3)),
        nn.ConvTranspose2d(width, 3, 3, stride=2, padding=1, output_padding=1, bias=False),  # 3x3 -> 6x6
        act(),
        nn.ConvTranspose2d(3, last, 4, stride=2, padding=1, bias=False),  # 6x6 -> 12x12
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(last * 12 * 12, 1, bias=False),
    )


DECODERS = {
    "decoder": (lambda: _decoder(), (6,), "logistic"),
    "decoder-relu": (lambda: _decoder(relu=True), (6,), "logistic"),
    "decoder-narrow": (  # ConvTranspose 8 -> 1 with k = s = 2: fewer gradient + forward rows than unknowns
        lambda: nn.Sequential(
            nn.Linear(5, 8 * 3 * 3, bias=False),
            nn.Unflatten(1, (8, 3, 3)),
            nn.ConvTranspose2d(8, 1, 2, stride=2, bias=False),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(36, 1, bias=False),
        ),
        (5,),
        "logistic",
    ),
    "decoder-1d-ce": (
        lambda: nn.Sequential(
            nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.Tanh(),
            nn.ConvTranspose1d(2, 2, 3, stride=3, bias=False),
            nn.Flatten(),
            nn.Linear(2 * 30, 3, bias=False),
        ),
        (3, 5),
        "cross-entropy",
    ),
}


def _seeded(make):
    torch.manual_seed(0)
    return make().double()


@pytest.mark.parametrize(("name", "batch"), [(n, 1) for n in sorted(DECODERS)] + [("decoder-narrow", 2), ("decoder-1d-ce", 2)])
def test_decoder_audit_matches_dense_chain(name, batch):
    make, shape, loss = DECODERS[name]
    model = _seeded(make)
    rep = audit(model, shape, loss=loss, seed=0, batch_size=batch)
    layers = [r for r in rep.layers if r.kind == LAYER]
    mods = [m for m in model if isinstance(m, (nn.Linear, *CONVT))][::-1]  # the walk goes output first
    assert [r.op for r in layers] == [type(m).__name__ for m in mods]
    for r, m in zip(layers, mods):
        assert r.verdict in (Verdict.RECOVERABLE, Verdict.DEFICIENT), r.reason
        assert r.grad_rows == m.weight.numel()
        assert r.rank is not None and r.rank_grad is not None and r.rank <= r.unknowns
        assert r.deficit == r.unknowns - r.rank
        if isinstance(m, CONVT):
            assert r.unknowns + (r.known_inputs or 0) == math.prod(r.input_shape)
    expected = dense_chain_deficits(_seeded(make), shape, loss, batch=batch)
    assert [r.deficit for r in reversed(layers)] == expected
    # the model verdict is the per-layer deficits'
    v = rep.verdict
    assert v.total_deficit == sum(r.deficit for r in layers)
    assert v.deficient_layers == sum(r.deficit > 0 for r in layers)
    if v.total_deficit == 0 and batch == 1:
        assert v.status == "recoverable-layerwise" and v.input_recoverable is True
    elif expected[0] == 0:  # determined, but by a joint solve, or given dL/dz the attacker cannot derive (batch)
        assert v.status in ("recoverable-joint", "recoverable-given-pattern") and v.input_recoverable is not False
    else:
        assert v.input_recoverable is not True and v.status != "recoverable-layerwise"


def test_decoder_narrow_passes_its_undetermined_directions_down():
    """The deficient ConvTranspose's null basis reaches the Linear below: it knows only the other directions of z."""
    rep = audit(_seeded(DECODERS["decoder-narrow"][0]), (5,), loss="logistic", seed=0)
    layers = {r.node: r for r in rep.layers if r.kind == LAYER}
    convt = next(r for r in layers.values() if r.op == "ConvTranspose2d")
    fc = next(r for r in rep.layers if r.kind == LAYER and r.input_shape == [1, 5])
    assert convt.deficit > 0 and convt.verdict == Verdict.DEFICIENT
    assert fc.fwd_rows == 72 - convt.deficit
    assert "directions undetermined" in fc.chain_reason


def test_functional_conv_transpose_with_a_parameter_matches_the_module():
    class Functional(nn.Module):
        def __init__(self, ref: nn.Sequential):
            super().__init__()
            self.fc, self.up1, self.up2, self.head = ref[0], ref[2], ref[4], ref[7]

        def forward(self, x):
            h = self.fc(x).reshape(-1, 4, 3, 3)
            h = F.leaky_relu(F.conv_transpose2d(h, self.up1.weight, None, 2, 1, 1), 0.2)
            h = F.leaky_relu(F.conv_transpose2d(h, self.up2.weight, stride=2, padding=1), 0.2)
            return self.head(h.flatten(1))

    ref = _seeded(DECODERS["decoder"][0])
    a = audit(ref, (6,), loss="logistic", seed=0)
    b = audit(Functional(ref).double(), (6,), loss="logistic", seed=0)
    la = [(r.unknowns, r.rank_grad, r.rank, r.deficit) for r in a.layers if r.kind == LAYER]
    lb = [(r.unknowns, r.rank_grad, r.rank, r.deficit) for r in b.layers if r.kind == LAYER]
    assert [r.op for r in b.layers if r.kind == LAYER] == ["Linear", "conv_transpose2d", "conv_transpose2d", "Linear"]
    assert la == lb


class _ExportOnly(nn.Module):
    """A shape branch (fx cannot trace it; torch.export specialises it): the aten graph's ops."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.w = nn.Parameter(torch.randn(3, 2, 2, 2))
        self.fc = nn.Linear(2 * 12 * 12, 1, bias=False)

    def forward(self, x):
        if x.shape[-1] > 2:
            x = F.leaky_relu(self.up(x), 0.2)
        x = F.conv_transpose2d(x, self.w, stride=2)
        return self.fc(F.leaky_relu(x, 0.2).flatten(1))


def test_torch_export_graph_is_analysed_like_the_modules():
    torch.manual_seed(0)
    model = _ExportOnly().double()
    gm = trace(model, torch.zeros(1, 2, 3, 3, dtype=torch.float64))
    assert gm.meta["rgap_trace"]["method"] == "torch.export"
    lg = build_layer_graph(gm)
    names = [lg.node(n).info.name for n in lg.weighted()]
    assert names == ["Linear", "conv_transpose2d", "ConvTranspose2d"]
    for n in lg.weighted()[1:]:
        spec = lg.conv_spec(n)
        assert isinstance(spec, ConvTransposeSpec)
        x = torch.randn(1, *lg.node(n).in_shape[1:], dtype=torch.float64)
        ref = model.up(x) if spec.stride == (2, 2) and spec.padding == (1, 1) else F.conv_transpose2d(x, model.w, stride=2)
        torch.testing.assert_close(spec.forward(x), ref)
    rep = audit(model, (2, 3, 3), loss="logistic", seed=0)
    assert all(r.verdict != Verdict.NOT_UNDERSTOOD for r in rep.layers)


def test_registry_entries():
    for key in (*CONVT, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        info = lookup(None, key(1, 1, 1)) if isinstance(key, type) else lookup(key)
        assert info.kind == LAYER and info.conv_spec is not None
    aten = torch.ops.aten
    for op in (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
        assert lookup(op).kind == LAYER


def test_output_size_argument_sets_output_padding():
    class WithSize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, bias=False)
            self.fc = nn.Linear(2 * 6 * 6, 1, bias=False)

        def forward(self, x):
            return self.fc(self.up(x, output_size=[6, 6]).flatten(1))

    torch.manual_seed(0)
    model = WithSize().double()
    lg = build_layer_graph(trace(model, torch.zeros(1, 2, 3, 3, dtype=torch.float64)))
    (up,) = [n for n in lg.weighted() if lg.node(n).info.name == "ConvTranspose2d"]
    spec = lg.conv_spec(up)
    assert spec.output_padding == (1, 1) and spec.out_shape == (2, 6, 6)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(spec.forward(x), model.up(x, output_size=[6, 6]))


def test_unsupported_configuration_is_not_understood_never_safe():
    """A transposed convolution whose weight is computed in forward cannot be normalised: not understood."""

    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3, 3, 3))
            self.fc = nn.Linear(3 * 6 * 6, 1, bias=False)

        def forward(self, x):
            h = F.conv_transpose2d(x, self.w * 2.0, stride=2, padding=1, output_padding=1)
            return self.fc(F.leaky_relu(h, 0.2).flatten(1))

    torch.manual_seed(0)
    rep = audit(Computed().double(), (2, 3, 3), loss="logistic", seed=0)
    (rec,) = [r for r in rep.layers if r.op == "conv_transpose2d"]
    assert rec.verdict == Verdict.NOT_UNDERSTOOD and "computed in forward" in rec.reason
    assert rep.verdict.status == "unknown" and rep.verdict.input_recoverable is None  # never "not recoverable"
    assert "not understood: conv_transpose2d" in rep.verdict.summary
    assert "could not be analysed" in rep.verdict.summary and "None" not in rep.verdict.summary
    with pytest.raises(ValueError, match="output_padding"):
        ConvTransposeSpec.make(torch.randn(2, 3, 3, 3), None, (2, 4, 4), stride=2, output_padding=2)


def test_attack_stops_with_a_clear_reason():
    """The closed-form attack handles ConvSpec layers only: on a transposed convolution it raises AuditError."""
    model = _seeded(DECODERS["decoder"][0])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 6, generator=gen, dtype=torch.float64)
    out = model(x)
    labels = make_labels("logistic", 1, 1, gen)
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss_value("logistic", out, labels), list(model.parameters()))))
    with pytest.raises(AttackUnsupported, match="does not handle transposed convolutions"):
        reconstruct(model, grads, (6,), "logistic", true_input=x)


def test_verify_on_a_decoder_keeps_the_static_report(tmp_path, capsys):
    """--verify says 'not attempted' with the reason instead of dropping the audit (exit 1: findings)."""
    import json
    from pathlib import Path

    from rgap_audit.cli import main

    example = Path(__file__).resolve().parent.parent / "examples" / "decoder.py"
    out = tmp_path / "r.json"
    code = main([f"{example}:DecoderNarrow", "--verify", "--format", "json", "-o", str(out), "--no-config"])
    rep = json.loads(out.read_text())
    model = rep["models"][0] if "models" in rep else rep[0]
    assert code == 1 and model["layers"] and model["verdict"]["status"]
    v = model["verification"]
    assert v["attempted"] is False and v["confirmed"] is None and "transposed convolutions" in v["summary"]


@pytest.mark.parametrize("name", ["Decoder", "DecoderNarrow"])
def test_decoder_example_loads_and_matches_dense_chain(name):
    """examples/decoder.py through the loader (RGAP_MODELS), audited; DecoderNarrow against the dense chain
    (Decoder's 912-column chain takes ~20 s densely: the smaller two-ConvTranspose decoders above cover it)."""
    from pathlib import Path

    from rgap_audit.analysis import audit_loaded
    from rgap_audit.loader import load_models
    from rgap_audit.options import AuditOptions

    path = Path(__file__).resolve().parent.parent / "examples" / "decoder.py"
    (loaded,) = load_models(str(path), [name], AuditOptions())
    rep = audit_loaded(loaded, AuditOptions())
    layers = [r for r in rep.layers if r.kind == LAYER]
    assert sum(r.op == "ConvTranspose2d" for r in layers) == (2 if name == "Decoder" else 1)
    assert all(r.verdict in (Verdict.RECOVERABLE, Verdict.DEFICIENT) for r in layers)
    for r in layers:
        assert r.deficit == r.unknowns - r.rank and r.grad_rows > 0
    if name == "Decoder":
        assert all(r.deficit == 0 for r in layers) and rep.verdict.status == "recoverable-layerwise"
    else:
        expected = dense_chain_deficits(loaded.module, loaded.input_shape, loaded.loss)
        assert [r.deficit for r in reversed(layers)] == expected
        assert max(expected) > 0 and rep.verdict.input_recoverable is not True
