"""The short --defences block of the table format: one line per defence measured, then the per-layer noise gains."""

from __future__ import annotations

from rgap_audit.records import Defences


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2g}"


def defence_lines(d: Defences) -> list[str]:
    """What stops the closed-form attack, as measured (indented for the table's model block)."""
    lines = ["  defences (measured; the closed-form attack only: optimisation attacks degrade more gracefully):"]
    if d.noise is not None:
        n = d.noise
        lines.append(f"    noise: {n.summary}")
        lines.append("      sigma      median error  predicted   (draws)")
        for p in n.points:
            draws = ", ".join(_g(e) for e in p.rel_errors)
            lines.append(f"      {p.sigma:<10.2g} {_g(p.median_rel_error):<13} {_g(p.predicted_rel_error):<11} ({draws})")
        amp = [g for g in n.layers if g.amplification is not None]
        if amp:
            lines.append("      per layer: " + "; ".join(
                f"{g.module_path or g.node}: 1/sigma_min {_g(g.solve_gain)}, input error per sigma {_g(g.input_error_per_sigma)}"
                f" ({_g(100 * (g.share or 0))} %)" for g in amp))
        if n.image:
            lines.append(f"      figure: {n.image}")
    if d.compression is not None:
        c = d.compression
        lines.append(f"    compression: {c.summary}")
        lines.append("      " + "; ".join(
            f"{'top-k ' + format(100 * p.keep_fraction, 'g') + ' %' if p.keep_fraction is not None else p.method}: {_g(p.rel_error)}"
            for p in c.points))
    if d.batch is not None:
        lines.append(f"    batch size: {d.batch.summary}")
    if d.architecture is not None:
        a = d.architecture
        lines.append(f"    architecture: {a.summary}")
        for e in a.edits:
            lines.append(f"      {e.text}: {e.status.value}, input deficit {e.input_deficit}, {e.params_lost} parameters and {e.macs_lost} "
                         f"multiply-adds lost ({e.params_lost_layer_pct:.0f} % of the layer)")
    lines.extend(f"    skipped: {s}" for s in d.skipped)
    return lines
