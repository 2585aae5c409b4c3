"""The training losses a client may use, and the label of a seeded instance.

logistic: one output mu per sample, label y in {-1, +1}, L = log(1 + exp(-y mu)) (rgap-notes section 2).
cross-entropy: C logits per sample, integer label.
The shared gradient is that of the SUM over the batch (a mean only rescales it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rgap_audit.choices import LOSSES


def choose_loss(loss: str | None, out_features: int) -> str:
    """The declared loss, else logistic for one output and cross-entropy for several."""
    if loss is not None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; supported: {', '.join(LOSSES)}")
        if loss == "logistic" and out_features != 1:
            raise ValueError(f"logistic loss needs one output per sample, the model has {out_features}")
        return loss
    return "logistic" if out_features == 1 else "cross-entropy"


def make_labels(loss: str, batch: int, out_features: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded labels: +-1 (float64) for logistic, class indices for cross-entropy."""
    if loss == "logistic":
        return torch.randint(0, 2, (batch,), generator=generator).to(torch.float64) * 2 - 1
    return torch.randint(0, out_features, (batch,), generator=generator)


def loss_value(loss: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss of a batch of outputs (N, out_features) against labels."""
    out = output.reshape(output.shape[0], -1)
    if loss == "logistic":
        return F.softplus(-labels.to(out.dtype) * out[:, 0]).sum()
    return F.cross_entropy(out, labels, reduction="sum")


def client_gradient(model: torch.nn.Module, x: torch.Tensor, loss: str, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a client shares: dL/dparam (float64) of the summed loss on x with labels, by parameter name."""
    import copy

    m = copy.deepcopy(model).to(torch.float64).eval()
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        out = m(x.to(torch.float64))
        grads = torch.autograd.grad(loss_value(loss, out, labels), [p for _, p in params], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(params, grads)}
