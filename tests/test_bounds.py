"""Proven rank bounds, and undetermined directions carried down as counts when no basis is known.

The audit is run twice on the same seeded instance: once exactly (every rank computed) and once with
a small exact_rank_limit, so that some layers only get bounds. Every bound must bracket the exact
rank, the carried counts must bracket the exact deficit, and a verdict the bounds prove must agree
with the exact one. The exact ranks themselves are checked against dense SVDs in test_analysis.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from rgap_audit.analysis import audit_loaded
from rgap_audit.options import AuditOptions, LoadedModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from paper_nets import cnn6_d


def _chain(cfg: list[tuple[int, int, int]], side: int, relu: bool = False) -> nn.Sequential:
    """3x3 convolutions (c_in, c_out, stride) with LeakyReLU (or ReLU, whose zeros are known constants),
    bias-free, and a logistic head."""
    layers: list[nn.Module] = []
    for c_in, c_out, s in cfg:
        layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), nn.ReLU() if relu else nn.LeakyReLU(0.2)]
        side = (side + 2 - 3) // s + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cfg[-1][1] * side * side, 1, bias=False))


# 4 -> 2 channels at stride 2 keeps an eighth of the entries: deficient by counting, and the layers
# below inherit what it loses (1x24x24 input)
DEFICIENT_CHAIN = [(1, 4, 2), (4, 4, 1), (4, 2, 2), (2, 2, 1)]
# channels x4 at stride 2: every layer has as many forward rows as unknowns (3x16x16 input)
FULL_CHAIN = [(3, 12, 2), (12, 12, 1), (12, 48, 2)]


def _audits(make, shape: tuple[int, ...], limit: int):
    torch.manual_seed(0)
    model = make()
    loaded = LoadedModel(file="<test>", name="m", module=model, input_shape=shape, loss="logistic")
    return audit_loaded(loaded, AuditOptions()), audit_loaded(loaded, AuditOptions(exact_rank_limit=limit))


CASES = [
    ("deficient-chain", lambda: _chain(DEFICIENT_CHAIN, 24), (1, 24, 24), 20_000),
    ("deficient-chain-wider-limit", lambda: _chain(DEFICIENT_CHAIN, 24), (1, 24, 24), 60_000),
    ("full-chain", lambda: _chain(FULL_CHAIN, 16), (3, 16, 16), 50_000),
    ("cnn6-d", cnn6_d, (3, 32, 32), 500_000),
    # ReLU zeros: a bounded layer's lost directions lie among its unknowns, which caps the rows below it
    ("deficient-relu-chain", lambda: _chain(DEFICIENT_CHAIN, 24, relu=True), (1, 24, 24), 20_000),
]


@pytest.mark.parametrize("name,make,shape,limit", CASES, ids=[c[0] for c in CASES])
def test_bounds_bracket_exact_ranks_and_carried_deficits(name, make, shape, limit):
    exact, bounded = _audits(make, shape, limit)
    pairs = [(e, b) for e, b in zip(exact.layers, bounded.layers) if e.unknowns is not None]
    assert all(e.rank is not None for e, _ in pairs), "the reference audit must be exact"
    n_bounded = sum(b.rank is None for _, b in pairs)
    assert n_bounded > 0, "the limit must force bounds somewhere, else this test checks nothing"
    for e, b in pairs:
        assert e.unknowns == b.unknowns
        assert b.rank_lower <= e.rank <= b.rank_upper, (e.node, e.rank, b.rank_lower, b.rank_upper)
        if b.rank is not None:
            assert b.rank == e.rank
        if b.undetermined is not None:  # a count carried down instead of a basis
            assert b.undetermined.lower <= e.deficit <= b.undetermined.upper, e.node
    # a verdict proven by bounds agrees with the exact one
    if bounded.verdict.basis.value == "bounds" and bounded.verdict.input_recoverable is not None:
        assert bounded.verdict.input_recoverable == bool(exact.verdict.input_recoverable)


def test_deficit_above_is_carried_as_a_count_and_proves_the_input_deficient():
    """With the deficient layer only bounded, its lower bound on lost directions caps the forward rows
    of the layers below; the input layer is then proven deficient, as the exact audit says."""
    exact, bounded = _audits(lambda: _chain(DEFICIENT_CHAIN, 24), (1, 24, 24), 20_000)
    assert exact.verdict.input_recoverable is False
    assert bounded.verdict.status == "deficient" and bounded.verdict.basis.value == "bounds"
    first = [r for r in bounded.layers if r.unknowns is not None][-1]
    assert first.rank_upper < first.unknowns
    assert first.unknowns - first.rank_upper <= exact.verdict.input_deficit
    # without the carried count, the layer below a bounded one was told 'recovered' and got every forward row
    below = [r for r in bounded.layers if r.unknowns is not None and "layer above" in (r.chain_reason or "")]
    assert any("(bounds)" in r.chain_reason for r in below)
    assert all(r.chain.value == "partial" for r in below if "(bounds)" in r.chain_reason)


def test_full_chain_is_not_called_deficient_by_bounds():
    exact, bounded = _audits(lambda: _chain(FULL_CHAIN, 16), (3, 16, 16), 50_000)
    assert exact.verdict.input_recoverable is True
    assert bounded.verdict.input_recoverable is not False


# ----------------------------------------------------------------------------- the forward probe
def _probe_chain(cfg: list[tuple[int, int, int, int]], side: int) -> nn.Sequential:
    """(c_in, c_out, kernel, stride) convs, padding k // 2, LeakyReLU, bias-free, logistic head."""
    layers: list[nn.Module] = []
    for c_in, c_out, k, s in cfg:
        layers += [nn.Conv2d(c_in, c_out, k, stride=s, padding=k // 2, bias=False), nn.LeakyReLU(0.2)]
        side = (side + 2 * (k // 2) - k) // s + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cfg[-1][1] * side * side, 1, bias=False))


def test_forward_probe_settles_layers_too_large_for_an_exact_rank():
    """Tall layers (more forward rows than unknowns) with z fully known: the probe finds full column rank,
    as the exact audit of the same instance does."""
    make = lambda: _probe_chain([(2, 10, 3, 2), (10, 12, 3, 1)], 12)
    exact, bounded = _audits(make, (2, 12, 12), 2_000)
    probed = [b for b in bounded.layers if b.rank_method == "fourier-probe"]
    assert probed, "the small limit must send some layer to the probe"
    for b in probed:
        e = next(r for r in exact.layers if r.node == b.node)
        assert e.rank == e.unknowns == b.rank and b.deficit == 0
        assert b.probe.error <= 1e-7
    assert bounded.verdict.status == exact.verdict.status == "recoverable-layerwise"


def test_forward_probe_does_not_certify_a_rank_deficient_layer():
    """A 1x1 stride-2 conv sees a quarter of its input: more rows than unknowns, yet rank-deficient.
    The probe must fail and the layer must stay bounded (the exact audit: deficient)."""
    make = lambda: _probe_chain([(1, 8, 1, 2)], 8)
    exact, bounded = _audits(make, (1, 8, 8), 200)
    e = next(r for r in exact.layers if r.op == "Conv2d")
    b = next(r for r in bounded.layers if r.op == "Conv2d")
    assert e.deficit > 0
    assert b.rank_method != "fourier-probe" and b.deficit != 0
    assert b.probe.error > 1e-3


def test_probe_memory_estimate_bounds_the_tensors_it_builds_and_the_budget_is_kept():
    from rgap_audit import fourier
    from rgap_audit.convspec import ConvSpec

    for c_in, c_out, s, side in ((2, 10, 2, 12), (6, 8, 1, 9), (3, 16, 3, 14)):
        spec = ConvSpec.from_module(nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), (c_in, side, side))
        pre = fourier.Preconditioner(spec)
        sym = fourier._symbol(spec, pre.grid)
        held = pre.inv.numel() * pre.inv.element_size() + sym.numel() * sym.element_size()
        assert held <= fourier.memory_bytes(spec) <= 6 * held
    # an audit whose memory budget cannot hold the preconditioner keeps the layer bounded, and says why
    make = lambda: _probe_chain([(2, 10, 3, 2), (10, 12, 3, 1)], 12)
    torch.manual_seed(0)
    loaded = LoadedModel(file="<test>", name="m", module=make(), input_shape=(2, 12, 12), loss="logistic")
    tight = audit_loaded(loaded, AuditOptions(exact_rank_limit=2_000, memory_budget_mb=1e-3))
    skipped = [r for r in tight.layers if r.probe is not None and r.probe.skipped]
    assert skipped and all(r.rank_method == "bounds" for r in skipped)



def test_skipped_lower_bound_under_a_bounded_layer_changes_no_bound():
    """Under a layer known only by bounds, layer_rank skips the partial-F Z lower bound (`lost_above`) that
    the lost rows erase anyway: after analysis.bounds.rank_given_uncertain_above both give the same bounds,
    and with fewer directions lost than F Z's columns the lower bound is computed as before."""
    from rgap_audit.analysis.bounds import rank_given_uncertain_above
    from rgap_audit.convspec import ConvSpec
    from rgap_audit.rank import ForwardInfo, layer_rank

    torch.manual_seed(2)
    # 64 -> 1 channels: K's null bases are cheap (one 9 x 100 block per channel) but F Z (100 x 5824)
    # exceeds the limit: the partial lower bound route
    spec = ConvSpec.from_module(nn.Conv2d(64, 1, 3, padding=1, bias=False).double(), (64, 10, 10))
    k = torch.randn(1, *spec.out_shape, dtype=torch.float64)
    fwd = ForwardInfo(rows=spec.n_out)
    limit = 400_000
    full = layer_rank(spec, k, fwd, want_null=False, exact_limit=limit)
    d = spec.n_in - full.rank_grad
    assert full.method == "bounds" and full.rank_lower > full.rank_grad  # the partial F Z added rank
    short = layer_rank(spec, k, fwd, want_null=False, exact_limit=limit, lost_above=d)
    assert short.rank_lower == short.rank_grad == full.rank_grad and short.rank_upper == full.rank_upper
    a = rank_given_uncertain_above(full, (0, d), spec.n_out)
    b = rank_given_uncertain_above(short, (0, d), spec.n_out)
    assert (a.rank, a.rank_lower, a.rank_upper) == (b.rank, b.rank_lower, b.rank_upper)
    kept = layer_rank(spec, k, fwd, want_null=False, exact_limit=limit, lost_above=d - 1)
    assert (kept.rank_lower, kept.rank_upper) == (full.rank_lower, full.rank_upper)
