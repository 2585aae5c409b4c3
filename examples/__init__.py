"""Example model files for rgap-audit (each also runs as `rgap-audit examples/NAME.py`).

A regular package, so that `examples.*` resolves to these files even where another distribution
installs a top-level `examples` package into site-packages (Opacus does).
"""
