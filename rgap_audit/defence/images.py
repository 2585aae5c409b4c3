"""--save-images for --defences: the noise curve and the reconstructions at three noise levels, as PNG files."""

from __future__ import annotations

from rgap_audit.options import LoadedModel
from rgap_audit.records import NoiseDefence, plain
from rgap_audit.verify.images import figure_path, write_figure, write_png


def write_noise_figures(directory: str, loaded: LoadedModel, noise: NoiseDefence) -> list[str]:
    """DIR/<stem>.<model>-defences-noise.png (error against sigma) and, for image inputs,
    DIR/<stem>.<model>-defences-reconstructions.png; the first path is kept in `noise.image`."""
    from rgap_audit import figures

    path = figure_path(directory, loaded, "-defences-noise")
    written = []
    if write_png(directory, path, lambda: figures.noise_png(plain(noise), loaded.name), loaded.name):
        noise.image = path
        written.append(path)
    if noise.panels:
        written.append(write_figure(directory, loaded, "-defences-reconstructions", noise.panels,
                                    f"{loaded.name}: R-GAP at three noise levels"))
    return written
