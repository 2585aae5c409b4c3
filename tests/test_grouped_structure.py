"""Grouped (depthwise) layers decided by their block structure: F Z block-diagonal by group, and the
directions carried from a grouped layer orthonormalised per block. Both against the dense routes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import scipy.sparse as sp
import torch

import rgap_audit.rank as rank_mod
from examples.depthwise_cnn import RGAP_MODELS as DEPTHWISE
from examples.mobilenet_cifar import MobileNetV2
from rgap_audit.analysis import audit_model
from rgap_audit.analysis.forward import _orthonormal_by_blocks


class GroupedPairs(torch.nn.Module):
    """A grouped convolution with two outputs per group (4 groups, 8 -> 8) under a biased Linear head, which
    gives its input exactly: the grouped layer's forward rows are its active outputs, nothing carried."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.stem(x))))
        return self.head(h.flatten(1))


CASES = {
    **{name: (d["factory"], d["input_shape"]) for name, d in DEPTHWISE.items()},
    "grouped-pairs": (GroupedPairs, (3, 6, 6)),
    "mobilenetv2-two-stages": (lambda: MobileNetV2(stages=((2, 4, 2, 1), (2, 8, 1, 2)), stem=4, last=16), (3, 8, 8)),
}


def _records(name: str):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    rep = audit_model(factory(), shape).report
    return [(r.node, r.unknowns, r.rank, r.deficit, r.rank_lower, r.rank_upper) for r in rep.layers if r.unknowns is not None], rep.verdict.status


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_forward_rank_equals_the_dense_reduced_system(name, monkeypatch):
    used: list[bool] = []
    real = rank_mod._grouped_forward_rank

    def spy(*a, **k):
        out = real(*a, **k)
        used.append(out is not None)
        return out

    monkeypatch.setattr(rank_mod, "_grouped_forward_rank", spy)
    fast, status_fast = _records(name)
    monkeypatch.setattr(rank_mod, "_grouped_forward_rank", lambda *a, **k: None)
    dense, status_dense = _records(name)
    assert fast == dense and status_fast == status_dense
    if name in DEPTHWISE or name == "grouped-pairs":
        assert any(used), "the grouped layer took the grouped route"


def test_blockwise_orthonormal_basis_spans_the_same_space():
    rng = np.random.default_rng(3)
    blocks = []
    for rows, cols, rk in [(7, 3, 3), (5, 6, 2), (9, 4, 4), (3, 3, 1)] * 20:
        blocks.append(rng.standard_normal((rows, rk)) @ rng.standard_normal((rk, cols)))
    t = sla.block_diag(*blocks)
    perm_r, perm_c = rng.permutation(t.shape[0]), rng.permutation(t.shape[1])
    t = t[perm_r][:, perm_c]
    q = _orthonormal_by_blocks(t)
    assert np.allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)
    ref = sla.orth(t)  # dense SVD basis of the column space
    assert q.shape[1] >= ref.shape[1]
    # span(q) contains span(t): every column of t, and the dense basis of its column space, lies in it
    assert np.linalg.norm(t - q @ (q.T @ t)) <= 1e-10 * np.linalg.norm(t)
    assert np.linalg.norm(ref - q @ (q.T @ ref)) <= 1e-10 * np.sqrt(ref.shape[1])


def test_blockwise_basis_of_a_sparse_input_with_single_columns_equals_the_dense_one():
    """The sparse route (entry_rows hands a scipy matrix; one-column components are normalised without a
    QR) gives the same column space as the dense input, and both contain the dense SVD basis."""
    import scipy.sparse as sp

    rng = np.random.default_rng(5)
    blocks = [rng.standard_normal((4, 1)) for _ in range(70)] + [rng.standard_normal((6, 3)) for _ in range(10)]
    t = sla.block_diag(*blocks)
    t = np.hstack([t, np.zeros((t.shape[0], 2))])  # two zero columns span nothing
    t = t[rng.permutation(t.shape[0])][:, rng.permutation(t.shape[1])]
    q_dense, q_sparse = _orthonormal_by_blocks(t), _orthonormal_by_blocks(sp.csr_matrix(t))
    ref = sla.orth(t)
    assert q_sparse.shape == q_dense.shape == ref.shape  # every block has full column rank here
    assert np.allclose(q_sparse.T @ q_sparse, np.eye(q_sparse.shape[1]), atol=1e-12)
    assert np.allclose(q_sparse @ q_sparse.T, ref @ ref.T, atol=1e-12)
    assert np.allclose(q_dense @ q_dense.T, ref @ ref.T, atol=1e-12)


