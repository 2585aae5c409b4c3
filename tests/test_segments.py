"""Joint segments (residual blocks, inverted residuals, concatenated branches, shared inputs): every
segment's rank, and the input layer's below them, against one dense system over the cut's value
built by autograd alone (tests/oracles.py dense_cut_deficits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from examples.mobilenet_cifar import MobileNetV2
from examples.resnet_bn import ResNet
from oracles import dense_cut_deficits
from rgap_audit.analysis import audit_model
from rgap_audit.records import ModelStatus
from rgap_audit.segments import cut_chain, joint_segments


class Bottleneck(nn.Module):
    """A residual block that squeezes to `mid` channels: deficient when mid is small."""

    def __init__(self, c: int = 4, mid: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.down = nn.Conv2d(c, mid, 1, bias=False)
        self.up = nn.Conv2d(mid, c, 3, padding=1, bias=False)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.act(self.stem(x))
        h = self.act(h + self.up(torch.relu(self.down(h))))
        return self.head(h.mean(dim=(2, 3)))


class SharedInput(nn.Module):
    """Two Linear maps of one input multiplied elementwise (gating): a product joins the branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5, bias=False)
        self.b = nn.Linear(6, 5, bias=False)
        self.head = nn.Linear(5, 1, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) * self.b(x))


CASES = {
    "resnet-identity": (lambda: ResNet(widths=(4,), blocks=(1,), num_classes=10, imagenet_stem=False), (3, 6, 6)),
    "resnet-projection-stride2": (lambda: ResNet(widths=(4, 8), blocks=(1, 1), num_classes=10, imagenet_stem=False), (3, 6, 6)),
    "mobilenetv2-inverted-residual": (lambda: MobileNetV2(stages=((2, 4, 2, 1), (2, 8, 1, 2)), stem=4, last=16), (3, 6, 6)),
    "bottleneck-deficient": (lambda: Bottleneck(4, 1), (2, 6, 6)),
    "gated-shared-input": (SharedInput, (6,)),
}


def _audit(name: str):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    return audit_model(factory(), shape)


@pytest.mark.parametrize("name", list(CASES))
def test_segment_and_input_deficits_equal_the_dense_truth(name):
    checked = _audit(name)
    rep, inst = checked.report, checked.instance
    segs = [r for r in rep.layers if r.kind == "segment"]
    assert segs, "the branching part is a joint segment"
    first = next(r for r in reversed(rep.layers) if r.unknowns is not None and r.in_segment is None)
    cuts = [r.segment.start for r in segs if r.segment is not None]
    truth = dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, [*cuts, inst.graph.input_node])
    for r in segs:
        assert r.segment is not None and r.rank is not None, r.reason
        assert r.deficit == truth[r.segment.start], (r.node, r.reason)
        assert r.rank_method == "joint-dense"
    assert first.deficit == truth[inst.graph.input_node]
    # the verdict follows: a determined input is never called deficient
    if truth[inst.graph.input_node] == 0:
        assert rep.verdict.status != ModelStatus.DEFICIENT
        assert rep.verdict.input_recoverable is not False


def test_the_deficient_case_is_deficient_and_says_how_many_directions():
    rep = _audit("bottleneck-deficient").report
    seg = next(r for r in rep.layers if r.kind == "segment")
    assert seg.deficit and seg.deficit > 0
    assert f"{seg.deficit} directions undetermined" in seg.reason


def test_inner_layers_are_marked_and_the_segment_names_them():
    rep = _audit("resnet-projection-stride2").report
    segs = {r.node: r for r in rep.layers if r.kind == "segment"}
    for r in rep.layers:
        if r.in_segment is not None:
            seg = segs[r.in_segment]
            assert seg.segment is not None and r.node in seg.segment.layers
            assert "layer-wise only" in r.reason
    projection = next(s for s in segs.values() if s.segment is not None and len(s.segment.layers) == 3)
    assert any("shortcut" in n for n in projection.segment.layers)  # the 1x1 projection is inside


