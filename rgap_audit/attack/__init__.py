"""Closed-form R-GAP reconstruction (`--verify`): the head, then one weighted layer at a time.

    engine     the descent over the layer graph, candidates of the head, the projected variant
    heads      the last layer's closed forms (logistic, cross-entropy with and without bias)
    solve      one layer's least-squares solve of [K; F] x = [dL/dW; z], by its structure
    structure  index arithmetic for the per-layer systems
    dlg        a DLG-style optimisation baseline (benchmarks only)

`reconstruct` is the Python API (a model and its gradients); `attack_graph` runs on an instance's
layer graph. May import: instance, links, layergraph, rank, fourier, ops, tolerances.
"""

from rgap_audit.attack.engine import LayerStep, Reconstruction, attack_graph, reconstruct

__all__ = ["LayerStep", "Reconstruction", "attack_graph", "reconstruct"]
