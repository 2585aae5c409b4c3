"""Independent oracles the tests compare the audit with, built from autograd and dense linear algebra only.

`dense_chain_deficits` is the whole-chain truth for sequential models: ONE dense system over the
inputs of all weighted layers, whose null space restricted to each layer gives that layer's deficit.
Nothing from rgap_audit's rank code is used (only its loss and label conventions, so that the
instance is the one the audit ranks).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn

from rgap_audit.losses import loss_value, make_labels

WEIGHTED = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def jacobian(f, x: torch.Tensor) -> np.ndarray:
    """d f / d x at x, as (outputs, inputs)."""
    return torch.autograd.functional.jacobian(f, x.detach(), vectorize=True).reshape(-1, x.numel()).detach().numpy()


def unit(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a)
    return a / n if n > 0 else a


def dense_k(m: nn.Module, x: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    """K: the Jacobian of x -> dL/dW for the fixed output gradient k, (n_weight, N * n_in)."""
    w = m.weight.detach().clone().requires_grad_(True)

    def grad_w(xx: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(m, {"weight": w}, (xx,))
        return torch.autograd.grad((z * k).sum(), w, create_graph=True)[0]

    return jacobian(grad_w, x).reshape(w.numel(), x.numel())


def _place(mat: np.ndarray, j: int, first: int, offsets: np.ndarray) -> np.ndarray:
    """mat as the block of layer j's input among the columns of layers first.. (the rest zero)."""
    row = np.zeros((mat.shape[0], int(offsets[-1] - offsets[first])))
    row[:, offsets[j] - offsets[first] : offsets[j + 1] - offsets[first]] = mat
    return row


def dense_chain_deficits(model: nn.Sequential, input_shape, loss: str, seed: int = 0, batch: int = 1) -> list[int]:
    """Per weighted layer (input first): directions of its input left free by the layers at and above it.

    The system over all layer inputs x_1..x_L: each layer's gradient rows K_j x_j = dL/dW_j, the links
    x_{j+1} = G_j(W_j x_j) linearised at the instance (G_j the ops between, with ReLU patterns fixed; rows
    on x_{j+1} alone where G_j is zero are its known zeros), and what the loss reveals of the output (one
    sample: the output, up to a constant for cross-entropy; nothing for a batch). Row blocks are scaled
    to norm 1. Any weighted module with a `.weight` works (Linear, Conv, ConvTranspose).
    """
    model = model.double().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *input_shape), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out_features = model(x).reshape(batch, -1).shape[1]
    labels = make_labels(loss, batch, out_features, gen)
    layers = list(model)
    idx = [i for i, m in enumerate(layers) if isinstance(m, WEIGHTED)]
    inputs, outputs, h = [], [], x
    for i, m in enumerate(layers):
        if i in idx:
            inputs.append(h.detach())
            h = m(h)
            h.retain_grad()
            outputs.append(h)
        else:
            h = m(h)
    loss_value(loss, h, labels).backward()
    ks, zs = [o.grad.detach() for o in outputs], [o.detach() for o in outputs]

    def segment(a: int, b: int):
        def g(t):
            for mod in layers[a:b]:
                t = mod(t)
            return t

        return g

    sizes = [t.numel() for t in inputs]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_layers, deficits = len(idx), []
    for i in range(n_layers):
        blocks = []
        for j in range(i, n_layers):
            m = layers[idx[j]]
            blocks.append(_place(unit(dense_k(m, inputs[j], ks[j])), j, i, offsets))
            end = idx[j + 1] if j + 1 < n_layers else len(layers)
            w_j = jacobian(lambda t, m=m: torch.func.functional_call(m, {"weight": m.weight}, (t,)), inputs[j])
            link = jacobian(segment(idx[j] + 1, end), zs[j]) @ w_j
            if j + 1 < n_layers:
                row = _place(link, j, i, offsets)
                row[:, offsets[j + 1] - offsets[i] : offsets[j + 2] - offsets[i]] -= np.eye(sizes[j + 1])
                blocks.append(unit(row))
            elif batch == 1:
                if loss == "cross-entropy":
                    c = link.shape[0]
                    link = (np.eye(c) - np.ones((c, c)) / c) @ link
                blocks.append(_place(unit(link), j, i, offsets))
        null = scipy.linalg.null_space(np.vstack(blocks))
        deficits.append(0 if null.size == 0 else int(np.linalg.matrix_rank(null[: sizes[i]], tol=1e-8)))
    return deficits
