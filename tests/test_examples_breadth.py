"""The breadth examples: each loads through RGAP_MODELS, traces with every op registered, and audits
to verdicts that are checked against independent computations (dense SVDs, the op structure)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.instance import record
from rgap_audit.layergraph import build_layer_graph
from rgap_audit.losses import choose_loss, loss_value, make_labels
from rgap_audit.ops import LAYER, MERGE, NORM, UNKNOWN, numel
from rgap_audit.options import AuditOptions
from rgap_audit.tracing import trace

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BREADTH = ["resnet_bn.py", "depthwise_cnn.py", "conv1d_net.py", "tiny_transformer.py", "decoder.py"]


def _module(file: str):
    spec = importlib.util.spec_from_file_location(f"rgap_example_{Path(file).stem}", EXAMPLES / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seeded(factory, *args, **kwargs):
    torch.manual_seed(0)
    return factory(*args, **kwargs)


def _analysis():
    import rgap_audit.analysis

    return rgap_audit.analysis


def _rank(a: np.ndarray) -> int:
    """Numerical rank with the usual tolerance, of a matrix whose row blocks were scaled to norm 1."""
    if a.size == 0:
        return 0
    s = np.linalg.svd(a, compute_uv=False)
    return int((s > max(a.shape) * np.finfo(np.float64).eps * s[0]).sum())


def _blocks_rank(*blocks: np.ndarray) -> int:
    scaled = [b / np.linalg.norm(b) for b in blocks if b.size and np.linalg.norm(b) > 0]
    return _rank(np.vstack(scaled)) if scaled else 0


def _instance(model: nn.Module, shape: tuple[int, ...], loss: str | None, seed: int = 0):
    """The walk's instance, rebuilt the way rgap_audit.analysis builds it (same seed, same order)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((1, *shape), generator=gen, dtype=torch.float64)
    lg = build_layer_graph(trace(model, x))
    out_features = numel(lg.node(lg.output_node).out_shape[1:])
    loss = choose_loss(loss, out_features)
    labels = make_labels(loss, 1, out_features, gen)
    rec = record(lg, x, lambda out: loss_value(loss, out, labels))
    return lg, rec.values, rec.grads


# ----------------------------------------------------------------------------- load and trace
@pytest.mark.parametrize("file", BREADTH)
def test_declarations_load_through_the_loader(file):
    from rgap_audit.loader import load_models

    decl = _module(file).RGAP_MODELS
    small = [name for name, d in decl.items() if numel(d["input_shape"]) <= 4096]
    loaded = load_models(str(EXAMPLES / file), small, AuditOptions())
    assert [m.name for m in loaded] == small
    for m in loaded:
        assert m.input_shape == tuple(decl[m.name]["input_shape"]) and m.loss == decl[m.name]["loss"]


TRACE_CASES = {
    "ResNetBN-small": ("resnet_bn.py", "resnet_small", (3, 16, 16)),
    "ResNet18@32": ("resnet_bn.py", "resnet18", (3, 32, 32)),  # the big one's ops, at a small input
    "DepthwiseCNN": ("depthwise_cnn.py", "depthwise_cnn", (3, 16, 16)),
    "Conv1dNet": ("conv1d_net.py", "conv1d_net", (4, 64)),
    "TinyTransformer": ("tiny_transformer.py", "TinyTransformer", (8, 16)),
}


@pytest.mark.parametrize("case", sorted(TRACE_CASES))
def test_every_op_has_a_registry_entry(case):
    file, factory, shape = TRACE_CASES[case]
    model = _seeded(getattr(_module(file), factory))
    gm = trace(model, torch.rand(1, *shape, dtype=torch.float64))
    assert gm.meta["rgap_trace"]["method"] == "torch.fx"
    lg = build_layer_graph(gm)
    unknown = [(n, lg.node(n).info.name) for n in lg.graph.nodes if lg.node(n).info.kind == UNKNOWN]
    assert not unknown
    for n in lg.weighted():  # every weighted layer normalises to a ConvSpec
        lg.conv_spec(n)
    assert nx_is_connected_to_output(lg)


def nx_is_connected_to_output(lg) -> bool:
    """Every data node lies on a path from the input to the output: nothing was dropped from the graph."""
    import networkx as nx

    reach = nx.descendants(lg.graph, lg.input_node) | {lg.input_node}
    back = nx.ancestors(lg.graph, lg.output_node) | {lg.output_node}
    return set(lg.graph.nodes) <= (reach & back)


def test_resnet18_has_the_published_size():
    model = _module("resnet_bn.py").resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


