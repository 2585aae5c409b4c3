"""B > 1: the first layer's weight gradient holds the span of the batch (RGAP404).

dL/dW = sum_n k_n x_n^T has rank at most min(B, out) (less when two samples share an activation
pattern above, which makes their k_n parallel), and its rows span the samples exactly when that
rank is B. When out < B the row space is a proper subspace of the span and
the samples are far from it: the rule must not fire (negative control).

A convolution's dL/dW, flattened to C_out x (C_in k), is sum_n sum_p k_n[:, p] patch_n(p)^T: checked
against patches cut from the padded input by explicit slicing and the gradient summed from them with
numpy (not F.unfold or convolution_backward, which the audit uses).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from rgap_audit.analysis import audit, audit_model
from rgap_audit.rules import evaluate, load_rules
from rgap_audit.sweep import batch_point


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


def test_single_sample_is_not_measured():
    rep = audit(_mlp(8), (3, 4), batch_size=1)
    assert all(r.span is None for r in rep.layers)


def _explicit(x: np.ndarray, k: np.ndarray, kernel: int, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches (B, P, C k k) sliced from the zero-padded input (B, C, H, W), and dL/dW = sum_n sum_p
    k_n[:, p] patch_n(p)^T from them (k: (B, C_out, H_out, W_out))."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    b, _c, ho, wo = x.shape[0], x.shape[1], k.shape[2], k.shape[3]
    patches = np.stack(
        [np.stack([xp[n, :, i * stride : i * stride + kernel, j * stride : j * stride + kernel].reshape(-1) for i in range(ho) for j in range(wo)]) for n in range(b)]
    )
    grad = np.einsum("nfp,npd->fd", k.reshape(b, k.shape[1], -1), patches)
    return patches, grad


def _conv_net(c_in: int, c_out: int, kernel: int, stride: int, pad: int, side: int) -> nn.Sequential:
    torch.manual_seed(0)
    out = (side + 2 * pad - kernel) // stride + 1
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, pad, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(c_out * out * out, 1, bias=False)
    )


@pytest.mark.parametrize(
    "geometry, batch, leak",
    [
        ((3, 16, 4, 4, 0, 8), 2, True),  # a patch-embedding stem: 4 patches a sample, 8 <= 16 outputs, of 48 dimensions
        ((3, 16, 4, 4, 0, 8), 3, True),
        ((3, 16, 4, 4, 0, 8), 8, False),  # 32 patches > 16 output channels: a 16-d row space misses them
        ((3, 12, 4, 2, 2, 8), 2, False),  # CNN6's stem geometry: 50 patches > 12 outputs, in a 48-d patch space
        ((1, 8, 2, 1, 0, 5), 2, False),  # the row space is the whole 4-d patch space: holds every patch, reveals nothing
    ],
)
def test_conv_patch_span_against_explicit_patches(geometry, batch: int, leak: bool):
    c_in, c_out, kernel, stride, pad, side = geometry
    au = audit_model(_conv_net(c_in, c_out, kernel, stride, pad, side), (c_in, side, side), batch_size=batch)
    rec = next(r for r in au.report.layers if r.op == "Conv2d")
    x = au.instance.values[au.instance.graph.input_node].detach().numpy()
    k = au.instance.grads[rec.node].detach().numpy()
    patches, grad = _explicit(x, k, kernel, stride, pad)
    sv = np.linalg.svd(grad, compute_uv=False)
    rank = int((sv > 1e-10 * sv[0]).sum())
    basis = np.linalg.svd(grad)[2][:rank].T
    flat = patches.reshape(-1, patches.shape[-1])
    flat = flat[np.linalg.norm(flat, axis=1) > 0]
    dist = np.linalg.norm(flat - flat @ basis @ basis.T, axis=1) / np.linalg.norm(flat, axis=1)
    span = rec.span
    assert span is not None and span.vectors == "input patch"
    assert span.rank == rank and span.dims == c_in * kernel * kernel and span.count == flat.shape[0]
    assert span.distance == pytest.approx(float(dist.max()), rel=1e-2, abs=1e-12)
    assert span.leak is leak
    assert ("RGAP404" in _codes(au.report)) is leak
    assert any("input patches" in c for c in au.report.verdict.caveats) is leak
    text = batch_point(au.report, 0.0).summed
    assert ("the span of the batch's patches leaks" in text) is leak
    if rank == span.dims:
        assert "whole patch space" in text


def test_conv1d_patch_embedding_leaks_its_patches():
    """A 1-D patch embedding (kernel = stride = 5 over 10 steps): 2 patches a sample, 4 in a batch of 2,
    held by a 4-dimensional row space of a 10-dimensional patch space."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv1d(2, 8, 5, 5, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(16, 1, bias=False))
    rep = audit(net, (2, 10), batch_size=2)
    rec = next(r for r in rep.layers if r.op == "Conv1d")
    assert rec.span.rank == 4 and rec.span.dims == 10 and rec.span.count == 4
    assert rec.span.leak and rec.span.distance <= 1e-8
    assert "RGAP404" in _codes(rep)


def test_grouped_conv_is_not_measured():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 2, 2, groups=2, bias=False), nn.Flatten(), nn.Linear(16, 1, bias=False))
    rep = audit(net, (2, 4, 4), batch_size=2)
    assert all(r.span is None for r in rep.layers)
    assert "no span measured" in batch_point(rep, 0.0).summed
