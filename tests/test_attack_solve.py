"""The per-layer structured solve: index arithmetic against autograd, nullity and min-norm against dense algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgap_audit.attack.solve import solve_layer
from rgap_audit.convspec import ConvSpec
from rgap_audit.rank import ForwardInfo, _forward_columns, gradient_blocks
from rgap_audit.structure import sparse_forward
from rgap_audit.threads import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    """As reconstruct() does: small dense solves, no OpenMP/OpenBLAS contention on a busy machine."""
    with single_thread():
        yield


def _conv(nd, cin, cout, k, s, p, d, g, size, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin // g, *([k] * nd), generator=gen, dtype=torch.float64)
    return ConvSpec.conv(w, None, (cin, *([size] * nd)), s, p, d, g)


@settings(max_examples=25, deadline=None)
@given(
    nd=st.integers(1, 3),
    g=st.sampled_from([1, 2]),
    k=st.integers(1, 3),
    s=st.integers(1, 2),
    p=st.integers(0, 2),
    d=st.integers(1, 2),
    seed=st.integers(0, 10_000),
)
def test_index_arithmetic_matches_autograd(nd, g, k, s, p, d, seed):
    size = 5 if nd < 3 else 4
    spec = _conv(nd, 2 * g, 2 * g, k, s, p, d, g, size, seed)
    if min(spec.out_spatial) < 1:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, *spec.in_shape, generator=gen, dtype=torch.float64)
    kk = torch.randn(1, *spec.out_shape, generator=gen, dtype=torch.float64)
    # gradient rows: each group's block G (rows (o, u), columns (n, t)) applied per channel == dL/dW by autograd
    dw = spec.weight_grad(x, kk)
    cig, cog = spec.in_channels // g, spec.out_channels // g
    for gi, (chans, G) in enumerate(gradient_blocks(spec, kk)):
        assert chans == list(range(gi * cig, (gi + 1) * cig))
        for c in chans:
            got = G @ x[:, c].reshape(-1).numpy()
            want = dw[gi * cog : (gi + 1) * cog, c - gi * cig].reshape(-1).numpy()
            assert np.allclose(got, want, atol=1e-12)
    # forward rows: the sparse matrix and the channel-basis convolution == the layer
    z = spec.forward(x, with_bias=False).reshape(-1)
    assert torch.allclose(torch.from_numpy(sparse_forward(spec, 1) @ x.reshape(-1).numpy()), z, atol=1e-12)
    n_sp = spec.n_in // spec.in_channels
    Zs = [torch.linalg.qr(torch.randn(n_sp, 2, generator=gen, dtype=torch.float64))[0] for _ in range(g)]
    pieces = [(gi, list(range(gi * cig, (gi + 1) * cig)), Zs[gi].numpy()) for gi in range(g)]
    FZ, _ = _forward_columns(spec, pieces, ForwardInfo(), 1, g * cig * 2, spec.n_out)
    cols = []
    for gi in range(g):
        for c in range(cig):
            for j in range(2):
                v = torch.zeros(spec.in_channels, n_sp, dtype=torch.float64)
                v[gi * cig + c] = Zs[gi][:, j]
                cols.append(spec.forward(v.reshape(1, *spec.in_shape), with_bias=False).reshape(-1))
    assert torch.allclose(torch.from_numpy(FZ), torch.stack(cols, 1), atol=1e-12)


def _dense(spec, k):
    n = spec.n_in
    eye = torch.eye(n, dtype=torch.float64)
    K = torch.stack([spec.weight_grad(eye[i].reshape(1, *spec.in_shape), k).reshape(-1) for i in range(n)], 1)
    Fm = torch.stack([spec.forward(eye[i].reshape(1, *spec.in_shape), with_bias=False).reshape(-1) for i in range(n)], 1)
    return K, Fm


@pytest.mark.parametrize(
    "cfg",
    [
        dict(cin=4, cout=8, k=3, s=2, p=2, d=2, g=2, size=8),  # uncovered entries: deficient
        dict(cin=3, cout=6, k=3, s=2, p=1, d=1, g=1, size=7),  # narrow: deficient
        dict(cin=2, cout=8, k=3, s=1, p=1, d=1, g=1, size=6),  # wide: recoverable
    ],
)
def test_nullity_and_minimum_norm_solution_match_dense_algebra(cfg):
    spec = _conv(2, cfg["cin"], cfg["cout"], cfg["k"], cfg["s"], cfg["p"], cfg["d"], cfg["g"], cfg["size"], 0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, *spec.in_shape, generator=gen, dtype=torch.float64)
    k = torch.randn(1, *spec.out_shape, generator=gen, dtype=torch.float64)
    z = spec.forward(x)
    dw = spec.weight_grad(x, k)
    sol = solve_layer(spec, tuple(x.shape), k, dw, z)
    K, Fm = _dense(spec, k)
    A = torch.cat([K, Fm])
    b = torch.cat([dw.reshape(-1), z.reshape(-1)])
    rank = int(torch.linalg.matrix_rank(A))
    assert sol.nullity == spec.n_in - rank
    x_mn = torch.linalg.pinv(A) @ b
    assert torch.allclose(sol.x.reshape(-1), x_mn, atol=1e-9 * float(x.norm()))
    if sol.nullity:
        # the reported directions are exactly the null space of the layer system
        assert float((A @ sol.null_basis).norm()) < 1e-9 * float(A.norm())
        assert torch.allclose(sol.null_basis.T @ sol.null_basis, torch.eye(sol.nullity, dtype=torch.float64), atol=1e-10)
    else:
        assert float((sol.x - x).norm() / x.norm()) < 1e-10


def test_carried_directions_and_sparse_path():
    """A layer whose gradient rows leave most of x free (CNN6 conv1 shape): sparse forward solve, with T."""
    spec = _conv(2, 3, 12, 4, 2, 2, 1, 1, 32, 3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, *spec.in_shape, generator=gen, dtype=torch.float64)
    k = torch.randn(1, *spec.out_shape, generator=gen, dtype=torch.float64)
    z = spec.forward(x)
    dw = spec.weight_grad(x, k)
    sol = solve_layer(spec, tuple(x.shape), k, dw, z)
    assert sol.method.startswith("forward (sparse")
    assert float((sol.x - x).norm() / x.norm()) < 1e-10
    # z known only up to 40 random directions: still determined (rows to spare), z perturbed along them
    T = torch.randn(40, z.numel(), generator=gen, dtype=torch.float64)
    z_bad = z.reshape(-1) + T.T @ torch.randn(40, generator=gen, dtype=torch.float64)
    sol2 = solve_layer(spec, tuple(x.shape), k, dw, z_bad.reshape(z.shape), T=T.reshape(40, *z.shape[1:]))
    assert sol2.nullity == 0
    assert float((sol2.x - x).norm() / x.norm()) < 1e-8


def test_matrix_free_lsqr_fallback(monkeypatch):
    """Layers too large for channel blocks go to LSQR on the scaled operator; it still recovers x."""
    import rgap_audit.attack.solve as solve_mod

    monkeypatch.setattr(solve_mod, "MAX_G_COLS", 10)
    spec = _conv(2, 2, 8, 3, 1, 1, 1, 1, 6, 4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, *spec.in_shape, generator=gen, dtype=torch.float64)
    k = torch.randn(1, *spec.out_shape, generator=gen, dtype=torch.float64)
    sol = solve_layer(spec, tuple(x.shape), k, spec.weight_grad(x, k), spec.forward(x))
    assert sol.method.startswith("lsqr") and sol.nullity is None
    assert float((sol.x - x).norm() / x.norm()) < 1e-8


def test_sparse_factorisation_out_of_memory_falls_back_to_the_exact_reduced_system(monkeypatch):
    """SuperLU's MemoryError (a 224x224 conv's fill-in) is not a crash: the layer goes to the route the
    audit takes next (the dense reduced system, which fits here), and the note says why."""
    import rgap_audit.attack.solve as solve_mod

    def no_memory(*args, **kwargs):
        raise MemoryError("Not enough memory to perform factorization.")

    monkeypatch.setattr(solve_mod.spl, "splu", no_memory)
    spec = _conv(2, 3, 12, 4, 2, 2, 1, 1, 32, 3)  # the sparse-forward case of the test above
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, *spec.in_shape, generator=gen, dtype=torch.float64)
    k = torch.randn(1, *spec.out_shape, generator=gen, dtype=torch.float64)
    sol = solve_layer(spec, tuple(x.shape), k, spec.weight_grad(x, k), spec.forward(x))
    assert sol.method.startswith("null(K)+forward") and any("memory" in n for n in sol.notes)
    assert sol.nullity == 0 and float((sol.x - x).norm() / x.norm()) < 1e-6


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (200, 120)])
def test_reduced_least_squares_tall_and_wide(shape):
    """Minimum-norm solution and null space of a reduced block (rank-deficient, and full rank through the
    Gram route), as the attack's solve takes them from the rank code."""
    from rgap_audit.rank import _reduced_solve

    gen = torch.Generator().manual_seed(5)
    m, n = shape
    inner = 8 if m < 100 else n
    A = torch.randn(m, inner, generator=gen, dtype=torch.float64) @ torch.randn(inner, n, generator=gen, dtype=torch.float64)
    r = torch.randn(m, generator=gen, dtype=torch.float64)
    rank, _rel, null, y = _reduced_solve(A.numpy(), r.numpy(), True, 0.0, 1.0)
    assert torch.allclose(torch.from_numpy(y), torch.linalg.pinv(A) @ r, atol=1e-9)
    assert rank == inner and null.shape[1] == n - inner and float(np.linalg.norm(A.numpy() @ null)) < 1e-9


