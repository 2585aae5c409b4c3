"""The privacy cost of a noise multiplier, from a maintained accountant (Opacus' RDP accountant), never by hand.

Opacus is an optional extra (`pip install 'rgap-audit[dp]'`); without it the cost is reported as not computed,
with the reason, and the rest of --defences still runs.
"""

from __future__ import annotations

import math
import warnings

from rgap_audit.records import PrivacyCost

DELTA = 1e-5
ROUNDS = 100
SAMPLE_RATE = 0.01
MISSING = "not computed: the accountant needs opacus (pip install 'rgap-audit[dp]')"


def _rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float | None:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history.append((sigma, sample_rate, steps))
    with warnings.catch_warnings():  # the optimal RDP order at the edge of Opacus' grid, overflow in its log terms
        warnings.simplefilter("ignore")
        eps = float(acc.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else None


def privacy_cost(sigma: float, *, delta: float = DELTA, rounds: int = ROUNDS, sample_rate: float = SAMPLE_RATE) -> PrivacyCost:
    """epsilon at delta of the Gaussian mechanism with noise multiplier sigma: one release, and `rounds` rounds of
    Poisson sampling at `sample_rate` (Opacus' RDPAccountant; DP-SGD's accounting with sensitivity the clip norm)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not 0 < sample_rate <= 1 or rounds < 1 or not 0 < delta < 1:
        raise ValueError(f"need 0 < sample_rate <= 1, rounds >= 1, 0 < delta < 1; got {sample_rate}, {rounds}, {delta}")
    try:
        import opacus
    except ImportError:
        return PrivacyCost(sigma, delta, None, rounds, sample_rate, None, "none", MISSING)
    name = f"opacus {opacus.__version__} RDPAccountant"
    notes = []
    try:
        one = _rdp_epsilon(sigma, 1.0, 1, delta)
    except (ValueError, OverflowError, ArithmeticError, MemoryError) as exc:
        one = None
        notes.append(f"one release: {type(exc).__name__}: {exc}")
    try:
        many = _rdp_epsilon(sigma, sample_rate, rounds, delta)
    except (ValueError, OverflowError, ArithmeticError, MemoryError) as exc:
        many = None
        notes.append(f"{rounds} rounds: {type(exc).__name__}: {exc}")
    if one is None and not notes:
        notes.append("the accountant returned a non-finite epsilon")
    return PrivacyCost(sigma, delta, one, rounds, sample_rate, many, name, "; ".join(notes) or None)
