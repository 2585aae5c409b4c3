"""rgap-audit: a privacy-risk linter for PyTorch model architectures (R-GAP rank analysis).

Python API (notebooks, tests)::

    from rgap_audit import audit, audit_model, defences, reconstruct
    from rgap_audit.verify import settle, verify
    report = audit(model, (3, 32, 32))          # static rank analysis -> ModelReport
    result = verify(audit_model(model, (3, 32, 32)))   # --verify: the attack on the audited input and 2 more seeded ones
    rec = reconstruct(model, grads, (3, 32, 32), "logistic")   # closed-form R-GAP attack on given gradients
    found = defences(model, (3, 32, 32))        # --defences: the noise, compression, batch size, edit that stop it
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "audit", "audit_model", "defences", "identifiability", "reconstruct"]

if TYPE_CHECKING:  # pragma: no cover
    from rgap_audit.analysis import audit, audit_model
    from rgap_audit.attack import reconstruct
    from rgap_audit.defence import defences
    from rgap_audit.identifiability import identifiability


def __getattr__(name: str) -> Any:
    """Import the heavy entry points (torch, scipy) only when they are used."""
    if name in ("audit", "audit_model"):
        from rgap_audit import analysis

        return getattr(analysis, name)
    if name == "reconstruct":
        from rgap_audit.attack import reconstruct

        return reconstruct
    if name == "defences":
        from rgap_audit.defence import defences

        return defences
    if name == "identifiability":
        from rgap_audit.identifiability import identifiability

        return identifiability
    raise AttributeError(f"module 'rgap_audit' has no attribute {name!r}")
