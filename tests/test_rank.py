"""rgap_audit.rank against an independent dense computation.

The reference is dense_system: K built column by column from ConvSpec.weight_grad (autograd), W from
torch.autograd.functional.jacobian of ConvSpec.forward, C from fwd.jac on the identity. Its ranks
come from one SVD of the stacked, per-block normalised matrix: nothing in it uses the residue
blocks, the null-space reduction or the tolerances of rank.py.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rgap_audit.convspec import ConvSpec
from rgap_audit.rank import (
    ForwardInfo,
    dense_system,
    gradient_blocks,
    gradient_counting_holds,
    gradient_rank_counting,
    layer_counting_holds,
    layer_rank,
    layer_rank_counting,
)

EPS = float(np.finfo(np.float64).eps)


ROOT = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("RGAP_SLOW_TESTS") == "1"


# ---------------------------------------------------------------------------------------------- helpers
def dense_rank(*blocks: np.ndarray) -> int:
    """Rank of the stacked blocks, each divided by its norm first so their scales never mix."""
    parts = [b / np.linalg.norm(b) for b in blocks if b.size and np.any(b)]
    if not parts:
        return 0
    a = np.vstack(parts)
    s = np.linalg.svd(a, compute_uv=False)
    return int((s > max(a.shape) * EPS * s[0]).sum())


def make_conv(rng: random.Random, cfg: dict) -> ConvSpec:
    nd = cfg["nd"]
    g = cfg.get("groups", 1)
    w = torch.randn(cfg["cout"], cfg["cin"] // g, *cfg["k"], dtype=torch.float64)
    if nd == 0:
        return ConvSpec.linear(w, None)
    return ConvSpec.conv(w, None, (cfg["cin"], *cfg["h"]), cfg["s"], cfg["p"], cfg.get("d", 1), g)


def fwd_variants(spec: ConvSpec, n: int, gen: torch.Generator) -> dict[str, ForwardInfo]:
    """full z, nothing known, a ReLU-like 0/1 mask, LeakyReLU slopes + flatten, and undetermined directions."""
    mask = (torch.rand(n, *spec.out_shape, generator=gen) > 0.5).to(torch.float64)
    slope = torch.where(torch.rand(n, *spec.out_shape, generator=gen) > 0.5, 1.0, 0.2).to(torch.float64)
    big_d = n * spec.n_out
    n_unk = max(1, big_d // 3)
    u = torch.linalg.qr(torch.randn(big_d, n_unk, generator=gen, dtype=torch.float64))[0]
    return {
        "full": ForwardInfo(),
        "none": ForwardInfo(none=True),
        "relu": ForwardInfo(jac=lambda t: t * mask),
        "leaky-flat": ForwardInfo(jac=lambda t: (t * slope).reshape(t.shape[0], -1)),
        "unknown": ForwardInfo(unknown=u),
    }


def check_against_dense(spec: ConvSpec, k: torch.Tensor, fwd: ForwardInfo, known: torch.Tensor | None = None) -> None:
    """Every number and the null basis of layer_rank against the dense system."""
    n = k.shape[0]
    res = layer_rank(spec, k, fwd, known=known)
    kd, fd = dense_system(spec, k, fwd, known)
    unknowns = kd.shape[1]
    rk, rt = dense_rank(kd), dense_rank(kd, fd)
    assert res.method == "structured-svd"
    assert res.unknowns == unknowns
    assert res.grad_rows == spec.n_weight == kd.shape[0]
    assert res.rank_grad == rk
    assert res.rank == rt == res.rank_lower == res.rank_upper
    assert res.deficit == unknowns - rt
    assert res.rank_grad_counting == gradient_rank_counting(spec, n)
    if fwd.none:
        assert res.fwd_rows == 0
    assert res.sigma_min_rel is None or 0 < res.sigma_min_rel <= 1
    assert res.null_basis is not None and res.null_basis.shape[0] == n * spec.n_in
    assert_null_basis(res, kd, fd, known)


def assert_null_basis(res, kd: np.ndarray, fd: np.ndarray, known: torch.Tensor | None) -> None:
    """The layer's null basis against its dense system [K; F] (columns: the unknown entries): one row per
    input entry and a column per undetermined direction, zero on known entries, orthonormal, annihilated by
    K and F (so it spans the dense null space)."""
    v = res.null_basis
    n_known = 0 if known is None else int(known.sum())
    assert v is not None and v.shape == (kd.shape[1] + n_known, res.deficit)
    v = v.numpy()
    if known is not None:
        kn = known.reshape(-1).numpy()
        assert np.abs(v[kn]).max(initial=0.0) == 0.0
        v = v[~kn]
    assert np.abs(v.T @ v - np.eye(v.shape[1])).max(initial=0.0) < 1e-9
    if v.shape[1]:
        assert np.abs(kd @ v).max() <= 1e-9 * np.abs(kd).max()
        if fd.size:
            assert np.abs(fd @ v).max() <= 1e-9 * np.abs(fd).max()


# Hand-picked configurations: each feature on its own and mixed. `k` is the kernel, h the input size.
CONFIGS = {
    "linear-1": {"nd": 0, "cin": 7, "cout": 3, "k": (), "n": 1},
    "linear-N4": {"nd": 0, "cin": 6, "cout": 3, "k": (), "n": 4},
    "linear-N5-wide": {"nd": 0, "cin": 5, "cout": 8, "k": (), "n": 5},
    "conv1d": {"nd": 1, "cin": 3, "cout": 4, "k": (3,), "h": (9,), "s": (2,), "p": (1,), "n": 1},
    "conv1d-N3": {"nd": 1, "cin": 2, "cout": 2, "k": (3,), "h": (8,), "s": (1,), "p": (0,), "n": 3},
    "conv1d-dil-groups": {"nd": 1, "cin": 4, "cout": 6, "k": (3,), "h": (12,), "s": (2,), "p": (2,), "d": (2,), "groups": 2, "n": 1},
    "conv2d-s2p1": {"nd": 2, "cin": 3, "cout": 5, "k": (3, 3), "h": (7, 7), "s": (2, 2), "p": (1, 1), "n": 1},
    "conv2d-k4s2p2": {"nd": 2, "cin": 2, "cout": 3, "k": (4, 4), "h": (8, 8), "s": (2, 2), "p": (2, 2), "n": 1},
    "conv2d-groups3": {"nd": 2, "cin": 6, "cout": 6, "k": (3, 2), "h": (6, 5), "s": (1, 2), "p": (1, 0), "groups": 3, "n": 1},
    "conv2d-depthwise": {"nd": 2, "cin": 3, "cout": 6, "k": (3, 3), "h": (6, 6), "s": (1, 1), "p": (1, 1), "groups": 3, "n": 1},
    "conv2d-dilation": {"nd": 2, "cin": 2, "cout": 3, "k": (2, 3), "h": (7, 8), "s": (1, 2), "p": (1, 2), "d": (2, 3), "n": 1},
    "conv2d-N2-stride3": {"nd": 2, "cin": 2, "cout": 3, "k": (2, 2), "h": (7, 6), "s": (3, 2), "p": (0, 1), "n": 2},
    "conv2d-uncovered": {"nd": 2, "cin": 2, "cout": 2, "k": (1, 2), "h": (5, 7), "s": (3, 3), "p": (1, 0), "n": 1},
    "conv3d": {"nd": 3, "cin": 2, "cout": 3, "k": (2, 2, 2), "h": (4, 4, 4), "s": (2, 1, 1), "p": (1, 0, 1), "n": 1},
    "conv3d-dil-groups": {"nd": 3, "cin": 2, "cout": 4, "k": (2, 2, 2), "h": (5, 5, 4), "s": (1, 1, 2), "p": (0, 1, 0), "d": (2, 1, 1), "groups": 2, "n": 1},
    # stride = kernel, groups: with a log-uniform k the K blocks are ill-conditioned and F Z carries
    # the null bases' errors (eps / gap), which a plain tolerance would count as rank
    "groups2-s=k": {"nd": 2, "cin": 6, "cout": 8, "k": (1, 2), "h": (4, 3), "s": (1, 2), "p": (0, 0), "groups": 2, "n": 1},
    # F Z is pure round-off here (F's rows lie in K's row space): its rank must be 0, not noise
    "fz-roundoff": {"nd": 3, "cin": 3, "cout": 3, "k": (1, 2, 3), "h": (3, 3, 5), "s": (1, 3, 3), "p": (2, 2, 0), "n": 1},
}


def _spec_and_k(name: str, seed: int = 0, logk: bool = False) -> tuple[ConvSpec, torch.Tensor, torch.Generator]:
    torch.manual_seed(seed)
    cfg = CONFIGS[name]
    spec = make_conv(random.Random(seed), cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    k = torch.randn(cfg["n"], *spec.out_shape, generator=gen, dtype=torch.float64)
    if logk:  # magnitudes over three decades: ill-conditioned K blocks
        k = k * 10.0 ** (-3 * torch.rand(k.shape, generator=gen, dtype=torch.float64))
    return spec, k, gen


# ---------------------------------------------------------------------------------------------- 1. vs dense
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_rank_matches_dense(name: str) -> None:
    spec, k, gen = _spec_and_k(name)
    for fwd in fwd_variants(spec, k.shape[0], gen).values():
        check_against_dense(spec, k, fwd)


@pytest.mark.parametrize("name", ["linear-N4", "conv1d-N3", "conv2d-s2p1", "conv2d-groups3", "conv3d"])
def test_known_inputs_are_not_unknowns(name: str) -> None:
    spec, k, gen = _spec_and_k(name, seed=3)
    known = torch.rand(k.shape[0], *spec.in_shape, generator=gen) < 0.3
    fwds = fwd_variants(spec, k.shape[0], gen)
    for key in ("full", "relu", "none"):
        check_against_dense(spec, k, fwds[key], known=known)
    assert layer_rank(spec, k, fwds["full"], known=known).unknowns == k.shape[0] * spec.n_in - int(known.sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["conv2d-s2p1", "conv2d-N2-stride3", "conv1d-dil-groups", "linear-N5-wide", "groups2-s=k"])
def test_ill_conditioned_gradient_blocks(name: str, seed: int) -> None:
    spec, k, gen = _spec_and_k(name, seed=seed, logk=True)
    for key, fwd in fwd_variants(spec, k.shape[0], gen).items():
        if key in ("full", "relu", "unknown"):
            check_against_dense(spec, k, fwd)


@pytest.mark.parametrize("seed", [0, 4, 13])
def test_null_basis_errors_not_counted_as_rank(seed: int) -> None:
    """Regression: K blocks with a relative gap ~1e-4 give null bases accurate to ~1e-12, and F Z
    inherits that error; with the plain tolerance it counted as 1-2 extra rank (rank 50 for 48)."""
    torch.manual_seed(seed)
    w = torch.randn(8, 3, 1, 2, dtype=torch.float64)
    spec = ConvSpec.conv(w, None, (6, 4, 3), (1, 2), (0, 0), 1, 2)
    k = torch.randn(1, *spec.out_shape, dtype=torch.float64)
    k = k * 10.0 ** (-3 * torch.rand(k.shape, dtype=torch.float64))
    check_against_dense(spec, k, ForwardInfo())


@st.composite
def random_layer(draw) -> tuple[ConvSpec, torch.Tensor, str]:
    nd = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    n = draw(st.integers(1, 3))
    if nd == 0:
        cin, cout = draw(st.integers(1, 8)), draw(st.integers(1, 6))
        spec = ConvSpec.linear(torch.randn(cout, cin, dtype=torch.float64), None)
    else:
        g = draw(st.sampled_from([1, 1, 2]))
        cin, cout = g * draw(st.integers(1, 2)), g * draw(st.integers(1, 3))
        ks = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        ss = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        ds = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        hmax = (9, 7, 4)[nd - 1]
        hs = tuple(draw(st.integers(1, hmax)) for _ in range(nd))
        # padding at least what a window needs to fit
        ps = tuple(
            max(draw(st.integers(0, 2)), -(-(d * (kk - 1) + 1 - h) // 2)) for kk, d, h in zip(ks, ds, hs)
        )
        if cin * int(np.prod(hs)) * n > 220:
            n = 1
        w = torch.randn(cout, cin // g, *ks, dtype=torch.float64)
        spec = ConvSpec.conv(w, None, (cin, *hs), ss, ps, ds, g)
    k = torch.randn(n, *spec.out_shape, dtype=torch.float64)
    return spec, k, draw(st.sampled_from(["full", "none", "relu", "leaky-flat", "unknown"]))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(random_layer())
def test_layer_rank_matches_dense_random(case) -> None:
    spec, k, which = case
    gen = torch.Generator().manual_seed(7)
    check_against_dense(spec, k, fwd_variants(spec, k.shape[0], gen)[which])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_blocks_are_the_dense_k(name: str) -> None:
    """Each block equals the dense K restricted to its channel; K has nothing outside the blocks."""
    spec, k, _ = _spec_and_k(name, seed=11)
    n = k.shape[0]
    kd, _ = dense_system(spec, k, ForwardInfo(none=True))
    # the reference itself: K x = weight_grad(x, k)
    x = torch.randn(n, *spec.in_shape, dtype=torch.float64)
    assert np.allclose(kd @ x.reshape(-1).numpy(), spec.weight_grad(x, k).reshape(-1).numpy(), atol=1e-12)
    g = spec.groups
    cig, cog = spec.in_channels // g, spec.out_channels // g
    p_k = int(np.prod(spec.kernel, dtype=np.int64))
    s_in = int(np.prod(spec.in_spatial, dtype=np.int64))
    kr = kd.reshape(spec.out_channels, cig, p_k, n, spec.in_channels, s_in)
    covered = np.zeros(kr.shape, dtype=bool)
    blocks = gradient_blocks(spec, k)
    assert len(blocks) == g
    for gi, (chans, block) in enumerate(blocks):
        assert chans == list(range(gi * cig, (gi + 1) * cig))
        assert block.shape == (cog * p_k, n * s_in)
        for c in chans:
            sub = kr[gi * cog : (gi + 1) * cog, c - gi * cig, :, :, c, :]
            assert np.array_equal(sub.reshape(cog * p_k, n * s_in), block)
            covered[gi * cog : (gi + 1) * cog, c - gi * cig, :, :, c, :] = True
    assert not np.any(kr[~covered])


def test_no_null_when_not_wanted() -> None:
    spec, k, _gen = _spec_and_k("conv2d-s2p1")
    res = layer_rank(spec, k, ForwardInfo(none=True), want_null=False)
    assert res.null_basis is None and res.deficit == spec.n_in - res.rank_grad > 0


def test_zero_gradient_gives_rank_of_f_only() -> None:
    spec, k, _ = _spec_and_k("conv2d-k4s2p2")
    k = torch.zeros_like(k)
    _kd, fd = dense_system(spec, k, ForwardInfo())
    res = layer_rank(spec, k, ForwardInfo())
    assert res.rank_grad == 0 and res.rank == dense_rank(fd) > 0


# ---------------------------------------------------------------------------------------------- 2. notes §3 table
def _load_paper_nets():
    path = ROOT / "examples" / "paper_nets.py"
    spec = importlib.util.spec_from_file_location("paper_nets_for_rank_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=2)
def _cnn6_pass(width2: int) -> list[tuple[ConvSpec, torch.Tensor, torch.Tensor]]:
    """(spec, dL/dz, z) of every weighted layer of CNN6 / CNN6-d at random init, random input and
    the logistic loss (label +1), dL/dz by autograd through the whole network."""
    torch.manual_seed(0)
    net = _load_paper_nets().cnn6(width2).double()
    h = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    convs = []
    for m in net:
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            inp = h
            h = m(h)
            h.retain_grad()
            convs.append((m, inp, h))
        else:
            h = m(h)
    torch.nn.functional.softplus(-h).sum().backward()  # logistic loss, label +1
    return [(ConvSpec.from_module(m, tuple(inp.shape[1:])), z.grad.detach().clone(), z.detach()) for m, inp, z in convs]


def _cnn6_layer(width2: int, index: int) -> tuple[ConvSpec, torch.Tensor, ForwardInfo]:
    """Conv `index` (0-based) of CNN6 / CNN6-d with forward info = LeakyReLU(0.2) slopes at z
    (the layers above are full rank, so all of z is known)."""
    spec, k, z = _cnn6_pass(width2)[index]
    slope = torch.where(z > 0, 1.0, 0.2).to(torch.float64)
    return spec, k, ForwardInfo(jac=lambda t: t * slope)


def _gram_rank(a: np.ndarray) -> int:
    """Dense rank from the eigenvalues of the smaller Gram matrix of a (a normalised), asserting a
    clear gap: the zero ones at round-off (< 1e-12), the kept ones above 1e-9 (sigma_min_rel > 3e-5).
    Several times cheaper than the SVD of a; exact when such a gap exists."""
    w = np.linalg.eigvalsh(a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T)[::-1]
    w = w / w[0]
    kept = int((w > 1e-10).sum())
    assert w[kept - 1] > 1e-9, "no clear gap: use the dense SVD"
    assert kept == len(w) or abs(w[kept]) < 1e-12, "no clear gap: use the dense SVD"
    return kept


def _full_column_rank(a: np.ndarray) -> bool:
    """Cholesky of a^T a - 1e-9 * trace * I succeeds only if every eigenvalue of a^T a exceeds that:
    then sigma_min / sigma_max > ~3e-5 / sqrt(cols), far above the SVD tolerance."""
    g = a.T @ a
    try:
        np.linalg.cholesky(g - 1e-9 * np.trace(g) * np.eye(g.shape[0]))
    except np.linalg.LinAlgError:
        return False
    return True


# notes §3: (width of conv2, unknowns, gradient rows, forward rows, rank(K), rank, deficit)
NOTES_TABLE = {"CNN6": (36, 3468, 3888, 2916, 2928, 3468, 0), "CNN6-d": (20, 3468, 2160, 1620, 1968, 3188, 280)}


@pytest.mark.parametrize("net", list(NOTES_TABLE))
def test_notes_table_conv2(net: str) -> None:
    """conv2 of CNN6 (12->36) and CNN6-d (12->20), k3 s2 p1 on 12x17x17, random init, dL/dz from
    autograd through the network: the numbers of rgap-notes §3, the closed forms, and a dense check
    of the same system (eigenvalues of the normalised dense Gram matrices, a Cholesky for full rank;
    the dense SVDs are test_notes_table_conv2_dense_svd, run with RGAP_SLOW_TESTS=1)."""
    width2, unknowns, grad_rows, fwd_rows, rank_k, rank, deficit = NOTES_TABLE[net]
    spec, k, fwd = _cnn6_layer(width2, 1)
    res = layer_rank(spec, k, fwd)
    assert (res.unknowns, res.grad_rows, res.fwd_rows) == (unknowns, grad_rows, fwd_rows)
    assert (res.rank_grad, res.rank, res.deficit, res.method) == (rank_k, rank, deficit, "structured-svd")
    assert gradient_rank_counting(spec) == rank_k and layer_rank_counting(spec) == rank
    kd, fd = dense_system(spec, k, fwd)
    kn, fn = kd / np.linalg.norm(kd), fd / np.linalg.norm(fd)
    assert _gram_rank(kn) == rank_k
    stack = np.vstack([kn, fn])
    if rank == unknowns:
        assert _full_column_rank(stack)
    else:
        assert _gram_rank(stack) == rank
    v = res.null_basis.numpy()
    assert v.shape == (unknowns, deficit)
    if deficit:
        assert np.abs(v.T @ v - np.eye(deficit)).max() < 1e-9
        assert np.abs(kd @ v).max() < 1e-9 * np.abs(kd).max() and np.abs(fd @ v).max() < 1e-9 * np.abs(fd).max()


@pytest.mark.skipif(not SLOW, reason="dense SVDs of 3468-column systems, 30-60 s on 2 cores: RGAP_SLOW_TESTS=1")
@pytest.mark.parametrize("net", list(NOTES_TABLE))
def test_notes_table_conv2_dense_svd(net: str) -> None:
    width2, _u, _g, _f, rank_k, rank, _d = NOTES_TABLE[net]
    spec, k, fwd = _cnn6_layer(width2, 1)
    kd, fd = dense_system(spec, k, fwd)
    assert dense_rank(kd) == rank_k
    assert dense_rank(kd, fd) == rank


@pytest.mark.parametrize("width2", [36, 20])
def test_cnn6_all_convs_match_closed_form(width2: int) -> None:
    """Every conv of CNN6 / CNN6-d (real dL/dz, full forward info) equals the notes' closed forms
    (conv1 is the same layer in both and the slowest, so it runs for CNN6 only)."""
    for index in range(0 if width2 == 36 else 1, 6):
        spec, k, fwd = _cnn6_layer(width2, index)
        assert layer_counting_holds(spec) and gradient_counting_holds(spec)
        res = layer_rank(spec, k, fwd, want_null=False)
        assert res.rank_grad == gradient_rank_counting(spec)
        assert res.rank == layer_rank_counting(spec)


# ---------------------------------------------------------------------------------------------- 3. closed forms
def _random_regime_specs(n_cases: int, seed: int, layer: bool) -> list[tuple[ConvSpec, int]]:
    """Random convs inside the claimed regime of the gradient (layer=False) or layer closed form."""
    rng = random.Random(seed)
    out: list[tuple[ConvSpec, int]] = []
    while len(out) < n_cases:
        nd = rng.choice([1, 2, 2, 3])
        g = rng.choice([1, 1, 2])
        cin = g * rng.randint(1, 3)
        cout = g * rng.randint(2 if layer else 1, 5)
        ks = tuple(rng.randint(2 if layer else 1, 4) for _ in range(nd))
        ss = tuple(rng.randint(1, max(1, kk - 1)) if layer else rng.randint(1, 3) for kk in ks)
        ps = tuple(rng.randint(0, max(0, kk - 2)) if layer else rng.randint(0, kk - 1) for kk in ks)
        hs = tuple(rng.randint(2, 10 if nd < 3 else 6) for _ in range(nd))
        if any(h + 2 * p - kk < 0 for h, kk, p in zip(hs, ks, ps)):
            continue
        torch.manual_seed(rng.randint(0, 10**6))
        spec = ConvSpec.conv(torch.randn(cout, cin // g, *ks, dtype=torch.float64), None, (cin, *hs), ss, ps, 1, g)
        holds = layer_counting_holds(spec) if layer else gradient_counting_holds(spec)
        if not holds:
            continue
        out.append((spec, 1 if layer else rng.choice([1, 1, 2, 3])))
    return out


def test_gradient_counting_matches_numeric() -> None:
    torch.manual_seed(0)
    for spec, n in _random_regime_specs(80, seed=1, layer=False):
        k = torch.randn(n, *spec.out_shape, dtype=torch.float64)
        res = layer_rank(spec, k, ForwardInfo(none=True), want_null=False)
        assert res.rank_grad == gradient_rank_counting(spec, n), (spec.in_shape, spec.kernel, spec.stride, n)
    for cin, cout, n in [(5, 3, 1), (5, 3, 2), (4, 2, 7)]:
        spec = ConvSpec.linear(torch.randn(cout, cin, dtype=torch.float64), None)
        k = torch.randn(n, cout, dtype=torch.float64)
        assert layer_rank(spec, k, ForwardInfo(none=True)).rank_grad == gradient_rank_counting(spec, n) == cin * min(cout, n)


def test_layer_counting_matches_numeric() -> None:
    torch.manual_seed(1)
    for spec, _ in _random_regime_specs(50, seed=2, layer=True):
        k = torch.randn(1, *spec.out_shape, dtype=torch.float64)
        res = layer_rank(spec, k, ForwardInfo(), want_null=False)
        assert res.rank == layer_rank_counting(spec), (spec.in_shape, spec.kernel, spec.stride, spec.padding)
    spec = ConvSpec.linear(torch.randn(4, 9, dtype=torch.float64), None)
    assert layer_rank(spec, torch.randn(1, 4, dtype=torch.float64), ForwardInfo()).rank == layer_rank_counting(spec) == 9


# Outside the claimed regime the closed forms miss; the numeric rank (checked dense here) is the answer.
OUTSIDE = [
    # (why, in_shape, kernel, stride, padding, dilation, C_out, which formula misses)
    ("dilation", (3, 8, 5), (3, 3), (2, 1), (1, 2), (3, 3), 4, "gradient"),
    ("kernel as long as the output", (2, 3, 3, 4), (2, 2, 4), (1, 1, 1), (0, 0, 0), (1, 1, 1), 2, "gradient"),
    ("padding = kernel - 1", (3, 9), (3,), (2,), (2,), (1,), 2, "layer"),
    ("stride > kernel", (3, 7), (1,), (3,), (1,), (1,), 1, "layer"),
]


@pytest.mark.parametrize("case", OUTSIDE, ids=[c[0] for c in OUTSIDE])
def test_closed_forms_outside_their_regime(case) -> None:
    _why, ins, ks, ss, ps, ds, cout, which = case
    torch.manual_seed(4)
    spec = ConvSpec.conv(torch.randn(cout, ins[0], *ks, dtype=torch.float64), None, ins, ss, ps, ds, 1)
    k = torch.randn(1, *spec.out_shape, dtype=torch.float64)
    res = layer_rank(spec, k, ForwardInfo())
    kd, fd = dense_system(spec, k, ForwardInfo())
    assert res.rank_grad == dense_rank(kd) and res.rank == dense_rank(kd, fd)
    # gradient counting is an upper bound on rank(K) for every instance
    assert res.rank_grad <= gradient_rank_counting(spec)
    if which == "gradient":
        assert not gradient_counting_holds(spec)
        assert res.rank_grad < gradient_rank_counting(spec)
    else:
        assert not layer_counting_holds(spec)
        assert res.rank != layer_rank_counting(spec)


# ---------------------------------------------------------------------------------------------- 4. bounds
LIMITS = (1, 7, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)


@pytest.mark.parametrize("name", ["conv2d-s2p1", "conv2d-N2-stride3", "conv1d-dil-groups", "linear-N5-wide", "conv3d"])
def test_bounds_contain_the_rank(name: str) -> None:
    spec, k, gen = _spec_and_k(name, seed=9)
    n_bounds = 0
    for fwd in fwd_variants(spec, k.shape[0], gen).values():
        kd, fd = dense_system(spec, k, fwd)
        true_rank, true_k = dense_rank(kd, fd), dense_rank(kd)
        for limit in LIMITS:
            res = layer_rank(spec, k, fwd, exact_limit=limit)
            assert res.rank_lower <= true_rank <= res.rank_upper <= res.unknowns
            if res.method == "bounds":
                n_bounds += 1
                assert res.rank is None and res.deficit is None and res.null_basis is None
                assert res.rank_grad in (None, true_k)
            else:
                assert (res.rank, res.rank_grad) == (true_rank, true_k)
    assert n_bounds > 0


def test_bounds_branches() -> None:
    """The three ways out: rank(K) itself bounded (a K block too big), rank(K) exact but F Z not
    formed, rank(K) exact plus the rank of F on a subset of null(K) (a lower bound above rank(K))."""
    spec, k, _gen = _spec_and_k("conv2d-s2p1", seed=2)
    fwd = ForwardInfo()
    kd, fd = dense_system(spec, k, fwd)
    true_rank, true_k = dense_rank(kd, fd), dense_rank(kd)
    assert true_k < true_rank
    small = layer_rank(spec, k, fwd, exact_limit=30)
    assert small.method == "bounds" and small.rank_grad is None
    assert small.rank_lower <= true_k and true_rank <= small.rank_upper
    mid = layer_rank(spec, k, fwd, exact_limit=300)
    assert mid.method == "bounds" and mid.rank_grad == true_k == mid.rank_lower
    assert mid.rank_upper == min(mid.unknowns, true_k + mid.fwd_rows) >= true_rank
    full = layer_rank(spec, k, fwd, exact_limit=100_000)
    assert full.method == "structured-svd" and full.rank == true_rank
    # many channels share one small block: cheap null bases, F Z (960 entries) over the limit
    torch.manual_seed(3)
    spec = ConvSpec.linear(torch.randn(2, 60, dtype=torch.float64), None)
    k = torch.randn(4, 2, dtype=torch.float64)
    kd, fd = dense_system(spec, k, fwd)
    true_rank, true_k = dense_rank(kd, fd), dense_rank(kd)
    subset = layer_rank(spec, k, fwd, exact_limit=700)
    assert subset.method == "bounds" and subset.rank_grad == true_k == 120
    assert true_k < subset.rank_lower <= true_rank <= subset.rank_upper
