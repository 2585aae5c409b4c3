"""Closed-form R-GAP reconstruction on the layer graph (`--verify`), and its verification report.

`reconstruct` recovers a client's input from its gradient; `verify` runs it on a seeded (or given)
instance of a loaded model and compares the result with the static verdict of the analysis.
"""

from rgap_audit.attack.engine import LayerStep, Reconstruction, reconstruct

__all__ = ["LayerStep", "Reconstruction", "reconstruct", "verify"]


def __getattr__(name):  # verify pulls in pillow lazily
    if name == "verify":
        from rgap_audit.attack.verify import verify

        return verify
    raise AttributeError(name)
