"""Closed-form R-GAP reconstruction on the layer graph (`--verify`), and its verification report.

`reconstruct` recovers a client's input from its gradient; `verify` runs it on a seeded (or given)
instance of a loaded model and compares the result with the static verdict of the analysis.
"""

from rgap_audit.attack.engine import LayerStep, Reconstruction, reconstruct
from rgap_audit.attack.verification import verify

__all__ = ["LayerStep", "Reconstruction", "reconstruct", "verify"]
