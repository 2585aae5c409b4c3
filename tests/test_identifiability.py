"""Whole-network identifiability: the Jacobian rank of x -> dL/dtheta against a brute-force dense one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from rgap_audit.identifiability import identifiability
from rgap_audit.losses import choose_loss, loss_value, make_labels

ROOT = Path(__file__).resolve().parent.parent


def brute_force_jacobian(model: nn.Module, input_shape, loss: str | None, batch_size: int = 1, seed: int = 0) -> np.ndarray:
    """d(all parameter gradients)/d(input), with plain autograd (create_graph) and no torch.func."""
    model = model.double().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size, *input_shape), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out_features = model(x).reshape(batch_size, -1).shape[1]
    loss = choose_loss(loss, out_features)
    labels = make_labels(loss, batch_size, out_features, gen)
    params = [p for p in model.parameters() if p.requires_grad]

    def g(xx):
        grads = torch.autograd.grad(loss_value(loss, model(xx), labels), params, create_graph=True)
        return torch.cat([t.reshape(-1) for t in grads])

    jac = torch.autograd.functional.jacobian(g, x)
    return jac.reshape(-1, x.numel()).detach().numpy()


def _seeded(make):
    torch.manual_seed(1234)
    return make()


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))


def frozen_projection():
    """The first layer is frozen (no gradient shared) and maps 8 inputs to 3: the gradient sees x only
    through those 3 numbers, so at most 3 of the 8 input directions can be determined."""
    first = nn.Linear(8, 3, bias=False)
    first.weight.requires_grad_(False)
    return nn.Sequential(first, nn.Tanh(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def pooled_input():
    """Average pooling before the first weighted layer: only the 4 pair means of the 8 inputs reach any gradient."""
    return nn.Sequential(nn.AvgPool1d(2), nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(3 * 3 * 3, 1, bias=False)
    )


CASES = {
    "mlp": (mlp, (6,), "logistic", 1, 6),
    "mlp-batch2": (mlp, (6,), "logistic", 2, None),
    "frozen-projection": (frozen_projection, (8,), "logistic", 1, 3),
    "pooled-input": (pooled_input, (1, 8), "cross-entropy", 1, 4),
    "small-cnn": (small_cnn, (2, 6, 6), "logistic", 1, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["dense-svd", "gram-eigh"])
def test_rank_and_spectrum_match_brute_force(name, method):
    make, shape, loss, batch, expected_rank = CASES[name]
    model = _seeded(make)
    res = identifiability(model, shape, loss, batch_size=batch, method=method)
    jac = brute_force_jacobian(_seeded(make), shape, loss, batch)
    ref_rank = int(np.linalg.matrix_rank(jac))
    n = batch * int(np.prod(shape))
    assert res["unknowns"] == n and res["gradient_entries"] == jac.shape[0]
    assert res["rank"] == ref_rank
    if expected_rank is not None:
        assert ref_rank == expected_rank
    assert res["locally_unique"] == (ref_rank == n) and res["deficit"] == n - ref_rank
    sv = np.linalg.svd(jac, compute_uv=False)
    kept = np.asarray(res["singular_values"][:ref_rank])
    np.testing.assert_allclose(kept, sv[:ref_rank], rtol=1e-6)
    assert res["method"] == method and len(res["singular_values"]) == n


def test_non_identifiable_input_is_reported():
    res = identifiability(_seeded(frozen_projection), (8,), "logistic")
    assert not res["locally_unique"] and res["deficit"] == 5
    assert "5 of 8 input directions undetermined" in res["summary"]
    ok = identifiability(_seeded(mlp), (6,), "logistic")
    assert ok["locally_unique"] and ok["sigma_min_rel"] > 1e-6 and "locally" in ok["summary"]


def test_spectrum_plot_is_a_labelled_png(tmp_path):
    """The plot draws the measured spectrum relative to sigma_max on a log axis, the rank threshold the
    rank was counted with as a horizontal line and the rank as a vertical one (matplotlib artists read back)."""
    pytest.importorskip("matplotlib")
    from rgap_audit.figures import spectrum_figure

    path = tmp_path / "spectrum.png"
    res = identifiability(_seeded(pooled_input), (1, 8), "cross-entropy", plot=str(path))
    assert res["plot"] == str(path)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 600 and img.size[1] >= 400
        assert np.asarray(img.convert("L")).std() > 10  # not a blank canvas
    ax = spectrum_figure({**res, "rank_tol": res["tolerance_rel"]}).axes[0]
    assert ax.get_yscale() == "log" and "index" in ax.get_xlabel() and "σ_max" in ax.get_ylabel()
    sv = np.asarray(res["singular_values"])
    curve, threshold, rank_line = ax.get_lines()
    np.testing.assert_allclose(curve.get_ydata()[: res["rank"]], sv[: res["rank"]] / sv[0])
    assert set(threshold.get_ydata()) == {res["tolerance_rel"]}
    assert set(rank_line.get_xdata()) == {res["rank"]} == {4}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("rank threshold") for t in labels) and "rank 4 of 8" in labels


def test_refuses_large_inputs():
    with pytest.raises(ValueError, match="identifiability is for inputs up to"):
        identifiability(nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 1)), (3, 224, 224), "logistic")


@pytest.mark.skipif(not os.environ.get("RGAP_SLOW_TESTS"), reason="30 s to minutes on 2 cores: set RGAP_SLOW_TESTS=1")
def test_cnn6_d_jacobian_has_full_column_rank():
    """rgap-notes section 3: CNN6-d's layer-wise recursion is deficient but the whole gradient map has
    full column rank 3072 at a random point (smallest relative singular value about 1e-4)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from paper_nets import cnn6_d

    res = identifiability(_seeded(cnn6_d), (3, 32, 32), "logistic")
    assert res["rank"] == 3072 and res["locally_unique"]
    assert 1e-5 < res["sigma_min_rel"] < 1e-2
    print(f"CNN6-d identifiability: {res['seconds']:.1f} s, sigma_min_rel {res['sigma_min_rel']:.2e}")