@pytest.mark.parametrize("inside", [False, True])
def test_forward_proof_with_carried_directions_by_angles_and_by_capacitance(inside):
    """The two proofs that F^T P F > tau I (P projects out carried directions Q): the principal-angle
    route (kept left null space, used across the attack's passes) and the capacitance (Woodbury). Both
    must agree with a dense SVD of P F, and solve min ||P (F x - z)|| as a dense least-squares does.
    inside: one carried direction lies in range(F), so P F loses a column: neither may prove it."""
    from rgap_audit import rank

    spec = _conv(2, 2, 6, 3, 1, 1, 1, 1, 8, 5)
    gen = torch.Generator().manual_seed(6)
    fs = sparse_forward(spec, 1).tocsr()
    m, c = fs.shape
    rows = np.arange(m)
    q = torch.randn(m, 12, generator=gen, dtype=torch.float64).numpy()
    if inside:
        q[:, 0] = fs @ np.random.default_rng(0).standard_normal(c)
    q = np.linalg.qr(q)[0]
    f_dense = fs.toarray()
    pf = f_dense - q @ (q.T @ f_dense)
    s_pf = np.linalg.svd(pf, compute_uv=False)
    s_f = np.linalg.svd(f_dense, compute_uv=False)
    zr = np.random.default_rng(1).standard_normal(m)
    x_ref = np.linalg.lstsq(pf, zr - q @ (q.T @ zr), rcond=None)[0]
    by_angles = rank.forward_full_rank(spec, 1, rows, carried=q, cache={}, measure=False)
    by_cap = rank.forward_full_rank(spec, 1, rows, carried=q, cache=None, measure=False)
    if inside:
        assert s_pf[-1] / s_f[0] < 1e-10
        assert isinstance(by_angles, str) and isinstance(by_cap, str)
        return
    assert isinstance(by_angles, rank.ForwardProof) and isinstance(by_cap, rank.ForwardProof)
    assert by_angles.angles is not None and by_cap.angles is None
    assert by_angles.rel <= s_pf[-1] / s_f[0]  # a lower bound on sigma_min(P F) / sigma_max(F)
    for proof in (by_angles, by_cap):
        x = proof.solve(zr)
        assert np.linalg.norm(x - x_ref) < 1e-10 * np.linalg.norm(x_ref)
