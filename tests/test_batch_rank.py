"""Batch systems (B = 2..4): the forward-first block elimination against dense truth and against the
gradient-first route.

Claim: with per-sample forward rows (an entrywise link above: LeakyReLU slopes, a ReLU mask, known
input entries per sample) rank([K; F]) = sum_n rank(F_n) + rank(K Z_F) (rgap_audit.batchrank), and
its null basis spans the null space of the batch system. Oracle: rank.dense_system builds K by autograd
(the jacobian of x -> dL/dW) and F from the jacobians of the layer and of the link, over all samples at
once; its rank is one SVD of the stacked matrix (tests/test_rank.dense_rank). Nothing in the oracle
knows about samples, residue blocks or null spaces. The two routes of rank.layer_rank are also
compared with each other where both fit.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.linalg as sla
import torch

from rgap_audit.analysis import audit
from rgap_audit.convspec import ConvSpec
from rgap_audit.rank import ForwardInfo, dense_system, layer_rank
from rgap_audit.structure import sparse_forward
from tests.test_rank import assert_null_basis, dense_rank

CASES = {
    # wide per-sample forward rows (stride 2): deficient batch systems
    "conv2d-s2-down": dict(cin=3, cout=4, k=(3, 3), h=(7, 7), s=(2, 2), p=(1, 1), groups=1),
    # K Z_F with more rows than columns: the batch system has full column rank
    "conv2d-s2-full": dict(cin=2, cout=6, k=(3, 3), h=(6, 6), s=(2, 2), p=(1, 1), groups=1),
    "conv1d-groups": dict(cin=4, cout=4, k=(3,), h=(9,), s=(2,), p=(0,), groups=2),
    "linear": dict(cin=6, cout=2, k=(), h=(), s=(), p=(), groups=1),
}
# K Z_F wide (576 x 448 B) and row-deficient (the C_out^2 ties of K with F): the pivoted-Cholesky certificate
WIDE = dict(cin=8, cout=8, k=(3, 3), h=(9, 9), s=(2, 2), p=(1, 1), groups=1)


def _spec(cfg: dict, gen: torch.Generator) -> ConvSpec:
    w = torch.randn(cfg["cout"], cfg["cin"] // cfg["groups"], *cfg["k"], generator=gen, dtype=torch.float64)
    if not cfg["k"]:
        return ConvSpec.linear(w, None)
    return ConvSpec.conv(w, None, (cfg["cin"], *cfg["h"]), cfg["s"], cfg["p"], 1, cfg["groups"])


def _forward(spec: ConvSpec, n: int, kind: str, gen: torch.Generator) -> ForwardInfo:
    """The forward rows an entrywise link gives, with `entries` set as the walk sets them."""
    shape = (n, *spec.out_shape)
    if kind == "leaky":
        slope = torch.where(torch.rand(shape, generator=gen) > 0.5, 1.0, 0.2).to(torch.float64)
        return ForwardInfo(jac=lambda t: t * slope, entries=(np.arange(n * spec.n_out), None))
    mask = (torch.rand(shape, generator=gen) > 0.3).to(torch.float64)
    if kind == "relu-shared":  # every sample with the same pattern: one per-sample block factorised
        mask = mask[:1].expand(shape).contiguous()
    rows = torch.nonzero(mask.reshape(-1)).reshape(-1).numpy()
    return ForwardInfo(jac=lambda t: t * mask, entries=(rows, None))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("kind", ["leaky", "relu", "relu-shared", "known"])
def test_forward_first_matches_dense(name: str, n: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{n}-{kind}".encode()))
    spec = _spec(CASES[name], gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    fwd = _forward(spec, n, "leaky" if kind == "known" else kind, gen)
    known = (torch.rand(n, *spec.in_shape, generator=gen) > 0.7) if kind == "known" else None
    kd, fd = dense_system(spec, k, fwd, known)
    truth = dense_rank(kd, fd)
    forced = layer_rank(spec, k, fwd, known=known, elimination="forward-first")
    # K alone settles a layer whose gradient rows have full column rank: no elimination is tried
    assert forced.method == ("batch-elimination" if dense_rank(kd) < kd.shape[1] else "structured-svd"), forced.notes
    assert forced.rank == truth and forced.deficit == kd.shape[1] - truth
    assert forced.rank_grad == dense_rank(kd)
    assert_null_basis(forced, kd, fd, known)
    other = layer_rank(spec, k, fwd, known=known, elimination="gradient-first")
    assert other.method == "structured-svd" and other.rank == truth
    auto = layer_rank(spec, k, fwd, known=known)
    assert auto.rank == truth


def test_shared_pattern_is_factorised_once() -> None:
    """LeakyReLU (every entry reaches the layer above): all samples share F_n, one block is solved."""
    from rgap_audit.batchrank import forward_first

    gen = torch.Generator().manual_seed(3)
    spec = _spec(CASES["conv2d-s2-down"], gen)
    n = 4
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64).numpy()
    got = forward_first(spec, k, np.arange(n * spec.n_out), None, want_null=False, exact_limit=10**8)
    assert not isinstance(got, str)
    assert got.patterns == 1
    # sum_n rank(F_n): each F_n = W (64 x 147) has full row rank
    assert got.rank_forward == n * spec.n_out


@pytest.mark.parametrize("n", [2, 3])
def test_auto_picks_the_smaller_reduced_system(n: int) -> None:
    """A CNN6-conv2-like layer (6 -> 18, k3 s2 p1, 13x13): per-sample forward rows 882 of 1014 unknowns, so
    K Z_F (972 x 132 B) is far smaller than F Z_K (882 B x (1014 B - rank K)): auto eliminates F first, and
    the gradient-first route agrees; with a smaller exact limit that route's F Z no longer fits and its
    Gram summed over the samples (batch-gram) must agree, or its bounds contain the rank."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(18, 6, 3, 3, generator=gen, dtype=torch.float64) / 10
    spec = ConvSpec.conv(w, None, (6, 13, 13), (2, 2), (1, 1), 1, 1)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    fwd = _forward(spec, n, "leaky", gen)
    auto = layer_rank(spec, k, fwd, want_null=False)
    assert auto.method == "batch-elimination"
    assert auto.rank is not None and auto.rank <= n * 882 + 972
    ref = layer_rank(spec, k, fwd, want_null=False, elimination="gradient-first")
    assert ref.method == "structured-svd" and auto.rank == ref.rank and auto.rank_grad == ref.rank_grad
    small = layer_rank(spec, k, fwd, want_null=False, elimination="gradient-first", exact_limit=2_000_000)
    if small.method == "batch-gram":
        assert small.rank == auto.rank == auto.unknowns
    elif small.rank is not None:
        assert small.method == "structured-svd" and small.rank == auto.rank
    else:
        assert small.method == "bounds" and small.rank_lower <= auto.rank <= small.rank_upper