@pytest.mark.parametrize("want_null", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (5, 5), (0, 3), (4, 0)])
def test_stacked_block_ranks_equal_one_block_at_a_time(shape, want_null):
    """_rank_null_stack (one stacked SVD for many equal-shaped blocks) against _rank_null per block and
    numpy's matrix_rank, on blocks of every rank, a zero block and a scaled reference."""
    rng = np.random.default_rng(11)
    m, n = shape
    blocks = []
    for r in range(min(m, n) + 1):
        for _ in range(3):
            blocks.append(rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * 10.0 ** rng.uniform(-3, 3))
    blocks.append(np.zeros((m, n)))
    stack = np.stack(blocks) if blocks else np.zeros((0, m, n))
    for scale in (0.0, 50.0):
        got = rank_mod._rank_null_stack(stack, want_null, scale, 1.0)
        assert len(got) == len(blocks)
        for b, (rk, rel, nb) in zip(blocks, got):
            ref_rk, ref_rel, ref_nb = rank_mod._rank_null(b, want_null, scale, 1.0)
            assert rk == ref_rk
            if scale == 0.0 and b.size:
                assert rk == np.linalg.matrix_rank(b)
            assert (rel is None) == (ref_rel is None) and (rel is None or np.isclose(rel, ref_rel, rtol=1e-10))
            if want_null:
                assert nb is not None and ref_nb is not None and nb.shape == ref_nb.shape == (n, n - rk)
                assert np.allclose(nb @ nb.T, ref_nb @ ref_nb.T, atol=1e-10)
                assert np.allclose(b @ nb, 0.0, atol=1e-8 * max(1.0, np.abs(b).max(initial=0.0)))
            elif n:
                assert nb is None


def test_grouped_route_decides_a_layer_whose_dense_reduced_system_exceeds_the_limit(monkeypatch):
    """Under an exact limit too small for the dense F Z, a depthwise layer is still ranked exactly by its
    blocks (the null bases of K are computed for it), equal to the unrestricted audit's rank; without the
    grouped route the same layer is only bounded."""
    from rgap_audit.analysis import audit_loaded
    from rgap_audit.options import AuditOptions, LoadedModel

    name = "DepthwiseCNN"
    d = DEPTHWISE[name]
    torch.manual_seed(0)
    loaded = LoadedModel(file="<test>", name=name, module=d["factory"](), input_shape=d["input_shape"], loss=d.get("loss"))
    ref = {r.node: r for r in audit_loaded(loaded, AuditOptions()).layers}
    small = {r.node: r for r in audit_loaded(loaded, AuditOptions(exact_rank_limit=20_000)).layers}
    monkeypatch.setattr(rank_mod, "_grouped_route", lambda *a, **k: False)
    without = {r.node: r for r in audit_loaded(loaded, AuditOptions(exact_rank_limit=20_000)).layers}
    decided = [n for n, r in small.items() if r.rank is not None and without[n].rank is None and r.unknowns is not None]
    assert decided, "some layer is exact only through its blocks"
    for n in decided:
        assert small[n].rank == ref[n].rank and small[n].deficit == ref[n].deficit


@pytest.mark.parametrize("cond", [1.0, 1e5, "deficient"])
def test_dense_orthonormal_basis_against_svd(cond) -> None:
    """One group of columns (a row meets them all): the basis comes from Cholesky QR (one pass when t^T t is
    well conditioned, two when moderately, Householder when not positive definite); orthonormal and spanning
    t's columns, against scipy's SVD basis (sla.orth)."""
    rng = np.random.default_rng(7)
    u = np.linalg.qr(rng.standard_normal((600, 80)))[0]
    s = np.logspace(0, -5, 80) if cond == 1e5 else np.ones(80)
    if cond == "deficient":
        s[-5:] = 0.0
    t = (u * s) @ np.linalg.qr(rng.standard_normal((80, 80)))[0]
    q = _orthonormal_by_blocks(t)
    assert np.abs(q.T @ q - np.eye(q.shape[1])).max() < 1e-12
    ref = sla.orth(t)
    assert np.linalg.norm(t - q @ (q.T @ t)) <= 1e-10 * np.linalg.norm(t)
    assert np.linalg.norm(ref - q @ (q.T @ ref)) <= 1e-10 * np.sqrt(ref.shape[1])


def test_column_groups_match_the_column_graph() -> None:
    """The column groups from nnz edges (forward._column_groups) are the connected components of the
    graph of columns sharing a row (scipy csgraph on nz^T nz, formed densely)."""
    from scipy.sparse import csgraph

    from rgap_audit.analysis.forward import _column_groups

    rng = np.random.default_rng(5)
    pattern = rng.random((300, 120)) > 0.995
    nz = sp.csr_matrix(pattern)
    n_ref, lab_ref = csgraph.connected_components(sp.csr_matrix(pattern.T.astype(int) @ pattern.astype(int)), directed=False)
    n_got, lab_got = _column_groups(nz)
    assert n_got == n_ref > 1
    # the same partition: labels agree up to renaming
    pairs = set(zip(lab_ref.tolist(), lab_got.tolist()))
    assert len(pairs) == n_ref
