"""The walk's per-layer deficits against an independent dense computation of the whole chain.

The reference builds, with autograd Jacobians only, one linear system over ALL layer inputs of a
chain network: each layer's gradient constraints K_i x_i = g_i, the links x_{i+1} = J_i W_i x_i
through the ops between layers (linearised at the instance, activation pattern known), and what the
loss reveals of the output. The number of directions of x_i left free by the constraints of layers
i..L (the rank of the null space restricted to x_i) is what the walk must report as layer i's deficit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from oracles import dense_chain_deficits
from rgap_audit.analysis import audit
from rgap_audit.records import Verdict


def _walk_deficits(model: nn.Module, input_shape, loss: str, batch: int = 1) -> list[int]:
    rep = audit(model, input_shape, loss=loss, batch_size=batch, seed=0)
    layers = [r for r in rep.layers if r.unknowns is not None]
    return [r.deficit for r in reversed(layers)]


CASES = {
    "leaky-convs": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=1, padding=1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(18, 1, bias=False),
        ),
        (2, 6, 6),
        "logistic",
    ),
    "narrow-middle": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False),
            nn.Tanh(),
            nn.Conv2d(4, 1, 3, stride=1, padding=1, bias=False),
            nn.Sigmoid(),
            nn.Conv2d(1, 3, 3, stride=1, padding=0, bias=False),
            nn.LeakyReLU(0.1),
            nn.Flatten(),
            nn.Linear(27, 4, bias=False),
        ),
        (1, 10, 10),
        "cross-entropy",
    ),
    "relu-mlp": (
        lambda: nn.Sequential(
            nn.Linear(12, 8, bias=False), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)
        ),
        (12,),
        "cross-entropy",
    ),
    "conv1d-dilated": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, dilation=2, padding=2, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv1d(3, 1, 2, stride=2, bias=False),
            nn.Flatten(),
            nn.Linear(5, 1, bias=False),
        ),
        (2, 10),
        "logistic",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_walk_deficits_match_dense_chain_system(case):
    make, shape, loss = CASES[case]
    torch.manual_seed(3)
    model = make()
    expected = dense_chain_deficits(model, shape, loss)
    got = _walk_deficits(model, shape, loss)
    assert got == expected


def test_walk_detects_a_deficient_layer_and_a_recoverable_one():
    # the narrow middle conv (4 -> 1 channel) cannot be recovered layer-wise; the dense chain says so too
    make, shape, loss = CASES["narrow-middle"]
    torch.manual_seed(3)
    deficits = dense_chain_deficits(make(), shape, loss)
    assert any(d > 0 for d in deficits) and deficits[-1] == 0


def test_biased_linear_leaks_exactly():
    model = nn.Sequential(nn.Linear(10, 5), nn.Sigmoid(), nn.Linear(5, 3))
    rep = audit(model, (10,), loss="cross-entropy")
    first = [r for r in rep.layers if r.unknowns is not None][-1]
    assert first.verdict == Verdict.LEAKS_EXACTLY
    assert rep.verdict.status == "leaks-exactly" and rep.verdict.input_recoverable is True
    # the leak is real: x = dW[j] / db[j] on the instance
    x = torch.rand(1, 10, dtype=torch.float64)
    m = model.double()
    loss = nn.functional.cross_entropy(m(x), torch.tensor([1]))
    gw, gb = torch.autograd.grad(loss, [m[0].weight, m[0].bias])
    j = int(gb.abs().argmax())
    assert torch.allclose(gw[j] / gb[j], x[0], rtol=1e-10)


def test_not_understood_op_is_never_safe():
    class Weird(nn.Module):
        def forward(self, x):
            return torch.sin(x)

    model = nn.Sequential(nn.Linear(6, 6, bias=False), Weird(), nn.Linear(6, 1, bias=False))
    rep = audit(model, (6,))
    assert any(r.verdict == Verdict.NOT_UNDERSTOOD for r in rep.layers)
    assert rep.verdict.input_recoverable is not False


# ------------------------------------------------------------------ the paper's networks, layer by layer
def _gram_rank(spec, k: torch.Tensor, forward_rows: bool) -> tuple[int, float]:
    """rank([K; W]) from the dense Gram K^T K / |K|^2 + W^T W / |W|^2, built with torch.func alone
    (vjp of the linear maps x -> dL/dW and x -> W x), and the gap between kept and dropped eigenvalues."""
    n = spec.n_in
    w = spec.weight
    x0 = torch.zeros(1, *spec.in_shape, dtype=torch.float64)

    def grad_w(x):
        return torch.func.grad(lambda ww: (ConvSpec(ww, spec.in_shape, spec.stride, spec.padding, spec.dilation, spec.groups).forward(x) * k).sum())(w)

    def fwd(x):
        return spec.forward(x, with_bias=False)

    def gram(f):
        _, vjp = torch.func.vjp(f, x0)
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *spec.in_shape)
        return torch.func.vmap(lambda v: vjp(f(v))[0], chunk_size=256)(eye).reshape(n, n).numpy()

    g = gram(grad_w)
    g = g / np.linalg.norm(g)  # balance the two blocks' scales (Frobenius: within sqrt(n) of the top)
    if forward_rows:
        gw = gram(fwd)
        g = g + gw / np.linalg.norm(gw)
    ev = np.linalg.eigvalsh(g)[::-1]
    tol = 1e-10 * ev[0]
    r = int((ev > tol).sum())
    gap = float(ev[r - 1] / max(ev[r], 1e-300)) if r < n else float("inf")
    return r, gap


from rgap_audit.analysis import audit_instance  # noqa: E402
from rgap_audit.convspec import ConvSpec  # noqa: E402
from rgap_audit.instance import build_instance  # noqa: E402
from rgap_audit.options import AuditOptions, LoadedModel  # noqa: E402


@pytest.mark.parametrize(("net", "max_unknowns", "at_least"), [("CNN6", 2916, 4), ("CNN6-d", 1620, 2), ("FCN3", 100, 1)])
def test_paper_networks_layers_against_dense_gram(net, max_unknowns, at_least):
    """Every layer of the paper's networks whose forward rows are the whole W (the layer above is
    recovered through an invertible activation) and whose input has at most 3200 entries: the
    walk's rank equals the rank of the dense Gram of the same system. To keep the suite short, CNN6-d
    checks only the layers whose shapes differ from CNN6's and FCN3 its output layer (its wide
    Linears have K = k (x) I, whose Gram would take gigabytes to build this way); conv2 of both is checked against the
    notes' table in test_rank.py, and the walk's chain logic on small networks above."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import paper_nets

    make, shape = {"CNN6": (paper_nets.cnn6, (3, 32, 32)), "CNN6-d": (paper_nets.cnn6_d, (3, 32, 32)), "FCN3": (paper_nets.fcn3, (1, 28, 28))}[net]
    torch.manual_seed(0)
    inst = build_instance(LoadedModel(file="<t>", name=net, module=make(), input_shape=shape), AuditOptions())
    rep = audit_instance(inst, AuditOptions()).report
    checked = 0
    for rec in rep.layers:
        if rec.unknowns is None or rec.unknowns > max_unknowns or rec.chain.value != "full":
            continue
        spec = inst.graph.conv_spec(rec.node)
        k = inst.grads[rec.node].reshape(1, *spec.out_shape)
        is_top = rec.index == 0
        r, gap = _gram_rank(spec, k, forward_rows=not is_top)
        if is_top:  # the output layer: K alone (a one-row forward block adds nothing to a full-rank K)
            assert rec.rank_grad == r
        assert rec.rank == r and rec.deficit == rec.unknowns - r, (rec.node, rec.rank, r)
        assert gap > 1e3  # the numerical rank is unambiguous: a clear gap below the kept eigenvalues
        checked += 1
    assert checked >= at_least