def _block_row_order(spec: ConvSpec) -> np.ndarray:
    """The weight-entry index (o, c, offset) of each of rank.gradient_blocks' rows (c, o, offset)."""
    c_out, c_in = spec.out_channels, spec.in_channels
    kk = spec.n_weight // (c_out * c_in)
    c, o, t = np.meshgrid(np.arange(c_in), np.arange(c_out), np.arange(kk), indexing="ij")
    return (o * c_in * kk + c * kk + t).ravel()


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("route", ["ties", "pivoted"])
def test_wide_deficient_reduced_system_matches_dense(n: int, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """K Z_F with more columns than its 576 rows and a row deficit (every output a forward row: the C_out^2
    identities vec(A W) are its left null vectors), settled without its SVD: by the identities' residual and
    the Gram of the rows they leave (batchrank._tied_reduced_rank), or, with the identities switched off, by
    the pivoted Cholesky route (batchrank._pivoted_rank). Rank and null basis against the dense SVD of [K; F]."""
    from rgap_audit import batchrank

    target = "_tied_reduced_rank" if route == "ties" else "_pivoted_rank"
    settled = []
    original = getattr(batchrank, target)
    monkeypatch.setattr(batchrank, target, lambda *a, **kw: settled.append(original(*a, **kw)) or settled[-1])
    if route == "pivoted":
        monkeypatch.setattr(batchrank, "_ties", lambda *a, **kw: "switched off")
    gen = torch.Generator().manual_seed(11 + n)
    spec = _spec(WIDE, gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    fwd = _forward(spec, n, "leaky", gen)
    kd, fd = dense_system(spec, k, fwd)
    res = layer_rank(spec, k, fwd, elimination="forward-first")
    assert res.method == "batch-elimination"
    assert res.rank == dense_rank(kd, fd)
    assert res.deficit and res.deficit > 0
    assert settled and settled[-1] is not None  # the certificate, not the SVD fallback, decided it
    assert_null_basis(res, kd, fd, None)


def test_ties_residual_refuses_rows_that_break_the_identities() -> None:
    """The identities' residual is measured, not assumed: K Z_F with one of its rows perturbed above the SVD
    rule's tolerance has |K| - C_out^2 + 1 singular values above it, and the ties route must refuse it (the
    caller then ranks it by its SVD-rule certificate)."""
    from rgap_audit import batchrank

    gen = torch.Generator().manual_seed(5)
    spec = _spec(WIDE, gen)
    n = 2
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    kd, fd = dense_system(spec, k, _forward(spec, n, "leaky", gen))
    ties = batchrank._ties(spec, n, np.arange(n * spec.n_out))
    assert not isinstance(ties, str)
    z = sla.null_space(fd)
    a = kd @ z  # K Z_F, rows in gradient_blocks' order (the dense system's K rows are the weight's entries)
    a = a[_block_row_order(spec)]
    got = batchrank._tied_reduced_rank(a, ties, 0.0, 1.0, True)
    s = np.linalg.svd(a, compute_uv=False)
    assert got is not None and got[0] == int((s > max(a.shape) * np.finfo(float).eps * s[0]).sum()) == spec.n_weight - spec.out_channels**2
    bumped = a.copy()
    bumped[ties.kept[0]] += 1e-6 * np.abs(a).max() * np.random.default_rng(0).standard_normal(a.shape[1])
    assert batchrank._tied_reduced_rank(bumped, ties, 0.0, 1.0, True) is None


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("kind", ["leaky", "relu"])
def test_tied_rows_rank_a_reduced_system_too_large_to_hold(n: int, kind: str) -> None:
    """K Z_F over the exact limit (forced by a small one): with every output row of every sample (a
    LeakyReLU above), the C_out^2 identities vec(A W) bound rank(K Z_F) by |K| - C_out^2 and the Gram of the
    rows left after dropping them, summed over the samples, proves that rank (batchrank._tied_row_rank):
    equal to the dense SVD of [K; F]. Under a ReLU (some rows missing) there are no such identities and the
    layer stays on bounds that bracket the dense rank."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"tied-{n}-{kind}".encode()))
    spec = _spec(CASES["conv2d-s2-down"], gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    fwd = _forward(spec, n, kind, gen)
    kd, fd = dense_system(spec, k, fwd)
    truth = dense_rank(kd, fd)
    res = layer_rank(spec, k, fwd, elimination="forward-first", exact_limit=10_000)
    if kind == "leaky":
        assert res.method == "batch-elimination", res.notes
        assert res.rank == truth
        assert spec.n_weight * (kd.shape[1] - n * spec.n_out) > 10_000  # K Z_F itself was over the limit
        # with the kept rows' Gram over the limit too, the identities still prove rank <= rank F + |K| - C_out^2
        # (batchrank.TiedBound): here that bound is the dense rank itself, and the lower bound stays below it
        kept = spec.n_weight - spec.out_channels**2
        assert kept * kept > 8_000
        bounded = layer_rank(spec, k, fwd, elimination="forward-first", exact_limit=8_000)
        assert bounded.rank is None and bounded.rank_upper == n * spec.n_out + kept == truth, bounded.notes
        assert bounded.rank_lower <= truth
        assert any("identities vec(A W) prove" in t for t in bounded.notes)
    else:
        assert res.rank is None and res.rank_lower <= truth <= res.rank_upper, res.notes
        assert any("no identities with K" in t for t in res.notes)


@pytest.mark.parametrize("rank", [150, 299, 300])
def test_pivoted_rank_against_svd(rank: int) -> None:
    """The certified rank of a wide matrix (300 x 500) of a known rank equals numpy's SVD rule; its null
    basis is orthonormal and annihilated."""
    from rgap_audit.batchrank import _reduced_rank

    rng = np.random.default_rng(rank)
    a = rng.standard_normal((300, rank)) @ rng.standard_normal((rank, 500))
    s = np.linalg.svd(a, compute_uv=False)
    truth = int((s > max(a.shape) * np.finfo(float).eps * s[0]).sum())
    r, _rel, null = _reduced_rank(a, True, 0.0, 1.0)
    assert r == truth == rank
    assert null is not None and null.shape == (500, 500 - rank)
    assert np.abs(null.T @ null - np.eye(500 - rank)).max() < 1e-9
    assert np.abs(a @ null).max() < 1e-9 * np.abs(a).max()
    # without a null basis, rank <= r is proven from the rows left out (their residual against the picked rows)
    r2, _rel2, none = _reduced_rank(a, False, 0.0, 1.0)
    assert r2 == truth and none is None
    # a perturbation above the SVD rule's tolerance is rank the residual proof must not hide
    bumped = a + 1e-6 * np.abs(a).max() * rng.standard_normal(a.shape)
    s_b = np.linalg.svd(bumped, compute_uv=False)
    assert _reduced_rank(bumped, False, 0.0, 1.0)[0] == int((s_b > max(a.shape) * np.finfo(float).eps * s_b[0]).sum()) == 300


TALL = dict(cin=2, cout=4, k=(3, 3), h=(5, 5), s=(1, 1), p=(1, 1), groups=1)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("where", ["random", "in-range"])
def test_carried_directions_per_sample_proof(n: int, where: str) -> None:
    """Directions carried from the layer above mix the samples; the forward rows' full column rank is
    proven per sample (batchrank.carried_forward_proof) or, where carried directions lie in range(F) and
    take rank away, refused and decided otherwise. Both against the dense SVD of [K; F] with the carried
    directions projected out (rank.dense_system)."""
    gen = torch.Generator().manual_seed(5 * n + (where == "in-range"))
    spec = _spec(TALL, gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    big = n * spec.n_out
    if where == "random":
        q = torch.linalg.qr(torch.randn(big, 20, generator=gen, dtype=torch.float64))[0]
    else:  # directions W v: the forward rows lose them
        v = torch.randn(4, n, *spec.in_shape, generator=gen, dtype=torch.float64)
        wv = spec.forward(v.reshape(4 * n, *spec.in_shape), with_bias=False).reshape(4, big).T
        q = torch.linalg.qr(torch.cat([wv, torch.randn(big, 6, generator=gen, dtype=torch.float64)], dim=1))[0]
    fwd = ForwardInfo(unknown=q, entries=(np.arange(big), q.numpy()))
    kd, fd = dense_system(spec, k, fwd)
    res = layer_rank(spec, k, fwd)
    assert res.rank == dense_rank(kd, fd)
    if where == "random":
        assert res.method == "batch-angles" and res.deficit == 0
    else:
        assert res.method != "batch-angles"


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("where", ["random", "in-range", "known"])
@pytest.mark.parametrize("shape", ["few-weights", "many-weights"])
def test_carried_elimination_matches_dense(n: int, where: str, shape: str) -> None:
    """More carried directions than the forward rows leave room for (P F alone is rank-deficient), tall
    F_n: rank([K; P F]) = unknowns - d + rank([N^T Q; K F^+ Q]) (batchrank.carried_elimination) against
    the dense SVD of [K; P F] (rank.dense_system, which projects the carried directions out), its null
    basis against the dense system, and the gradient-first route on the same layer. "few-weights": K has
    fewer rows than directions are carried, so K_n (F_n^T F_n)^-1 is formed first; "many-weights": F^+ Q
    sample by sample."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"carried-{n}-{where}-{shape}".encode()))
    spec = _spec(TALL if shape == "few-weights" else dict(TALL, cin=4, cout=5), gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    big = n * spec.n_out
    known = (torch.rand(n, *spec.in_shape, generator=gen) > 0.9) if where == "known" else None  # K alone must not settle it
    d = big - n * spec.n_in + (0 if known is None else int(known.sum())) + 12  # rows - d < unknowns: no angle proof
    if where == "in-range":  # some directions W v: F x = Q y has solutions, the layer loses rank
        v = torch.randn(8, n, *spec.in_shape, generator=gen, dtype=torch.float64)
        wv = spec.forward(v.reshape(8 * n, *spec.in_shape), with_bias=False).reshape(8, big).T
        q = torch.linalg.qr(torch.cat([wv, torch.randn(big, d - 8, generator=gen, dtype=torch.float64)], dim=1))[0]
    else:
        q = torch.linalg.qr(torch.randn(big, d, generator=gen, dtype=torch.float64))[0]
    fwd = ForwardInfo(unknown=q, entries=(np.arange(big), q.numpy()))
    kd, fd = dense_system(spec, k, fwd, known)
    truth = dense_rank(kd, fd)
    res = layer_rank(spec, k, fwd, known=known, elimination="carried")
    assert res.method == "batch-carried", res.notes
    assert res.rank == truth and res.deficit == kd.shape[1] - truth
    assert_null_basis(res, kd, fd, known)
    other = layer_rank(spec, k, fwd, known=known, elimination="gradient-first")
    assert other.method != "batch-carried" and other.rank == truth


@pytest.mark.parametrize("d_extra, route", [(-40, "batch-angles"), (12, "batch-carried")])
def test_raw_carried_basis_is_never_orthonormalised(d_extra: int, route: str) -> None:
    """Carried directions handed down raw, as forward.entry_rows does below a LeakyReLU: an orthonormal S
    scaled entry by entry by 1 or 5 (singular values in [1, 5]). The angle proof (few directions) and the
    carried elimination (many) decide the layer from the raw basis, never calling its orthonormalisation,
    with the rank of the dense SVD of [K; P F] (the oracle projects out an orthonormal basis of the same
    span)."""
    from rgap_audit.rank import CarriedDirections

    n = 2
    gen = torch.Generator().manual_seed(77 + d_extra)
    spec = _spec(TALL, gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    big = n * spec.n_out
    d = big - n * spec.n_in + d_extra
    s = torch.linalg.qr(torch.randn(big, d, generator=gen, dtype=torch.float64))[0]
    w = torch.where(torch.rand(big, generator=gen) > 0.5, 1.0, 5.0).to(torch.float64)
    raw = (w[:, None] * s).numpy()

    def refuse(_t: object) -> np.ndarray:
        raise AssertionError("the raw basis was orthonormalised")

    carried = CarriedDirections(raw=raw, sv_bounds=(1.0, 5.0), orthonormalise=refuse)
    q = torch.from_numpy(np.linalg.qr(raw)[0])
    kd, fd = dense_system(spec, k, ForwardInfo(unknown=q, entries=(np.arange(big), q.numpy())))
    forced = "carried" if route == "batch-carried" else "auto"  # this small layer's P F Z is the smaller system
    res = layer_rank(spec, k, ForwardInfo(unknown=q, entries=(np.arange(big), carried)), elimination=forced)
    assert res.method == route, res.notes
    assert res.rank == dense_rank(kd, fd)


def test_carried_elimination_below_a_linear_head() -> None:
    """The case that motivated the route: a conv stem (tall per sample: 144 outputs for 108 inputs) under a
    Linear head at B = 2, which leaves half of its inputs undetermined, carried down as a dense basis. The
    walk picks the elimination, and every layer's deficit equals the dense chain oracle's (one autograd
    system over all layer inputs, tests/oracles.py)."""
    from test_analysis import _walk_deficits

    from oracles import dense_chain_deficits
    from rgap_audit.analysis import audit

    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 6 * 6, 1, bias=False))
    rep = audit(net, (3, 6, 6), batch_size=2)
    stem = next(r for r in rep.layers if r.op == "Conv2d")
    assert stem.rank_method == "batch-carried"
    assert _walk_deficits(net, (3, 6, 6), "logistic", 2) == dense_chain_deficits(net, (3, 6, 6), "logistic", batch=2)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("rows", ["independent", "dependent"])
def test_carried_row_space_matches_dense(n: int, rows: str) -> None:
    """So many directions carried that |K| + m - d rows are fewer than the unknowns: the layer is ranked from
    [K; U^T F] (batchrank.carried_row_space), against the dense SVD of [K; P F] (rank.dense_system projects
    the carried directions out) and the gradient-first route. "dependent": one known direction u of the
    forward rows' range has u^T F = 0 (u in range(F)^perp), so one row of U^T F is zero and the rows' Gram
    must not be taken as proof of independence."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"rowspace-{n}-{rows}".encode()))
    spec = _spec(dict(TALL, cin=3, cout=4), gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    big, unknowns = n * spec.n_out, n * spec.n_in
    d = big - (unknowns - spec.n_weight) + 20  # |K| + m - d = unknowns - 20
    if rows == "dependent":
        w = sparse_forward(spec, n).toarray()
        left = sla.null_space(w.T)[:, :1]  # u with u^T F = 0, kept known: Q spans a complement holding it out
        rest = torch.randn(big, d, generator=gen, dtype=torch.float64).numpy()
        rest -= left @ (left.T @ rest)
        q = torch.from_numpy(np.linalg.qr(rest)[0])
    else:
        q = torch.linalg.qr(torch.randn(big, d, generator=gen, dtype=torch.float64))[0]
    fwd = ForwardInfo(unknown=q, entries=(np.arange(big), q.numpy()))
    kd, fd = dense_system(spec, k, fwd)
    truth = dense_rank(kd, fd)
    res = layer_rank(spec, k, fwd, elimination="row-space")  # (auto takes it only where its system is the smaller)
    assert res.method == "batch-rowspace", res.notes
    assert res.rank == truth and res.deficit == unknowns - truth
    assert (truth < spec.n_weight + big - d) == (rows == "dependent")
    assert_null_basis(res, kd, fd, None)
    other = layer_rank(spec, k, fwd, elimination="gradient-first")
    assert other.method != "batch-rowspace" and other.rank == truth
    assert layer_rank(spec, k, fwd).rank == truth


def test_row_space_route_below_a_residual_segment_matches_the_joint_oracle() -> None:
    """ResNet-tiny at B = 12 on 3x8x8: its residual segment leaves directions of the stem's output undetermined,
    handed down as a basis, and the stem below has fewer known rows than unknowns (batch-rowspace). The
    input's undetermined directions equal those of one dense system over the input built by autograd
    (tests/oracles.py dense_cut_deficits: every weight gradient downstream, each dL/dz held)."""
    from examples.resnet_bn import resnet_tiny
    from oracles import dense_cut_deficits
    from rgap_audit.analysis import audit_model

    torch.manual_seed(0)
    checked = audit_model(resnet_tiny(), (3, 8, 8), batch_size=12)
    inst, rep = checked.instance, checked.report
    stem = next(r for r in rep.layers if r.node == "stem_0")
    seg = next(r for r in rep.layers if r.kind == "segment")
    assert stem.rank_method == "batch-rowspace" and seg.segment is not None
    truth = dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, ["x"])
    assert stem.deficit == truth["x"] > 0
    assert seg.deficit and seg.deficit > 0  # (the segment's own joint system is checked in test_segments.py)


def _three_convs() -> torch.nn.Module:
    """CNN6-d in miniature: a tall stem, a wide stride-2 conv that leaves directions undetermined, and a
    conv whose gradient rows alone determine its input (so nothing is carried into the middle one)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, 1, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 3, 3, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(72, 1, bias=False),
    )  # fmt: skip


@pytest.mark.parametrize("batch", [2, 3])
def test_rows_of_the_layer_above_replace_a_basis_too_large_to_keep(batch: int) -> None:
    """With an exact limit too small to keep the middle conv's null basis, the stem is ranked with that
    layer's own rows (batchrank.composite_first) instead of being bounded by a count: every layer's deficit
    equals the dense chain oracle's (one autograd system over all layer inputs, tests/oracles.py) and the
    walk with the default limit (which keeps the basis and takes the carried-direction routes)."""
    from oracles import dense_chain_deficits
    from rgap_audit.analysis import audit_instance
    from rgap_audit.instance import build_instance
    from rgap_audit.options import AuditOptions, LoadedModel

    torch.manual_seed(4)
    net = _three_convs()
    shape = (2, 6, 6)
    # above the stem's reduced system (180 x 45 B), below the middle conv's null basis (144 B x its deficit)
    options = AuditOptions(batch_size=batch, loss="logistic", seed=0, exact_rank_limit=30_000)
    loaded = LoadedModel(file="<test>", name="three-convs", module=net, input_shape=shape)
    rep = audit_instance(build_instance(loaded, options), options).report
    layers = [r for r in rep.layers if r.unknowns is not None]
    stem = layers[-1]
    assert stem.rank_method == "batch-composite", stem.reason
    assert layers[-2].deficit  # the middle conv left directions undetermined (a count only, here)
    walked = [r.deficit for r in reversed(layers)]
    assert walked == dense_chain_deficits(net, shape, "logistic", batch=batch)
    default = [r.deficit for r in reversed([r for r in audit(net, shape, loss="logistic", batch_size=batch).layers if r.unknowns is not None])]
    assert walked == default


@pytest.mark.parametrize("act", ["leaky", "sigmoid"])
def test_composite_system_too_large_to_hold_ranked_from_its_row_gram(act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three convs at B = 5 with a limit below the stem's composite reduced system (180 x 225) but above
    its row Gram (180^2): the rank comes from that Gram summed over the samples and a second pass for the
    residual of the rows the pivoted Cholesky leaves (batchrank._composite_gram_rank; 13 rows are dependent:
    the middle conv's 9 ties and the stem's 4). LeakyReLU: every layer's deficit equals the dense chain
    oracle's. Sigmoid (slopes <= 1/4, a worse conditioned composite): where the certificate fails the stem is
    bounded, and the bounds contain the oracle's rank."""
    from oracles import dense_chain_deficits
    from rgap_audit import batchrank
    from rgap_audit.analysis import audit_instance
    from rgap_audit.instance import build_instance
    from rgap_audit.options import AuditOptions, LoadedModel

    calls: list = []
    original = batchrank._composite_gram_rank
    monkeypatch.setattr(batchrank, "_composite_gram_rank", lambda *a, **kw: calls.append(original(*a, **kw)) or calls[-1])
    nn = torch.nn
    make = (lambda: nn.LeakyReLU(0.2)) if act == "leaky" else nn.Sigmoid
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, 1, 1, bias=False), make(), nn.Conv2d(4, 3, 3, 2, 1, bias=False), make(),
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), make(), nn.Flatten(), nn.Linear(72, 1, bias=False),
    )  # fmt: skip
    shape, batch = (2, 6, 6), 5
    options = AuditOptions(batch_size=batch, loss="logistic", seed=0, exact_rank_limit=35_000)
    rep = audit_instance(build_instance(LoadedModel(file="<test>", name="t", module=net, input_shape=shape), options), options).report
    layers = [r for r in reversed(rep.layers) if r.unknowns is not None]
    truth = dense_chain_deficits(net, shape, "logistic", batch=batch)
    assert calls, "the row-Gram route was not tried"
    stem = layers[0]
    if act == "leaky":
        assert stem.rank_method == "batch-composite" and isinstance(calls[-1], tuple), calls
        assert [r.deficit for r in layers] == truth
    else:
        assert [r.deficit for r in layers[1:]] == truth[1:]
        if stem.rank is None:
            assert stem.rank_lower <= stem.unknowns - truth[0] <= stem.rank_upper
        else:
            assert stem.deficit == truth[0]


