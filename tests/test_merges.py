"""Concatenations: a branch that is concatenated is a slice of the cat's output, so the forward
constraints pass through it. Checked against dense systems built with autograd alone."""

from __future__ import annotations

import torch
import torch.nn as nn

from oracles import dense_cut_deficits
from rgap_audit.analysis import audit, audit_model


class CatNet(nn.Module):
    """conv1 -> two conv branches -> cat -> LeakyReLU -> Linear (logistic head)."""

    def __init__(self, ca: int = 3, cb: int = 2, side: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.act1 = nn.LeakyReLU(0.2)
        self.conv_a = nn.Conv2d(4, ca, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(4, cb, 3, padding=1, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear((ca + cb) * side * side, 1, bias=False)

    def forward(self, x):
        h = self.act1(self.conv1(x))
        y = torch.cat([self.conv_a(h), self.conv_b(h)], dim=1)
        return self.head(self.act(y).flatten(1))


def _rank(a: torch.Tensor) -> int:
    s = torch.linalg.svdvals(a)
    return int((s > s[0] * max(a.shape) * 2.2e-16 * 10).sum())


def _dense_branch_rank(m: CatNet, x: torch.Tensor, branch: str) -> tuple[int, int]:
    """rank K and rank [K; F] of one branch conv, built from autograd only: K = d(dL/dW)/dh with
    dL/dz fixed, F = d(head input)/dh through this branch with the other branch held at its value."""
    m = m.double().eval()
    h = m.act1(m.conv1(x)).detach()
    conv, other = (m.conv_a, m.conv_b) if branch == "a" else (m.conv_b, m.conv_a)
    z_other = other(h).detach()
    label = torch.tensor([1.0], dtype=torch.float64)
    z = conv(h).detach().requires_grad_(True)
    parts = [z, z_other] if branch == "a" else [z_other, z]
    loss = nn.functional.softplus(-label * m.head(m.act(torch.cat(parts, 1)).flatten(1)).reshape(-1)).sum()
    (k,) = torch.autograd.grad(loss, z)

    def weight_grad(v):
        w = conv.weight.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad((k * nn.functional.conv2d(v, w, padding=1)).sum(), w, create_graph=True)
        return g.reshape(-1)

    def head_input(v):
        zz = conv(v)
        p = [zz, z_other] if branch == "a" else [z_other, zz]
        return m.act(torch.cat(p, 1)).flatten(1).reshape(-1)

    K = torch.autograd.functional.jacobian(weight_grad, h).reshape(-1, h.numel())
    F = torch.autograd.functional.jacobian(head_input, h).reshape(-1, h.numel())
    return _rank(K), _rank(torch.cat([K, F]))


def test_concatenated_branches_get_forward_constraints_matching_dense_ranks():
    for ca, cb in ((3, 2), (1, 1)):
        torch.manual_seed(1)
        m = CatNet(ca, cb)
        rep = audit(m, (2, 6, 6))
        rows = {r.node: r for r in rep.layers}
        x = torch.rand((1, 2, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for branch, node in (("a", "conv_a"), ("b", "conv_b")):
            r = rows[node]
            assert r.fwd_rows > 0 and "recovered" in r.chain_reason  # the chain passes the cat
            rank_k, rank_all = _dense_branch_rank(m, x, branch)
            assert (r.rank_grad, r.rank) == (rank_k, rank_all), (ca, cb, node)
        # conv1's output feeds two branches: the branches and the cat are one joint segment over act1's
        # value, and conv1 below it gets the forward rows that segment leaves known
        seg = next(r for r in rep.layers if r.kind == "segment")
        assert seg.segment is not None and set(seg.segment.layers) == {"conv_a", "conv_b"}
        assert rows["conv1"].fwd_rows > 0 and seg.node in rows["conv1"].chain_reason
        checked = audit_model(m, (2, 6, 6))
        inst = checked.instance
        truth = dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, [seg.segment.start, inst.graph.input_node])
        assert seg.deficit == truth[seg.segment.start], (ca, cb)
        assert rows["conv1"].deficit == truth[inst.graph.input_node], (ca, cb)
    assert rows["cat"].verdict.value == "passes"


def test_other_branch_entries_are_not_counted_as_known_inputs():
    """The layer above a cat reads entries of several branches: none may be taken as a known constant."""
    torch.manual_seed(1)

    class CatReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 4, bias=False)
            self.b = nn.Linear(6, 4, bias=False)
            self.head = nn.Linear(8, 1, bias=False)

        def forward(self, x):
            return self.head(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1))

    rep = audit(CatReLU(), (6,))
    head = next(r for r in rep.layers if r.node == "head")
    assert head.known_inputs is None and head.unknowns == 8
