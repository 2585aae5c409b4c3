"""Property tests on random small chain architectures drawn from the supported layers.

For every drawn network: the audit does not crash; its per-layer deficits equal the independent
dense whole-chain computation of test_analysis; and wherever the static analysis says the input
is recoverable layer by layer, the closed-form attack recovers it from the gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracles import dense_chain_deficits
from rgap_audit.analysis import audit
from rgap_audit.attack import reconstruct
from rgap_audit.losses import loss_value, make_labels

ACTS = {
    "leaky": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "identity": nn.Identity,
}


def _batchnorm(channels: int, seed: int) -> nn.BatchNorm2d:
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn


@st.composite
def models(draw):
    """A Conv2d stack (each conv optionally followed by an eval BatchNorm), a Flatten and one or two
    Linear layers, bias-free, on a small image."""
    c, h = draw(st.integers(1, 2)), draw(st.integers(4, 7))
    shape = (c, h, h)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 2))):
        out, k, s = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        p = draw(st.integers(0, k - 1))
        if h + 2 * p < k:
            p = k
        layers.append(nn.Conv2d(c, out, k, stride=s, padding=p, bias=False))
        if draw(st.booleans()):  # eval-mode BatchNorm: a per-channel affine map with its own gamma gradient
            layers.append(_batchnorm(out, draw(st.integers(0, 1000))))
        layers.append(ACTS[draw(st.sampled_from(sorted(ACTS)))]())
        c, h = out, (h + 2 * p - k) // s + 1
    layers.append(nn.Flatten())
    width = c * h * h
    if draw(st.booleans()):
        hidden = draw(st.integers(2, 8))
        layers += [nn.Linear(width, hidden, bias=False), ACTS[draw(st.sampled_from(sorted(ACTS)))]()]
        width = hidden
    classes = draw(st.sampled_from([1, 3]))
    layers.append(nn.Linear(width, classes, bias=False))
    torch.manual_seed(draw(st.integers(0, 1000)))
    return nn.Sequential(*layers).double().eval(), shape, ("logistic" if classes == 1 else "cross-entropy")


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@SETTINGS
@given(models())
def test_walk_matches_dense_chain_on_random_chains(drawn):
    model, shape, loss = drawn
    rep = audit(model, shape, loss=loss)
    got = [r.deficit for r in reversed([r for r in rep.layers if r.unknowns is not None])]
    assert got == dense_chain_deficits(model, shape, loss)


@SETTINGS
@given(models())
def test_recoverable_verdict_is_confirmed_by_the_attack(drawn):
    model, shape, loss = drawn
    rep = audit(model, shape, loss=loss, seed=1)
    # the audited instance itself: the walk's seeded input and label (same draws, same order)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((1, *shape), generator=gen, dtype=torch.float64)
    out_features = model(x).shape[1]
    labels = make_labels(loss, 1, out_features, gen)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss_value(loss, model(x), labels), list(model.parameters()))
    if rep.verdict.status != "recoverable-layerwise":
        return
    rec = reconstruct(model, dict(zip(names, grads)), shape, loss, true_input=x)
    best = rec.best()
    assert best.input is not None
    # a logistic head whose margin has two roots leaves the attacker two candidates with identical
    # gradients (a positively homogeneous net maps x and c*x to the same gradient): one must be x
    candidates = [best.input, *best.alternatives, *rec.alternatives]
    err = min(float((c.reshape(x.shape) - x).norm() / x.norm()) for c in candidates)
    assert err < 1e-5, (err, rec.warnings)