@pytest.mark.parametrize("batch, limit", [(4, 50_000), (6, 80_000), (4, 10**8)])
def test_conv_stem_below_a_linear_output_layer_matches_dense(batch: int, limit: int) -> None:
    """A conv stem under a Linear output layer at B > 1 (no forward rows: the loss does not reveal each
    sample's output). With a limit below the Linear's null basis the stem is ranked with the Linear's own
    rows (batch-composite, from its row Gram when the reduced system is over the limit too); with the default
    limit the basis is kept and the stem has fewer known rows than unknowns (batch-rowspace). Every deficit
    equals the dense chain oracle's."""
    from oracles import dense_chain_deficits
    from rgap_audit.analysis import audit_instance
    from rgap_audit.instance import build_instance
    from rgap_audit.options import AuditOptions, LoadedModel

    nn = torch.nn
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(144, 1, bias=False))
    shape = (2, 6, 6)
    options = AuditOptions(batch_size=batch, loss="logistic", seed=0, exact_rank_limit=limit)
    rep = audit_instance(build_instance(LoadedModel(file="<test>", name="t", module=net, input_shape=shape), options), options).report
    layers = [r for r in reversed(rep.layers) if r.unknowns is not None]
    assert layers[0].rank_method == ("batch-rowspace" if limit == 10**8 else "batch-composite"), layers[0].reason
    assert [r.deficit for r in layers] == dense_chain_deficits(net, shape, "logistic", batch=batch)


