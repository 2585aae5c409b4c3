"""The Fourier-preconditioned forward solve (fourier.py) against dense algebra built by autograd."""

from __future__ import annotations

import pytest
import torch

import rgap_audit.attack.solve as solve_mod
from rgap_audit import fourier
from rgap_audit.attack.solve import solve_layer
from rgap_audit.convspec import ConvSpec
from rgap_audit.threads import single_thread
from rgap_audit.tolerances import PROBE_TOL


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _spec(cin, cout, k, s, p, d, size, seed, nd=2):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *([k] * nd), generator=gen, dtype=torch.float64)
    return ConvSpec.conv(w, None, (cin, *([size] * nd)), s, p, d, 1)


def _dense_forward(spec: ConvSpec) -> torch.Tensor:
    """F as a dense matrix, from the Jacobian of the layer's own forward (independent of fourier.py)."""
    x0 = torch.zeros(1, *spec.in_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: spec.forward(x, with_bias=False), x0)
    return jac.reshape(spec.n_out, spec.n_in)


def _instance(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *spec.in_shape, generator=gen, dtype=torch.float64)
    k = torch.randn(1, *spec.out_shape, generator=gen, dtype=torch.float64)
    return x, k, spec.forward(x, with_bias=False), spec.weight_grad(x, k)


@pytest.mark.parametrize(
    "cfg",
    [
        {"cin": 3, "cout": 16, "k": 3, "s": 2, "p": 1, "d": 1, "size": 16},  # VGG's first layer, small: tall per phase
        {"cin": 4, "cout": 6, "k": 3, "s": 1, "p": 1, "d": 1, "size": 12},  # stride 1, tall
        {"cin": 2, "cout": 5, "k": 3, "s": 1, "p": 2, "d": 2, "size": 13},  # dilation, odd size
        {"cin": 2, "cout": 12, "k": 3, "s": 2, "p": 1, "d": 1, "size": 13},  # odd size: uneven stride phases
        {"cin": 2, "cout": 24, "k": 4, "s": 3, "p": 1, "d": 1, "size": 14},  # stride 3, even kernel
    ],
)
def test_full_rank_layer_matches_dense_lstsq(cfg):
    """Noisy (inconsistent) right-hand side: the solution is the dense least-squares one, and determined."""
    spec = _spec(cfg["cin"], cfg["cout"], cfg["k"], cfg["s"], cfg["p"], cfg["d"], cfg["size"], 0)
    x, _, z, _ = _instance(spec, 1)
    Fm = _dense_forward(spec)
    assert int(torch.linalg.matrix_rank(Fm)) == spec.n_in
    zn = z + 1e-3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = torch.linalg.lstsq(Fm, zn.reshape(-1, 1)).solution[:, 0]
    res = fourier.solve(spec, zn, tuple(x.shape))
    assert res.converged and res.probe_error < PROBE_TOL
    assert float((res.x.reshape(-1) - ref).norm() / ref.norm()) < 1e-8
    exact = fourier.solve(spec, z, tuple(x.shape))
    assert float((exact.x - x).norm() / x.norm()) < 1e-8