def test_frozen_layer_has_no_gradient_rows():
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.LeakyReLU(0.2), nn.Linear(6, 1, bias=False))
    free = [r for r in audit(model, (6,)).layers if r.unknowns is not None]
    model[0].weight.requires_grad_(False)
    frozen = [r for r in audit(model, (6,)).layers if r.unknowns is not None]
    assert free[-1].rank_grad == 6 and free[-1].grad_rows == 36
    # without its gradient, the first layer has only the forward rows of z (6 equations, W random: rank 6)
    assert frozen[-1].grad_rows == 0 and frozen[-1].rank_grad == 0 and frozen[-1].rank == 6
    assert frozen[0].rank_grad == free[0].rank_grad  # the layer above is untouched


def test_layer_that_cannot_be_normalised_gives_the_layer_below_no_forward_rows():
    model = nn.Sequential(
        nn.Conv1d(1, 2, 3, bias=False),
        nn.LeakyReLU(0.2),
        nn.Conv1d(2, 2, 3, padding="same", bias=False),  # string padding: not normalised
        nn.Flatten(),
        nn.Linear(16, 1, bias=False),
    )
    rep = audit(model, (1, 10))
    rows = {r.module_path: r for r in rep.layers}
    assert rows["2"].verdict == Verdict.NOT_UNDERSTOOD
    assert rows["0"].chain.value == "none" and rows["0"].fwd_rows == 0
    assert "could not be analysed" in rows["0"].chain_reason


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 8, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear(8 * 6, 3, bias=False)

    def forward(self, t):
        return self.head(self.act(self.fc(self.emb(t))).flatten(1))


def test_embedding_token_set_leaks_and_tokens_are_recovered_through_the_layer_above():
    torch.manual_seed(0)
    rep = audit(_TokenModel(), (6,))
    rows = {r.module_path: r for r in rep.layers}
    emb = rows["emb"]
    # measured on the instance: the rows of dL/dW_emb that are non-zero are exactly the tokens used
    assert emb.verdict == Verdict.LEAKS_EXACTLY
    assert emb.tokens.rows_nonzero == emb.tokens.tokens_used >= 1
    # fc (6 positions x 8 features sharing one gradient) recovers the embedded sequence, hence the tokens
    assert rows["fc"].deficit == 0 and rows["fc"].samples == 6
    assert rep.verdict.status == "recoverable-layerwise"
    # a frozen table shares no gradient: no token-set leak is claimed
    model = _TokenModel()
    model.emb.weight.requires_grad_(False)
    assert {r.module_path: r for r in audit(model, (6,)).layers}["emb"].verdict == Verdict.PASSES