def test_cuts_are_the_dominators_of_the_output():
    """Every path from the input to the output passes through each cut, and no other node has that property."""
    torch.manual_seed(0)
    checked = _audit("resnet-projection-stride2")
    lg = checked.instance.graph
    import networkx as nx

    cuts = set(cut_chain(lg))
    for n in lg.graph.nodes:
        if n in (lg.input_node, lg.output_node):
            continue
        g = lg.graph.copy()
        g.remove_node(n)
        separates = not nx.has_path(g, lg.input_node, lg.output_node)
        assert separates == (n in cuts), n
    assert len(joint_segments(lg)) == 2


class WideReader(nn.Module):
    """A residual block whose first convolution (4 -> 16 channels on 4x4) has gradient rows of full column
    rank on its own: below a ReLU, whose zeros the segment counts as known."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.conv2(torch.relu(self.conv1(h)))
        return self.head(h.flatten(1))


def test_a_direct_readers_full_rank_decides_a_segment_too_large_to_form():
    """With the joint system over the exact limit, the segment's rank still follows from the layer reading
    the cut: its own full-rank gradient rows, less the columns of the ReLU zeros the segment knows. The
    same rank as the dense joint system of the unrestricted audit and the autograd oracle."""
    from rgap_audit.analysis import audit_loaded
    from rgap_audit.options import AuditOptions, LoadedModel

    torch.manual_seed(0)
    model = WideReader()
    loaded = LoadedModel(file="<test>", name="m", module=model, input_shape=(2, 4, 4), loss="cross-entropy")
    checked = audit_model(model, (2, 4, 4), loss="cross-entropy")
    dense, inst = checked.report, checked.instance
    small = audit_loaded(loaded, AuditOptions(exact_rank_limit=20_000))
    seg_d = next(r for r in dense.layers if r.kind == "segment")
    seg_s = next(r for r in small.layers if r.kind == "segment")
    assert seg_d.rank_method == "joint-dense" and seg_s.rank_method == "joint-subblock", seg_s.reason
    assert seg_s.known_inputs and seg_s.known_inputs > 0  # the dropped columns are counted
    assert seg_s.rank == seg_s.unknowns == seg_d.rank == seg_d.unknowns
    assert seg_d.segment is not None
    assert dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, [seg_d.segment.start])[seg_d.segment.start] == 0


@pytest.mark.parametrize("name", ["resnet-identity", "resnet-projection-stride2", "mobilenetv2-inverted-residual"])
@pytest.mark.parametrize("batch", [2, 3])
def test_batch_segments_from_one_sample_passes_equal_the_dense_truth(name, batch, monkeypatch):
    """At B > 1 a segment's columns come from one-sample passes (it acts on each sample alone): every
    segment deficit equals the dense autograd system over the batch's cut value, and the records equal
    those of the whole-batch pass."""
    import rgap_audit.analysis.joint as joint_mod

    factory, shape = CASES[name]

    def run():
        torch.manual_seed(0)
        return audit_model(factory(), shape, batch_size=batch)

    seen: list[bool] = []
    real = joint_mod._separable
    monkeypatch.setattr(joint_mod, "_separable", lambda *a: seen.append(real(*a)) or seen[-1])
    checked = run()
    assert seen and all(seen), "the one-sample route was taken"
    rep, inst = checked.report, checked.instance
    segs = [r for r in rep.layers if r.kind == "segment" and r.segment is not None]
    truth = dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, [r.segment.start for r in segs])
    for r in segs:
        assert r.rank_method == "joint-dense" and r.deficit == truth[r.segment.start], (r.node, r.reason)
    monkeypatch.setattr(joint_mod, "_separable", lambda *a: False)
    whole = run().report
    assert [(r.node, r.rank, r.deficit, r.rank_lower, r.rank_upper) for r in rep.layers] == [
        (r.node, r.rank, r.deficit, r.rank_lower, r.rank_upper) for r in whole.layers
    ]
