"""A federated-learning project laid out as a package (written for rgap-audit's tests)."""
