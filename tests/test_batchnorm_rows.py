"""BatchNorm's own gradient rows (dL/dgamma) against an independent dense computation.

The audit claims that when a BatchNorm is fed by a weighted layer through elementwise ops, the
gamma-gradient rows add no rank to that layer's gradient rows. Here both blocks are built densely
with autograd on a small model (K: Jacobian of x -> dL/dW of the conv; G: Jacobian of
x -> dL/dgamma, with dL/d(output) held fixed and the activation pattern of the instance) and the
claim is checked with SVD ranks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rgap_audit.analysis import audit


def _model(act: nn.Module | None) -> nn.Sequential:
    torch.manual_seed(3)
    parts: list[nn.Module] = [nn.Conv2d(2, 4, 3, padding=1, bias=False)]
    if act is not None:
        parts.append(act)
    bn = nn.BatchNorm2d(4)
    parts += [bn, nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 6 * 6, 1, bias=False)]
    m = nn.Sequential(*parts).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return m


def _rank(a: torch.Tensor) -> int:
    s = torch.linalg.svdvals(a)
    return int((s > s[0] * 1e-10).sum())


def _dense_blocks(m: nn.Sequential, x: torch.Tensor):
    """K (dL/dW_conv as a linear map of x) and G (dL/dgamma as a map of x), both with the instance's
    dL/dz, dL/dy and activation pattern held fixed."""
    conv, bn = m[0], next(mod for mod in m if isinstance(mod, nn.BatchNorm2d))
    i_bn = list(m).index(bn)
    pre = nn.Sequential(*list(m)[:i_bn])  # conv (+ activation): the BatchNorm input a
    y_label = torch.tensor([1.0], dtype=torch.float64)
    acts = {}
    h1 = bn.register_forward_hook(lambda mod, inp, out: acts.__setitem__("y", out))
    h2 = conv.register_forward_hook(lambda mod, inp, out: acts.__setitem__("z", out))
    loss = nn.functional.softplus(-y_label * m(x.clone().requires_grad_(True)).reshape(-1)).sum()
    h1.remove(), h2.remove()
    k_y, k_z = torch.autograd.grad(loss, [acts["y"], acts["z"]])
    sigma = torch.sqrt(bn.running_var + bn.eps).reshape(1, -1, 1, 1)
    mask = None if len(pre) == 1 else (pre(x) != 0).to(x.dtype)  # the ReLU pattern of the instance

    def weight_grad(v):  # linear in v: d/dW <k_z, conv(v; W)>
        w = conv.weight.detach().clone().requires_grad_(True)
        z = nn.functional.conv2d(v, w, padding=1)
        (g,) = torch.autograd.grad((k_z * z).sum(), w, create_graph=True)
        return g.reshape(-1)

    def gamma_grad(v):  # sum_p k_y (a - mu) / sigma per channel, a = conv(v) (times the ReLU pattern)
        a = nn.functional.conv2d(v, conv.weight.detach(), padding=1)
        if mask is not None:
            a = a * mask
        return (k_y * (a - bn.running_mean.reshape(1, -1, 1, 1)) / sigma).sum(dim=(0, 2, 3))

    K = torch.autograd.functional.jacobian(weight_grad, x).reshape(-1, x.numel())
    G = torch.autograd.functional.jacobian(gamma_grad, x).reshape(-1, x.numel())
    return K, G


def test_gamma_rows_add_no_rank_to_the_conv_gradient_rows_dense():
    for act in (None, nn.ReLU()):
        m = _model(act)
        x = torch.rand(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        K, G = _dense_blocks(m, x)
        assert _rank(G) >= 3  # the gamma rows are there (negative control: not zero; a ReLU may kill a channel)
        assert _rank(torch.cat([K, G])) == _rank(K)
        # ... and the audit says so, having measured the same thing its own way
        rep = audit(m, (2, 6, 6))
        bn = next(r for r in rep.layers if r.op == "BatchNorm")
        assert bn.param_rows.rows == 4 and bn.param_rows.redundant is True
        assert "add no rank" in bn.reason


def test_gamma_rows_of_a_batchnorm_over_a_frozen_layer_are_reported_as_unused():
    m = _model(None)
    m[0].weight.requires_grad_(False)
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _K, G = _dense_blocks(m, x)
    assert _rank(G) == 4  # with no conv gradient shared, these rows are real extra constraints
    rep = audit(m, (2, 6, 6))
    bn = next(r for r in rep.layers if r.op == "BatchNorm")
    assert bn.param_rows.redundant is False
    assert "does not use" in bn.reason
    assert any("gamma-gradient rows not used" in w for w in rep.warnings)


def test_frozen_gamma_gives_no_rows():
    m = _model(None)
    next(mod for mod in m if isinstance(mod, nn.BatchNorm2d)).weight.requires_grad_(False)
    rep = audit(m, (2, 6, 6))
    bn = next(r for r in rep.layers if r.op == "BatchNorm")
    assert bn.param_rows is None
