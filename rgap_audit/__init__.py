"""rgap-audit: a privacy-risk linter for PyTorch model architectures (R-GAP rank analysis)."""

__version__ = "0.1.0"
