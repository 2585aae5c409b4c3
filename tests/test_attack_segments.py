"""The closed-form attack through joint segments (residual blocks, projection shortcuts with stride 2,
inverted residuals, concatenated branches): solved at the true input's activation patterns, each
segment's input comes back exactly where ONE dense autograd system over the cut's value has full rank
(tests/oracles.py dense_cut_deficits), and the attack's measured nullity equals that system's deficit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_segments import CASES as SEGMENT_CASES

from oracles import dense_cut_deficits
from rgap_audit.analysis import audit_model
from rgap_audit.attack.engine import attack_graph
from rgap_audit.records import ModelStatus
from rgap_audit.verify import settle, verify


class Inception(nn.Module):
    """Two convolutions of one cut concatenated (an inception-like join), ReLU, pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 3, 1)
        self.b = nn.Conv2d(4, 3, 3, padding=1)
        self.head = nn.Linear(6 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(torch.cat([self.a(h), self.b(h)], dim=1))
        return self.head(nn.functional.avg_pool2d(h, 3).flatten(1))


CASES = {name: SEGMENT_CASES[name] for name in ("resnet-identity", "resnet-projection-stride2", "mobilenetv2-inverted-residual", "bottleneck-deficient")}
CASES["inception-cat"] = (Inception, (3, 6, 6))


def _audited(name: str):
    """The audit of a case and the shared gradient of its instance (autograd, by parameter name)."""
    factory, shape = CASES[name]
    torch.manual_seed(0)
    checked = audit_model(factory(), shape)
    inst = checked.instance
    params = dict(inst.gm.named_parameters())
    loss = torch.nn.functional.cross_entropy(inst.gm(inst.x), inst.labels, reduction="sum")
    return checked, dict(zip(params, torch.autograd.grad(loss, list(params.values())))), shape


def _attack(name: str):
    checked, grads, shape = _audited(name)
    inst = checked.instance
    return checked, attack_graph(inst.graph, inst.env, grads, shape, inst.loss, true_input=inst.x)


@pytest.mark.parametrize("name", list(CASES))
def test_segment_solves_match_the_dense_truth(name):
    checked, rec = _attack(name)
    inst, rep = checked.instance, checked.report
    segs = {r.node: r.segment for r in rep.layers if r.kind == "segment"}
    truth = dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, [s.start for s in segs.values() if s is not None])
    # plain R-GAP keeps a minimum-norm guess at a deficient chain layer; the projected variant carries its
    # undetermined directions down (through segments too): judge the variant that walked past them
    variant = rec.projected if rec.projected is not None else rec
    seg_steps = [s for s in variant.layers if s.op == "segment"]
    assert seg_steps, variant.warnings
    carried = False  # some layer above left directions open: its errors reach this segment's dL/dz too
    for step in seg_steps:
        carried = carried or bool(step.carried_in)
        seg = segs[step.node]
        assert seg is not None and step.pattern == "given"
        assert step.nullity is not None and step.rel_error is not None
        if step.carried_in:
            # directions a deficient chain layer above left open: the attacker's walk can only know less than
            # the whole-network system, never more
            assert step.nullity >= truth[seg.start], (step.node, step.method)
        else:
            assert step.nullity == truth[seg.start], (step.node, step.method)
        if step.nullity == 0 and not carried:
            assert step.rel_error <= 1e-6, (step.node, step.rel_error)
        elif step.nullity:  # min-norm: the undetermined directions of the true value are missing
            assert step.rel_error > 1e-6
    if all(s.nullity == 0 for s in seg_steps) and not any(s.carried_in for s in seg_steps):
        assert variant.complete and variant.rel_error is not None and variant.rel_error <= 1e-6, variant.warnings


def test_given_patterns_confirm_but_never_upgrade_the_verdict():
    """Solved at the true patterns, the attack checks the analysis' assumption: it confirms a
    recoverable-given-pattern verdict but is no demonstration that an attacker finds those patterns."""
    factory, shape = CASES["resnet-identity"]
    torch.manual_seed(0)
    checked = audit_model(factory(), shape)
    assert checked.report.verdict.status == ModelStatus.RECOVERABLE_GIVEN_PATTERN
    result = verify(checked, seeds=1)
    assert result.given_pattern and result.confirmed is True
    settled = settle(checked.report.verdict, result)
    assert settled.status == ModelStatus.RECOVERABLE_GIVEN_PATTERN
    assert "true input's patterns" in result.summary


def test_without_the_truth_the_patterns_are_estimated_and_said_so():
    checked, grads, shape = _audited("resnet-identity")
    inst = checked.instance
    rec = attack_graph(inst.graph, inst.env, grads, shape, inst.loss)
    step = next(s for s in rec.layers if s.op == "segment")
    assert step.pattern == "estimated" and "estimated by" in step.method
    assert not rec.patterns_given()
