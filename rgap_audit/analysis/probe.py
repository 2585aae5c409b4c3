"""The forward probe: a layer too large for an exact rank whose output is fully known through invertible
ops gets rank = unknowns when a random probe v comes back from W v (rgap_audit.fourier)."""

from __future__ import annotations

from dataclasses import replace

import torch

from rgap_audit import fourier
from rgap_audit.convspec import ConvSpec
from rgap_audit.rank import LayerRank
from rgap_audit.records import Probe
from rgap_audit.tolerances import PROBE_TOL


def forward_probe(spec: ConvSpec, res: LayerRank, memory_budget_mb: float, seed: int) -> tuple[LayerRank | None, Probe | None]:
    """When the forward rows alone determine x, rank [K; F] = unknowns. Tested numerically, as the
    rank is elsewhere: a random probe v is solved back from W v by Fourier-preconditioned CGLS; if W
    had a null direction, a generic v would not come back (the attack's --verify solves the
    instance's own z with the same solver). Known input entries only remove columns, which keeps
    full column rank. Returns (the settled rank or None, what the probe measured or None)."""
    if getattr(spec, "transposed", False) or not fourier.eligible(spec) or spec.n_out < spec.n_in:
        return None, None
    need = fourier.memory_bytes(spec)
    if need > memory_budget_mb * 2**20 / 2:  # stay within half the audit's memory budget
        return None, Probe(skipped=f"the probe's preconditioner needs about {need / 2**30:.1f} GiB")
    out = fourier.solve(spec, None, tuple(spec.in_shape), seed=seed)  # the probe alone
    probe = Probe(error=out.probe_error, iterations=out.iterations)
    if not (out.converged and out.probe_error <= PROBE_TOL):
        return None, probe
    settled = replace(
        res,
        rank=res.unknowns,
        rank_lower=res.unknowns,
        rank_upper=res.unknowns,
        deficit=0,
        method="fourier-probe",
        null_basis=torch.zeros(spec.n_in, 0, dtype=torch.float64),
    )
    return settled, probe
