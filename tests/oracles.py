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
    to norm 1. Any weighted module with a `.weight` works (Linear, Conv, ConvTranspose). The system of
    layer i also has unit rows on x_i's own known zeros (entries the ops below x_i make zero whatever
    their input: a ReLU's zeros given the pattern), which the audit counts as known constants, not
    unknowns; without them a batch whose gradient rows leave those entries free counts them as lost.
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
        if i > 0:  # x_i's own known zeros: entries the ops below make zero whatever z_{i-1} is (a ReLU's zeros)
            below = jacobian(segment(idx[i - 1] + 1, idx[i]), zs[i - 1])
            pinned = np.flatnonzero(~below.any(axis=1))
            if pinned.size:
                blocks.append(_place(np.eye(sizes[i])[pinned], i, i, offsets))
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


def dense_cut_deficits(gm: torch.fx.GraphModule, x: torch.Tensor, labels: torch.Tensor, loss: str, cuts: list[str]) -> dict[str, int]:
    """Per cut node c (an fx node name of `gm`): input directions of c's value that no constraint at or
    above c determines, from ONE dense system over c's value built by autograd alone.

    Its rows: the weight gradient of every weighted module downstream of c, as a function of c's value
    with each module's dL/dz held at the instance's (the R-GAP attacker's knowledge; ReLU and pooling
    patterns fixed by linearising at the instance), what the loss reveals of the output (one sample: the
    logits, up to a constant for cross-entropy), and unit rows on the entries of c that a ReLU-like
    clip saturates (ReLU's zeros, ReLU6 / Hardtanh at a bound: known constants given the pattern). Row blocks are scaled to norm 1.
    deficit = columns - rank (SVD, the usual max(shape) * eps * sigma_max tolerance).
    """
    modules = dict(gm.named_modules())
    weighted = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[str(n.target)], WEIGHTED)]
    node_of = {n.name: n for n in gm.graph.nodes}
    batch = x.shape[0]

    class Run(torch.fx.Interpreter):
        """Runs gm, optionally with one node's value replaced; records weighted outputs and weight gradients."""

        def __init__(self, replace_at: str | None = None, value: torch.Tensor | None = None, ks: dict | None = None):
            super().__init__(gm)
            self.replace_at, self.value, self.ks = replace_at, value, ks
            self.z: dict[str, torch.Tensor] = {}
            self.vals: dict[str, torch.Tensor] = {}
            self.dws: dict[str, torch.Tensor] = {}

        def run_node(self, n):
            if n.name == self.replace_at:
                out = self.value
            elif n.name in weighted and self.ks is not None and n.name in self.ks:
                mod = modules[str(n.target)]
                (a,) = self.map_nodes_to_values(n.args, n)
                w = mod.weight.detach().clone().requires_grad_(True)
                out = torch.func.functional_call(mod, {"weight": w}, (a,))
                self.dws[n.name] = torch.autograd.grad((out * self.ks[n.name]).sum(), w, create_graph=True)[0]
            else:
                out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                self.vals[n.name] = out
                if n.name in weighted:
                    self.z[n.name] = out
                    if out.requires_grad:
                        out.retain_grad()
            return out

    base = Run()
    out = base.run(x)
    loss_value(loss, out, labels).backward()
    ks = {n: z.grad.detach() for n, z in base.z.items() if z.grad is not None}
    vals = {n: v.detach() for n, v in base.vals.items()}

    def downstream(c: str) -> set[str]:
        seen, todo = set(), [node_of[c]]
        while todo:
            for u in todo.pop().users:
                if u.name not in seen:
                    seen.add(u.name)
                    todo.append(u)
        return seen

    result: dict[str, int] = {}
    for c in cuts:
        below = downstream(c)
        layers = [n for n in weighted if n in below and n in ks]
        u0 = vals[c]

        def rows(u, layers=layers, c=c):
            run = Run(c, u, {n: ks[n] for n in layers})
            o = run.run(x)
            return tuple(run.dws[n] for n in layers) + (o,)

        jac = torch.autograd.functional.jacobian(rows, u0, vectorize=True)
        blocks = [unit(j.reshape(-1, u0.numel()).detach().numpy()) for j in jac[:-1]]
        if batch == 1:
            j_out = jac[-1].reshape(-1, u0.numel()).detach().numpy()
            if loss == "cross-entropy":
                n_out = j_out.shape[0]
                j_out = (np.eye(n_out) - np.ones((n_out, n_out)) / n_out) @ j_out
            blocks.append(unit(j_out))
        fn = node_of[c]
        # a clip's saturated entries are constants given the pattern: ReLU's zeros, ReLU6 / Hardtanh at either bound
        mod = modules.get(str(fn.target)) if fn.op == "call_module" else None
        bounds: tuple[float, ...] = ()
        if isinstance(mod, nn.ReLU) or fn.target in (torch.relu, torch.nn.functional.relu):
            bounds = (0.0,)
        elif isinstance(mod, nn.Hardtanh):  # nn.ReLU6 included
            bounds = (float(mod.min_val), float(mod.max_val))
        if bounds:
            zeros = np.flatnonzero(np.isin(u0.reshape(-1).numpy(), bounds))
            eye = np.zeros((zeros.size, u0.numel()))
            eye[np.arange(zeros.size), zeros] = 1.0
            blocks.append(eye)
        a = np.vstack([b for b in blocks if b.size])
        s = np.linalg.svd(a, compute_uv=False)
        tol = max(a.shape) * np.finfo(float).eps * (s[0] if s.size else 0.0)
        result[c] = int(u0.numel() - (s > tol).sum())
    return result
