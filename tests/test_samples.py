"""`--input sample`: the scenes of rgap_audit.samples are pictures (the sun is yellow, the sky blue, the
grass green at any size), the same picture at every resolution, grey by the BT.601 luminance, and
--verify recovers them.

Oracles: colours at the scene's known places; a 2x block average of the 64x64 picture against the
32x32 one; the luminance computed here from the RGB picture; the attack's error on the sample input.
"""

from __future__ import annotations

import pytest
import torch

from rgap_audit import cli, samples
from rgap_audit.errors import AuditError
from rgap_audit.verify.inputs import load_batch_input, load_input


def _at(img: torch.Tensor, u: float, v: float) -> list[float]:
    """The pixel at scene coordinates (u right, v down)."""
    _, h, w = img.shape
    return img[:, int(v * h), int(u * w)].tolist()


@pytest.mark.parametrize("size", [16, 32, 224])
def test_house_has_its_colours_where_they_belong(size):
    img = samples.render("house", size, size)
    assert img.shape == (3, size, size) and img.dtype == torch.float64 and img.min() >= 0 and img.max() <= 1
    r, g, b = _at(img, 0.82, 0.17)  # the sun
    assert r > 0.9 and g > 0.7 and b < 0.35
    r, g, b = _at(img, 0.05, 0.05)  # sky
    assert b > r + 0.3
    r, g, b = _at(img, 0.05, 0.95)  # grass
    assert g > r + 0.2 and g > b + 0.2
    r, g, b = _at(img, 0.37, 0.40)  # roof
    assert r > 0.6 and g < 0.25
    assert img.std() > 0.15  # a scene, not a flat colour


def test_face_and_resolution_independence():
    face = samples.render("face", 40, 40)
    r, g, b = _at(face, 0.5, 0.45)  # the yellow disc between the eyes
    assert r > 0.9 and g > 0.7 and b < 0.3
    assert max(_at(face, 0.36, 0.38)) < 0.3  # an eye
    small = samples.render("house", 32, 32)
    big = samples.render("house", 64, 64)
    halved = torch.nn.functional.avg_pool2d(big.unsqueeze(0), 2).squeeze(0)
    assert (halved - small).abs().mean() < 0.01 and (halved - small).abs().max() < 0.2  # the same picture
    assert not torch.allclose(samples.render("house", 32, 32), face[:, :32, :32])


def test_grey_is_the_luminance_and_inputs_are_shaped():
    rgb = samples.render("house", 28, 28)
    grey = samples.sample_image("house", (1, 28, 28))
    torch.testing.assert_close(grey[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    assert load_input("sample", (1, 28, 28), "M").shape == (1, 1, 28, 28)
    torch.testing.assert_close(load_input("sample:face", (3, 20, 24), "M")[0], samples.render("face", 20, 24))
    batch = load_batch_input("sample", (3, 16, 16), 3, "M")
    torch.testing.assert_close(batch[2], batch[0].flip(-1))  # the third picture is the first mirrored
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize(
    ("spec", "shape", "batch", "message"),
    [
        ("sample:nope", (3, 8, 8), 1, "no sample picture 'nope' (one of house, face)"),
        ("sample", (64,), 1, "sample images need a (1 or 3, H, W) input, the model takes (64,)"),
        ("sample", (3, 8, 8), 5, "at most 4 different pictures"),
        ("sample:face", (3, 8, 8), 2, "is one picture"),
    ],
)
def test_bad_sample_requests_are_one_line_errors(spec, shape, batch, message):
    with pytest.raises(AuditError, match=message.replace("(", r"\(").replace(")", r"\)")):
        if batch == 1:
            load_input(spec, shape, "M")
        else:
            load_batch_input(spec, shape, batch, "M")


def test_verify_recovers_the_sample_picture(tmp_path, capsys):
    import json

    out = tmp_path / "r.json"
    code = cli.main(["examples/paper_nets.py:FCN3", "--verify", "--input", "sample", "--format", "json", "-o", str(out)])
    assert code == 1, capsys.readouterr().err
    ver = json.loads(out.read_text())["models"][0]["verification"]
    assert ver["input"] == "sample" and ver["confirmed"] is True and ver["rel_error"] < 1e-10
    orig = ver["panels"][0]["tiles"][0]
    grey = samples.sample_image("house", (1, 28, 28))
    assert orig["lo"] == pytest.approx(float(grey.min())) and orig["hi"] == pytest.approx(float(grey.max()))
