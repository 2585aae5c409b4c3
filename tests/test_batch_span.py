"""B > 1: the first Linear's weight gradient holds the span of the batch (RGAP404).

dL/dW = sum_n k_n x_n^T has rank at most min(B, out) (less when two samples share an activation
pattern above, which makes their k_n parallel), and its rows span the samples exactly when that
rank is B. When out < B the row space is a proper subspace of the span and
the samples are far from it: the rule must not fire (negative control).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rgap_audit.analysis import audit
from rgap_audit.rules import evaluate, load_rules


def _mlp(out: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, out, bias=False), nn.LeakyReLU(0.2), nn.Linear(out, 1, bias=False))


def _codes(report) -> set[str]:
    return {f.code for f in evaluate([report], load_rules())}


def test_span_of_the_batch_is_measured_and_flagged():
    for batch, out in ((2, 8), (3, 8), (4, 16)):
        rep = audit(_mlp(out), (3, 4), batch_size=batch)
        first = [r for r in rep.layers if r.op == "Linear"][-1]  # the walk runs from the output down
        assert first.span.rank == min(batch, out) == batch
        assert first.span.distance <= 1e-12
        assert "RGAP404" in _codes(rep)
        assert any("subspace that holds every sample" in c for c in rep.verdict.caveats)


def test_fewer_outputs_than_samples_do_not_hold_the_span():
    rep = audit(_mlp(2), (3, 4), batch_size=4)
    first = next(r for r in rep.layers if r.op == "Linear" and r.unknowns == 4 * 12)
    assert first.span.rank == 2
    assert first.span.distance > 0.1  # a random sample is far from a 2-d subspace of R^12
    assert "RGAP404" not in _codes(rep)
    assert not any("subspace that holds every sample" in c for c in rep.verdict.caveats)


def test_single_sample_and_conv_first_layers_are_not_measured():
    rep = audit(_mlp(8), (3, 4), batch_size=1)
    assert all(r.span is None for r in rep.layers)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(2 * 2 * 2, 1, bias=False))
    rep = audit(conv, (1, 4, 4), batch_size=2)
    assert all(r.span is None for r in rep.layers)