# ----------------------------------------------------------------------------- audits
def test_resnet_reports_merges_batchnorm_and_shared_relus():
    ana = _analysis()
    model = _seeded(_module("resnet_bn.py").resnet_small)
    rep = ana.audit(model, (3, 8, 8), loss="cross-entropy")
    rows = {r.node: r for r in rep.layers}
    merges = [r for r in rep.layers if r.kind == MERGE]
    assert [r.op for r in merges] == ["add", "add"]  # one residual addition per block
    assert all(r.verdict.value == "chain-broken" for r in merges)
    bns = [r for r in rep.layers if r.kind == NORM]
    assert len(bns) == 6 and all(r.op == "BatchNorm" and r.verdict.value == "passes" for r in bns)
    # the block's ReLU module is used twice: two rows, one module path
    relu_paths = [r.module_path for r in rep.layers if r.op == "ReLU" and r.module_path == "layers.0.relu"]
    assert len(relu_paths) == 2
    # the conv feeding a residual add gets no forward constraints, and the report says why
    conv2 = rows["layers_0_conv2"]
    assert conv2.chain.value == "none" and "joins other branches" in conv2.chain_reason
    # the projection shortcut is a weighted layer of its own
    assert rows["layers_1_shortcut_0"].kind == LAYER and rows["layers_1_shortcut_0"].unknowns == 8 * 8 * 8
    # the stem (3->8, k3, s1, p1) at 8x8: per input channel min(8 * 9, 64) = 64 gradient directions
    assert rows["stem_0"].rank_grad == 3 * 64 == rows["stem_0"].unknowns


def test_depthwise_conv_ranks_equal_dense_svd():
    ana = _analysis()
    from rgap_audit.rank import ForwardInfo, dense_system

    mod = _module("depthwise_cnn.py")
    model = _seeded(mod.depthwise_cnn, size=8)
    shape = (3, 8, 8)
    rep = ana.audit(model, shape, loss="logistic")
    lg, values, grads = _instance(model, shape, "logistic")
    rows = {r.node: r for r in rep.layers}
    depthwise = [n for n in lg.weighted() if lg.conv_spec(n).groups > 1]
    assert len(depthwise) == 2
    for n in depthwise:
        spec, rec = lg.conv_spec(n), rows[n]
        assert spec.groups == spec.in_channels == spec.out_channels
        k = grads[n]
        kmat, wmat = dense_system(spec, k, ForwardInfo())
        assert rec.unknowns == spec.n_in and rec.grad_rows == kmat.shape[0]
        assert rec.rank_grad == _rank(kmat)
        # the layer above is recovered and only LeakyReLU (invertible) lies between: F has W's row space
        assert rec.chain.value == "full"
        assert rec.rank == _blocks_rank(kmat, wmat)
        assert rec.deficit == spec.n_in - rec.rank


def test_conv1d_pool_cuts_the_chain_and_the_dilated_rank_is_dense():
    ana = _analysis()
    from rgap_audit.rank import ForwardInfo, dense_system

    model = _seeded(_module("conv1d_net.py").conv1d_net, length=32)
    shape = (4, 32)
    rep = ana.audit(model, shape, loss="logistic")
    rows = {r.node: r for r in rep.layers}
    pool = next(r for r in rep.layers if r.op == "AvgPool")
    assert pool.verdict.value == "chain-broken"
    lg, values, grads = _instance(model, shape, "logistic")
    (dilated,) = [n for n in lg.weighted() if lg.conv_spec(n).ndim == 1 and lg.conv_spec(n).dilation == (2,)]
    rec = rows[dilated]
    assert rec.chain.value == "partial" and rec.deficit > 0
    # independent F: LeakyReLU slope at the instance, then the 2-wide average pool, then flatten
    z0 = values[dilated]
    slope = torch.where(z0 >= 0, 1.0, 0.2).to(torch.float64)

    def jac(t: torch.Tensor) -> torch.Tensor:  # (d, N, 16, 16) -> (d, 128)
        d = t.shape[0]
        return F.avg_pool1d((t * slope).reshape(d, 16, 16), 2).reshape(d, 128)

    spec = lg.conv_spec(dilated)
    kmat, fmat = dense_system(spec, grads[dilated], ForwardInfo(jac=jac))
    assert rec.rank == _blocks_rank(kmat, fmat)


def test_tiny_transformer_audits_every_projection():
    ana = _analysis()
    model = _seeded(_module("tiny_transformer.py").TinyTransformer)
    rep = ana.audit(model, (8, 16), loss="cross-entropy")
    layers = [r for r in rep.layers if r.kind == LAYER]
    assert sorted(r.module_path for r in layers) == sorted(
        ["block.attn.q", "block.attn.k", "block.attn.v", "block.attn.out", "block.mlp.0", "block.mlp.2", "head"]
    )
    assert all(r.samples == 8 for r in layers if r.module_path != "head")
    assert not [r for r in rep.layers if r.verdict.value == "not-understood"]
    assert sorted(r.op for r in rep.layers if r.kind == MERGE) == ["add", "add", "matmul", "matmul"]
    assert all(r.verdict.value == "chain-broken" for r in rep.layers if r.op in ("LayerNorm", "Softmax"))


class _WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        a, _ = self.mha(x, x, x)
        return self.fc(a.mean(dim=1))


def test_multihead_attention_is_decomposed_into_its_projections():
    """nn.MultiheadAttention is analysed through its q/k/v/out projections (rgap_audit.ops.attention):
    no not-understood row, and the three input projections share one joint segment over x."""
    ana = _analysis()
    rep = ana.audit(_seeded(_WithMHA), (4, 8), loss="cross-entropy")
    assert not [r for r in rep.layers if r.verdict.value == "not-understood"]
    paths = sorted(r.module_path for r in rep.layers if r.kind == LAYER)
    assert paths == ["fc", "mha.k", "mha.out_proj", "mha.q", "mha.v"]
    seg = next(r for r in rep.layers if r.kind == "segment")
    assert seg.segment is not None and {"mha_q", "mha_k", "mha_v"} <= set(seg.segment.layers)
