"""The figures (rgap_audit.figures) and the pictures kept in the report (rgap_audit.verify.images).

Oracles: pillow decodes our PNG encoder's output to the pixels given; the matplotlib artists of each
figure, read back, hold the numbers of the report they were drawn from (bar heights = ranks and
deficits, line data = relative errors, titles = the panel's metrics).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from rgap_audit.records import Verification, VerifiedLayer
from rgap_audit.verify.images import MAX_SIDE, encode_png, panel, tile
from rgap_audit.verify.metrics import image_metrics
from rgap_fixtures import deficient_cnn

pytest.importorskip("matplotlib")
from rgap_audit import figures


def _decode(t) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(t.png))) as im:
        return np.asarray(im)


@pytest.mark.parametrize("shape", [(5, 7), (4, 9, 3), (1, 1)])
def test_png_encoder_round_trips_through_pillow(shape):
    px = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(len(shape)))
    with Image.open(io.BytesIO(encode_png(px))) as im:
        assert im.format == "PNG" and im.mode == ("L" if len(shape) == 2 else "RGB")
        np.testing.assert_array_equal(np.asarray(im), px.numpy())


def test_panel_tiles_map_the_stated_ranges():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 6, 5, generator=gen, dtype=torch.float64)
    rec = 2.0 * x - 0.5  # outside the original's range: clipped on it, whole on its own range
    p = panel("plain R-GAP", x, rec, image_metrics(x, rec))
    tiles = {t.kind: t for t in p.tiles}
    orig = _decode(tiles["original"])
    assert orig.shape == (6, 5, 3)
    lo, hi = float(x.min()), float(x.max())
    np.testing.assert_array_equal(orig, np.round((x.permute(1, 2, 0).numpy() - lo) / (hi - lo) * 255))
    resc = _decode(tiles["rescaled"])
    assert resc.min() == 0 and resc.max() == 255 and tiles["rescaled"].lo == pytest.approx(float(rec.min()))
    diff = (rec - x).abs().amax(dim=0).numpy()
    assert tiles["difference"].hi == pytest.approx(diff.max())
    np.testing.assert_array_equal(_decode(tiles["difference"]), np.round(diff / diff.max() * 255))
    big = tile("original", torch.rand(1, 3 * MAX_SIDE, MAX_SIDE + 1, generator=gen), 0.0, 1.0)
    assert max(_decode(big).shape) <= MAX_SIDE  # large inputs are kept block-averaged


def test_reconstruction_figure_titles_say_what_each_tile_is_and_how_good():
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rec = x + 1e-4
    m = image_metrics(x, rec)
    from rgap_audit.records import plain

    fig = figures.reconstruction_figure([plain(panel("plain R-GAP", x, rec, m))], "M: test")
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split("\n")[0] for t in titles] == ["original", "reconstruction", "rescaled reconstruction", "|difference|, largest"]
    (row,) = fig.subfigs
    assert row._suptitle.get_text() == f"plain R-GAP: relative error {m.rel_error:.2g}, PSNR {m.psnr_db:.1f} dB"
    assert f"{1e-4:.2g}" in titles[3]  # the difference's largest value


def test_rank_figure_draws_ranks_and_marks_the_deficit():
    report = deficient_cnn()
    from rgap_audit.records import plain

    model = plain(report)
    fig = figures.rank_figure(model)
    ax = fig.axes[0]
    layers = [r for r in reversed(report.layers) if r.unknowns is not None]
    labels = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
    assert labels == [r.module_path or r.node for r in layers]
    heights = {(round(b.get_x() + b.get_width() / 2), round(b.get_height()), round(b.get_y())) for b in ax.patches}
    for i, r in enumerate(layers):
        assert (i, r.unknowns, 0) in heights and (i, r.rank, 0) in heights
        if r.deficit:
            assert (i, r.deficit, r.unknowns - r.deficit) in heights
    notes = [t.get_text() for t in ax.texts]
    assert notes == [f"deficit {r.deficit}" for r in layers if r.deficit] == ["deficit 280"]


def test_error_figure_puts_the_measured_errors_next_to_the_static_verdict():
    report = deficient_cnn()
    report.verification = Verification(
        attempted=True, confirmed=True, summary="s", tolerance=1e-6,
        layers=[
            VerifiedLayer("head", "head", "Linear", "recoverable", 0, 0, 3e-15, "exact", None, None),
            VerifiedLayer("conv2", "conv2", "Conv2d", "recoverable", 0, 0, 2e-12, "exact", None, None, rel_error_projected=1e-13),
            VerifiedLayer("conv1", "conv1", "Conv2d", "deficient", 280, 280, 0.4, "exact", None, None, rel_error_projected=0.0),
        ],
    )
    from rgap_audit.records import plain

    ax = figures.error_figure(plain(report)).axes[0]
    assert ax.get_yscale() == "log"
    plain_line, proj_line, tol = ax.get_lines()
    np.testing.assert_allclose(plain_line.get_ydata(), [0.4, 2e-12, 3e-15])  # input at the left
    np.testing.assert_allclose(proj_line.get_ydata(), [1e-17, 1e-13])  # an exact 0 is drawn at the floor
    assert set(tol.get_ydata()) == {1e-6}
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == ["conv1\ndeficient\ndeficit 280", "conv2\nrecoverable", "head\nrecoverable"]
    assert ticks[0].get_color() == figures.VERDICT_COLORS["deficient"]
    assert figures.error_figure({"verification": {"layers": []}}) is None


def test_figures_are_pngs():
    from rgap_audit.records import plain

    png = figures.rank_png(plain(deficient_cnn()))
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size[0] >= 600
        assert np.asarray(im.convert("L")).std() > 10
