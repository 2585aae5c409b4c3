"""Attention: torch's fused modules decomposed into explicit ops compute what the originals compute,
transformer models audit without an internal error, and their joint segments match the dense truth."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracles import dense_cut_deficits
from rgap_audit.analysis import audit, audit_model
from rgap_audit.ops.attention import decompose, math_attention, sdpa_math
from rgap_audit.records import Verdict


class Wrap(nn.Module):
    """A parent for one module (decompose replaces children)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, *args, **kwargs):
        return self.m(*args, **kwargs)


def _same(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> None:
    model = Wrap(model).double().eval()
    ref = model(*inputs, **kwargs)
    twin = copy.deepcopy(model)
    notes = decompose(twin)
    assert notes and all("decomposed" in n for n in notes)
    got = twin(*inputs, **kwargs)
    ref_t = ref[0] if isinstance(ref, tuple) else ref
    got_t = got[0] if isinstance(got, tuple) else got
    assert torch.allclose(ref_t, got_t, atol=1e-12, rtol=1e-10)
    if isinstance(ref, tuple) and ref[1] is not None:
        assert torch.allclose(ref[1], got[1], atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_decomposition_matches_torch(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
    q = torch.randn(3, 5, 8, dtype=torch.float64)
    kv = torch.randn(3, 7, kdim or 8, dtype=torch.float64)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    _same(mha, q, kv, kv)
    _same(mha, q, kv, kv, attn_mask=torch.randn(5, 7, dtype=torch.float64))
    _same(mha, q, kv, kv, key_padding_mask=torch.tensor([[False] * 6 + [True]] * 3))
    _same(mha, q, kv, kv, average_attn_weights=False)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_and_encoder_decomposition_match_torch(norm_first, activation):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    _same(layer, x)
    enc = nn.TransformerEncoder(copy.deepcopy(layer), 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    _same(enc, x)


def test_sdpa_math_matches_the_fused_kernel_and_traces_as_explicit_ops():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(5, 5, dtype=torch.float64)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}, {"scale": 0.3}):
        assert torch.allclose(F.scaled_dot_product_attention(q, k, v, **kwargs), sdpa_math(q, k, v, **kwargs), atol=1e-12)

    class M(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    with math_attention():
        gm = torch.fx.symbolic_trace(M())
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert F.scaled_dot_product_attention not in targets and torch.softmax in targets
    assert F.scaled_dot_product_attention is not sdpa_math  # restored


class Encoder(nn.Module):
    """Two standard PyTorch encoder layers on float tokens, mean pooling, a Linear head."""

    def __init__(self, d: int = 8, tokens: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(dim=1))


class SDPABlock(nn.Module):
    """A fused qkv projection, F.scaled_dot_product_attention and a residual, as research code writes it."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head((x + self.out(y)).mean(dim=1))


@pytest.mark.parametrize("factory", [Encoder, SDPABlock])
def test_transformer_models_audit_and_their_segments_match_the_dense_truth(factory):
    torch.manual_seed(0)
    checked = audit_model(factory(), (4, 8))
    rep, inst = checked.report, checked.instance
    assert not [r for r in rep.layers if r.verdict == Verdict.NOT_UNDERSTOOD], [r.reason for r in rep.layers if r.verdict == Verdict.NOT_UNDERSTOOD]
    segs = [r for r in rep.layers if r.kind == "segment"]
    assert segs
    truth = dense_cut_deficits(inst.gm, inst.x, inst.labels, inst.loss, [r.segment.start for r in segs if r.segment])
    for r in segs:
        assert r.segment is not None and r.deficit == truth[r.segment.start], r.node
    # q/k/v read one input: they sit in one segment, their rows stacked on it
    qkv = [r for r in segs if r.segment and sum(1 for n in r.segment.layers if n.endswith(("_q", "_k", "_v"))) == 3]
    assert qkv or factory is SDPABlock
    assert rep.verdict.status.value != "deficient" or rep.verdict.input_deficit


def test_an_uncovered_attention_stays_not_understood_with_the_reason():
    class KV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0].mean(dim=1))

    rep = audit(KV(), (4, 8))
    row = next(r for r in rep.layers if r.op == "MultiheadAttention")
    assert row.verdict == Verdict.NOT_UNDERSTOOD and "add_bias_kv" in row.reason
    assert rep.verdict.input_recoverable is not False
