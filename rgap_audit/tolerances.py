"""Every numerical tolerance of rgap-audit, in one place, and the sentence each report prints about them.

Rank decisions (rank.py, the audit's and the attack's) use the usual rule: a singular value counts when
it exceeds max(rows, cols) * eps * (the block's largest singular value, or the operator's norm for a
reduced block), widened by the error amplification of the null bases it was built from. The attack's
least-squares solves use the looser relative cut-offs below only to regularise pseudo-inverses; the
nullity it reports comes from the rank code. Verification, span and probe thresholds decide what a
measurement means and are printed with it.
"""

from __future__ import annotations

import numpy as np

EPS = float(np.finfo(np.float64).eps)

# ---- rank (rgap_audit.rank)
RANK_RULE = "singular values above max(rows, cols) * eps * sigma_max count (per block; reduced blocks against |F|)"
GRAM_SAFE = 1e-8  # a Gram route proves full rank only when lambda_min / lambda_max > this (sigma ratio > 1e-4)

# ---- the attack's solves (rgap_audit.attack)
G_REL_TOL = 1e-8  # singular values of a gradient block below this (relative) are left to the forward rows
SIGMA_REL_TOL = 1e-6  # reduced problem: singular values below this (relative) are not inverted
ACTIVE_REL_TOL = 1e-9  # a clipped unit (ReLU) counts as active above this fraction of the largest output
SATURATED = 1e-10  # |sigma'(z)| below this: the unit is treated as unknown
PRUNE_FACTOR = 1e3  # head candidates whose layer residual exceeds the best by this factor are dropped

# ---- large layers (rgap_audit.fourier)
CG_TOL = 1e-13  # stop when |F^T r| <= CG_TOL |F^T b| for every right-hand side
PROBE_TOL = 1e-7  # a random probe recovered to this relative error: the forward rows determine x

# ---- measurements (verification, batch span)
EXACT = 1e-6  # B > 1: relative error up to which a sample counts as recovered (float64 recoveries reach ~1e-12)

# ---- what --verify calls recovered (rgap_audit.verify.criterion; B = 1)
CONDITIONING_FACTOR = 100.0  # measured error <= this x the rounding propagated through the measured gains
LEAK_PSNR_DB = 30.0  # a reconstruction is a privacy leak at PSNR >= this (peak 1 on the input mapped to [0, 1]) ...
LEAK_SSIM = 0.9  # ... or at SSIM >= this
VERIFY_SEEDS = 3  # inputs the attack is run on (the audited one, then seeded random ones)
COMBINATION_TOL = 1e-6  # relative residual up to which a reconstruction counts as a combination of the samples
SPAN_RTOL = 1e-10  # singular values of a span sketch above this fraction of the largest count towards its rank
SPAN_IN_TOL = 1e-8  # relative distance to a row space up to which a sample counts as lying in it


def summary() -> dict[str, float | str]:
    """The tolerances a report rests on, by name (the JSON report's `tolerances`)."""
    return {
        "rank_rule": RANK_RULE,
        "gram_safe": GRAM_SAFE,
        "attack_gradient_rel": G_REL_TOL,
        "attack_reduced_rel": SIGMA_REL_TOL,
        "probe": PROBE_TOL,
        "exact_recovery": EXACT,
        "conditioning_factor": CONDITIONING_FACTOR,
        "leak_psnr_db": LEAK_PSNR_DB,
        "leak_ssim": LEAK_SSIM,
        "combination": COMBINATION_TOL,
        "span_rank_rel": SPAN_RTOL,
        "span_distance": SPAN_IN_TOL,
    }
