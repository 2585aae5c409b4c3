"""--save-images for --defences: the noise curve and the reconstructions at three noise levels, as PNG files."""

from __future__ import annotations

import os

from rgap_audit.errors import AuditError
from rgap_audit.options import LoadedModel
from rgap_audit.records import NoiseDefence, plain
from rgap_audit.verify.images import safe_name, write_figure


def write_noise_figures(directory: str, loaded: LoadedModel, noise: NoiseDefence) -> list[str]:
    """DIR/<stem>.<model>-defences-noise.png (error against sigma) and, for image inputs,
    DIR/<stem>.<model>-defences-reconstructions.png; the first path is kept in `noise.image`."""
    from rgap_audit import figures

    stem = os.path.splitext(os.path.basename(loaded.file or "model"))[0]
    path = os.path.join(directory, f"{safe_name(stem)}.{safe_name(loaded.name)}-defences-noise.png")
    written = []
    try:
        png = figures.noise_png(plain(noise), loaded.name)
    except figures.MissingExtra as exc:
        raise AuditError(f"--save-images: {exc}", model=loaded.name) from exc
    if png is not None:
        try:
            os.makedirs(directory, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(png)
        except OSError as exc:
            raise AuditError(f"--save-images: cannot write {path!r}: {exc.strerror or exc}", model=loaded.name) from exc
        noise.image = path
        written.append(path)
    if noise.panels:
        written.append(write_figure(directory, loaded, "-defences-reconstructions", noise.panels,
                                    f"{loaded.name}: R-GAP at three noise levels"))
    return written