# ---------------------------------------------------------------------------------------------- whole walks
def _down_chain() -> torch.nn.Module:
    """CNN6 in miniature: a stride-1 conv below a stride-2 one (per-sample forward rows wider than square)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=1, padding=1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(72, 1, bias=False),
    )


@pytest.mark.parametrize("case", ["leaky-convs", "narrow-middle", "relu-mlp", "conv1d-dilated", "down-chain"])
@pytest.mark.parametrize("batch", [2, 3, 4])
def test_walk_batch_deficits_match_dense_chain_system(case: str, batch: int) -> None:
    """Every layer's deficit of the walk at B = 2..4 (the batch routes among them) against ONE dense system
    over all layer inputs of the chain, built by autograd (tests/oracles.dense_chain_deficits, as the B = 1
    oracle of tests/test_analysis.py)."""
    from test_analysis import CASES as CHAINS
    from test_analysis import _walk_deficits

    from oracles import dense_chain_deficits

    make, shape, loss = CHAINS.get(case, (_down_chain, (2, 6, 6), "logistic"))
    torch.manual_seed(3)
    model = make()
    assert _walk_deficits(model, shape, loss, batch) == dense_chain_deficits(model, shape, loss, batch=batch)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_forward_null_gram_matches_dense(n: int) -> None:
    """F Z too large for the exact limit (forced, a small layer): its Gram summed over the samples
    (batchrank.forward_null_gram) proves full column rank exactly where the dense SVD of [K; F] says so;
    the Gram itself equals (F Z)^T (F Z) formed densely."""
    from rgap_audit import batchrank

    gen = torch.Generator().manual_seed(21 + n)
    spec = _spec(CASES["conv2d-s2-full"], gen)
    k = torch.randn(n, *spec.out_shape, generator=gen, dtype=torch.float64)
    fwd = _forward(spec, n, "leaky", gen)
    kd, fd = dense_system(spec, k, fwd)
    truth = dense_rank(kd, fd)
    full = layer_rank(spec, k, fwd, elimination="gradient-first")
    d, big = kd.shape[1] - full.rank_grad, n * spec.n_out
    limit = d * d // 2 + 1  # F Z (big x d) over the limit, its Gram (d x d) within twice the limit
    assert limit < d * big
    res = layer_rank(spec, k, fwd, elimination="gradient-first", exact_limit=limit)
    assert full.rank == truth
    if res.method == "batch-gram":
        assert res.rank == truth == kd.shape[1]
    else:
        assert res.method == "bounds" and res.rank_lower <= truth <= res.rank_upper
    assert res.method == "batch-gram" or truth < kd.shape[1]
    # the Gram against the dense product: Z = null(K) from the dense K, F = the layer's rows (scale-free)
    z = np.linalg.svd(kd)[2][dense_rank(kd):].T
    f_rows = dense_system(spec, k, ForwardInfo())[1]
    h, _, _ = batchrank.forward_null_gram(spec, n, np.arange(n * spec.n_out), [(0, list(range(spec.in_channels)), _per_channel(z, spec, n))])
    zc = _per_channel(z, spec, n)
    zfull = np.zeros((n * spec.n_in, spec.in_channels * zc.shape[1]))
    s_sp = spec.n_in // spec.in_channels
    for c in range(spec.in_channels):
        for i in range(n):
            zfull[i * spec.n_in + c * s_sp : i * spec.n_in + (c + 1) * s_sp, c * zc.shape[1] : (c + 1) * zc.shape[1]] = zc[i * s_sp : (i + 1) * s_sp]
    dense_h = (f_rows @ zfull).T @ (f_rows @ zfull)
    assert np.abs(h - dense_h).max() <= 1e-9 * np.abs(dense_h).max()


def _per_channel(z: np.ndarray, spec: ConvSpec, n: int) -> np.ndarray:
    """Any (N*S, d) basis for the Gram identity check: the dense null basis restricted to channel 0's entries,
    in (sample, position) rows (the identity holds for any per-channel blocks)."""
    s_sp = spec.n_in // spec.in_channels
    rows = np.concatenate([np.arange(i * spec.n_in, i * spec.n_in + s_sp) for i in range(n)])
    return np.linalg.qr(z[rows][:, : min(z.shape[1], 8)])[0]


@pytest.mark.parametrize("n", [1, 3])
def test_forward_null_gram_several_pieces_matches_dense(n: int) -> None:
    """The Gram summed over the samples with several pieces of Z (channel groups with their own null bases,
    different widths, as masks of known inputs give them): equal to (F Z)^T (F Z) formed densely, F the
    layer's rows at a random subset of each sample's outputs (numpy product of the dense matrices)."""
    from rgap_audit import batchrank

    gen = torch.Generator().manual_seed(40 + n)
    spec = _spec(CASES["conv2d-s2-down"], gen)  # 3 input channels of 7 x 7
    rng = np.random.default_rng(n)
    s_sp = spec.n_in // spec.in_channels
    pieces = [(0, [0, 2], rng.standard_normal((n * s_sp, 5))), (0, [1], rng.standard_normal((n * s_sp, 3)))]
    rows = np.flatnonzero(rng.random(n * spec.n_out) > 0.3)
    h, f_norm, m_rows = batchrank.forward_null_gram(spec, n, rows, pieces)
    f_all = dense_system(spec, torch.zeros(n, *spec.out_shape, dtype=torch.float64), ForwardInfo())[1]
    zfull = np.zeros((n * spec.n_in, 13))
    col = 0
    for _g, chans, z in pieces:
        for c in chans:
            for i in range(n):
                zfull[i * spec.n_in + c * s_sp : i * spec.n_in + (c + 1) * s_sp, col : col + z.shape[1]] = z[i * s_sp : (i + 1) * s_sp]
            col += z.shape[1]
    fz = f_all[rows] @ zfull
    dense_h = fz.T @ fz
    assert m_rows == rows.size
    assert np.abs(h - dense_h).max() <= 1e-12 * np.abs(dense_h).max()
    assert np.abs(h - h.T).max() == 0.0
    top = max(np.linalg.norm(f_all[rows[rows // spec.n_out == i]], 2) for i in range(n))  # max_n sigma_max(F_n)
    assert abs(f_norm - top) <= 1e-9 * top


@pytest.mark.parametrize("cond", [1e2, 1e6, 1e13])
@pytest.mark.parametrize("deficient", [False, True])
def test_tall_full_rank_certificate_against_svd(cond: float, deficient: bool) -> None:
    """The QR certificate of a tall block (batchrank._tall_full_rank): full column rank claimed only where
    numpy's SVD rule counts every column, with the same sigma_min / sigma_max; never for a rank-deficient
    block. A block too ill-conditioned for its margin is left to the SVD (None), never claimed."""
    from rgap_audit.batchrank import _tall_full_rank

    rng = np.random.default_rng(int(np.log10(cond)) + 10 * deficient)
    u = np.linalg.qr(rng.standard_normal((400, 300)))[0]
    v = np.linalg.qr(rng.standard_normal((300, 300)))[0]
    s = np.logspace(0, -np.log10(cond), 300)
    if deficient:
        s[-7:] = 0.0
    a = (u * s) @ v.T
    sv = np.linalg.svd(a, compute_uv=False)
    svd_full = bool(sv[-1] > max(a.shape) * np.finfo(float).eps * sv[0])
    got = _tall_full_rank(a)
    if got is not None:
        assert svd_full
        assert abs(got - sv[-1] / sv[0]) <= 1e-6 * sv[-1] / sv[0]
    assert got is None or not deficient
    if cond <= 1e6 and not deficient:
        assert got is not None  # a well-conditioned block is certified
