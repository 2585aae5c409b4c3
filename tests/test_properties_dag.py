"""Property tests on random small graphs that are not chains: branches joined by add or cat, eval
BatchNorm, pooling, transposed convolutions, and an op the registry does not know.

For every drawn model the audit must not crash, must keep its invariants (rank within
[rank K, unknowns], deficit = unknowns - rank, bounds ordered), and must never call the input
'not recoverable' when it met an op it does not understand.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rgap_audit.analysis import audit
from rgap_audit.records import Verdict


class Odd(nn.Module):
    """An op with no registry entry: the audit must report it as not understood."""

    def forward(self, x):
        return torch.fft.fft(x).real


class Block(nn.Module):
    """Two conv branches of one input, joined by add or cat, optionally through BatchNorm / an odd op."""

    def __init__(self, c: int, join: str, bn: bool, odd: bool, act: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c).eval() if bn else nn.Identity()
        self.odd = Odd() if odd else nn.Identity()
        self.join = join
        self.act = nn.LeakyReLU(0.2) if act == "leaky" else nn.ReLU()

    def forward(self, x):
        a = self.act(self.bn(self.a(x)))
        b = self.odd(self.b(x))
        return torch.cat([a, b], dim=1) if self.join == "cat" else a + b


@st.composite
def dags(draw):
    c, side = draw(st.integers(1, 3)), draw(st.integers(4, 6))
    in_side = side
    layers: list[nn.Module] = [nn.Conv2d(1, c, 3, padding=1, bias=False), nn.LeakyReLU(0.2)]
    odd_seen = False
    for _ in range(draw(st.integers(1, 2))):
        join = draw(st.sampled_from(["add", "cat"]))
        odd = draw(st.booleans()) and draw(st.booleans())
        odd_seen |= odd
        layers.append(Block(c, join, draw(st.booleans()), odd, draw(st.sampled_from(["leaky", "relu"]))))
        c = 2 * c if join == "cat" else c
    tail = draw(st.sampled_from(["none", "avgpool", "maxpool", "convT"]))
    if tail == "avgpool":
        layers.append(nn.AvgPool2d(2))
        side //= 2
    elif tail == "maxpool":
        layers.append(nn.MaxPool2d(2))
        side //= 2
    elif tail == "convT":
        layers += [nn.ConvTranspose2d(c, 2, 3, stride=2, padding=1, output_padding=1, bias=False), nn.LeakyReLU(0.2)]
        c, side = 2, side * 2
    classes = draw(st.sampled_from([1, 3]))
    layers += [nn.Flatten(), nn.Linear(c * side * side, classes, bias=draw(st.booleans()))]
    torch.manual_seed(draw(st.integers(0, 1000)))
    model = nn.Sequential(*layers).double().eval()
    return model, (1, in_side, in_side), odd_seen


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(dags(), st.sampled_from([1, 2]))
def test_random_dags_never_crash_and_keep_the_invariants(drawn, batch):
    model, shape, odd = drawn
    rep = audit(model, shape, batch_size=batch)
    for r in rep.layers:
        if r.unknowns is None:
            continue
        if r.rank is not None:
            assert r.deficit == r.unknowns - r.rank
            assert (r.rank_grad or 0) <= r.rank <= r.unknowns
        else:
            assert r.rank_lower <= r.rank_upper <= r.unknowns
    not_understood = [r for r in rep.layers if r.verdict == Verdict.NOT_UNDERSTOOD]
    assert bool(not_understood) == odd
    if not_understood:
        assert rep.verdict.input_recoverable is not False  # never counted as safe
        assert rep.verdict.status == "unknown" or rep.verdict.input_recoverable is True


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(dags())
def test_random_dags_segment_and_input_deficits_equal_the_dense_truth(drawn):
    """Every joint segment's deficit, and the deficit at the model input, equal those of one dense
    system over that cut's value built by autograd alone (tests/oracles.py)."""
    from oracles import dense_cut_deficits
    from rgap_audit.analysis import audit_model

    model, shape, odd = drawn
    if odd:  # not understood: no rank to compare
        return
    checked = audit_model(model, shape)
    rep, inst = checked.report, checked.instance
    segs = [r for r in rep.layers if r.kind == "segment"]
    first = next(r for r in reversed(rep.layers) if r.unknowns is not None and r.in_segment is None)
    cuts = [r.segment.start for r in segs if r.segment is not None and r.deficit is not None]
    truth = dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, [*cuts, inst.graph.input_node])
    for r in segs:
        if r.deficit is not None and r.segment is not None:
            assert r.deficit == truth[r.segment.start], r.node
    if first.deficit is not None:
        assert first.deficit == truth[inst.graph.input_node]