def test_symbol_is_the_periodic_convolution():
    """Away from the border, the per-frequency symbol applied to the stride phases is the layer itself."""
    spec = _spec(2, 3, 3, 2, 2, 2, 13, 4)
    pre = fourier.Preconditioner(spec)
    sym = fourier._symbol(spec, pre.grid)
    x = torch.randn(1, *spec.in_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = pre._deinterleave(x)
    yf = torch.fft.rfftn(y, dim=(-2, -1))
    zf = (sym @ yf.reshape(1, y.shape[1], -1).permute(2, 1, 0)).permute(2, 1, 0).reshape(1, 3, *yf.shape[2:])
    zc = torch.fft.irfftn(zf, s=pre.grid, dim=(-2, -1))
    z = spec.forward(x, with_bias=False)
    o = spec.out_spatial
    assert torch.allclose(zc[..., 2 : o[0] - 2, 2 : o[1] - 2], z[..., 2:-2, 2:-2], atol=1e-12)


def test_preconditioner_is_symmetric_positive_definite():
    """Preconditioned CG needs P symmetric positive definite: checked on the dense matrix of P."""
    spec = _spec(3, 14, 3, 2, 1, 1, 7, 6)
    pre = fourier.Preconditioner(spec)
    n = spec.n_in
    P = pre.apply(torch.eye(n, dtype=torch.float64).reshape(n, *spec.in_shape)).reshape(n, n)
    assert torch.allclose(P, P.T, atol=1e-12 * float(P.abs().max()))
    assert float(torch.linalg.eigvalsh(P)[0]) > 0


def test_rank_deficient_layer_is_not_claimed():
    """An input channel the weights never read: F has a null space; the probe must not come back."""
    spec = _spec(3, 16, 3, 2, 1, 1, 12, 8)
    w = spec.weight.clone()
    w[:, 1] = 0
    spec = ConvSpec.conv(w, None, spec.in_shape, 2, 1, 1, 1)
    x, _, z, _ = _instance(spec, 9)
    Fm = _dense_forward(spec)
    assert int(torch.linalg.matrix_rank(Fm)) < spec.n_in
    res = fourier.solve(spec, z, tuple(x.shape), max_iters=200)
    assert res.residual < 1e-8  # the rows are fitted ...
    assert res.probe_error > 1e-2  # ... but x is not determined, and the probe says so
    assert float((res.x - x).norm() / x.norm()) > 1e-2


def test_ill_conditioned_square_layer_is_not_claimed():
    """A square stride-2 layer (4 phases x 2 channels -> 8): full rank by counting, numerically singular."""
    spec = _spec(2, 8, 3, 2, 1, 1, 24, 0)
    x, _, z, _ = _instance(spec, 10)
    sv = torch.linalg.svdvals(_dense_forward(spec))
    assert float(sv[-1] / sv[0]) < 1e-10  # the dense algebra's verdict
    res = fourier.solve(spec, z, tuple(x.shape), max_iters=100)
    assert not (res.converged and res.probe_error < PROBE_TOL)


def test_solve_layer_routes_large_layers_and_reports_honestly(monkeypatch):
    """solve_layer: the Fourier path for a large fully known layer; determined only when the probe returns."""
    monkeypatch.setattr(solve_mod, "FOURIER_MIN_NNZ", 0)
    spec = _spec(3, 16, 3, 2, 1, 1, 20, 11)
    x, k, z, dw = _instance(spec, 12)
    sol = solve_layer(spec, tuple(x.shape), k, dw, z)
    assert sol.method.startswith("forward (Fourier")
    assert sol.nullity == 0 and sol.residual_grad < 1e-8 and sol.residual_fwd < 1e-8
    assert float((sol.x - x).norm() / x.norm()) < 1e-8
    # deficient by counting (3 -> 2 channels at stride 2: 400 forward + 54 gradient rows < 1200 unknowns)
    spec = _spec(3, 2, 3, 2, 1, 1, 20, 13)
    x, k, z, dw = _instance(spec, 14)
    sol = solve_layer(spec, tuple(x.shape), k, dw, z)
    assert sol.method.startswith("forward (Fourier") and sol.nullity is None
    assert any("deficient by counting" in n for n in sol.notes)
    assert sol.residual_fwd < 1e-6 and float(sol.x.norm()) < 10 * float(x.norm())  # a bounded guess that fits z
    # a partly known output (ReLU) is not the Fourier solver's case
    mask = torch.ones(spec.out_shape, dtype=torch.bool)
    mask[0, 0, 0] = False
    sol = solve_layer(spec, tuple(x.shape), k, dw, z, mask)
    assert not sol.method.startswith("forward (Fourier")


def test_probe_alone_tests_the_rank_like_the_batched_solve():
    """solve(spec, None) solves the random probe alone (the static analysis' rank test)."""

    torch.manual_seed(0)
    tall = ConvSpec.from_module(torch.nn.Conv2d(2, 10, 3, stride=2, padding=1, bias=False).double(), (2, 12, 12))
    alone = fourier.solve(tall, None, (2, 12, 12))
    assert alone.converged and alone.probe_error <= PROBE_TOL and alone.residual <= 1e-8
    z = tall.forward(torch.rand(1, 2, 12, 12, dtype=torch.float64), with_bias=False)
    both = fourier.solve(tall, z, (2, 12, 12))
    assert both.probe_error <= PROBE_TOL  # the same verdict from the batched solve
    # a 1x1 stride-2 conv never sees three quarters of its input: the probe cannot come back
    sparse = ConvSpec.from_module(torch.nn.Conv2d(1, 8, 1, stride=2, bias=False).double(), (1, 8, 8))
    assert fourier.solve(sparse, None, (1, 8, 8)).probe_error > 0.1
