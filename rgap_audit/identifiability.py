"""Whole-network identifiability: is the input locally unique given the whole shared gradient?

The layer-wise R-GAP recursion can fail (a deficient layer, a ReLU, a merge) while an attack that uses
every layer's gradient at once still pins the input down (rgap-notes section 3: CNN6-d). The local
answer is the rank of the Jacobian J = d g / d x of the gradient map x -> g(x) = dL/dtheta (every
trainable parameter's gradient, concatenated), at a seeded random instance in float64:

* rank J = number of unknowns (full column rank): the gradient map is an immersion at x, so x is
  locally unique (no other input nearby gives the same gradient);
* rank J < unknowns: the gradient does not determine the input in `deficit` directions at x (and,
  rank being generic, at almost every x).

The smallest relative singular value says how well conditioned the recovery is: a full-rank J with
sigma_min / sigma_max = 1e-6 protects almost nothing against a noiseless attacker and a great deal
against a noisy one.

Two exact routes, chosen by size: "dense-svd" builds J column by column (batched forward-over-reverse
products) and takes its SVD; "gram-eigh" never stores J: it forms J^T J column block by column block
as vjp(jvp(e_i)) and takes eigenvalues, whose rounding floor, sqrt(10 n eps) sigma_max, is the rank tolerance (reported).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from rgap_audit import progress
from rgap_audit.instance import Instance
from rgap_audit.losses import loss_value

_EPS = float(np.finfo(np.float64).eps)
DENSE_LIMIT = 6_000_000  # entries of J (gradient entries x unknowns) up to which J is built and SVD'd
CHUNK_ELEMS = 8_000_000  # gradient entries x directions pushed through one batched product


def _gradient_map(model: nn.Module, loss: str, labels: torch.Tensor):
    """x -> concatenated gradients of all trainable parameters (the shared update), as a pure function."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    if not params:
        raise ValueError("the model has no trainable parameters: there is no gradient to share")

    def g(x: torch.Tensor) -> torch.Tensor:
        def total_loss(ps: dict[str, torch.Tensor]) -> torch.Tensor:
            out = functional_call(model, {**ps, **frozen, **buffers}, (x,))
            return loss_value(loss, out, labels)

        grads = grad(total_loss)(params)
        return torch.cat([grads[n].reshape(-1) for n in params])

    return g


def _columns(fn, x: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
    """fn applied to the unit directions e_start..e_stop-1 of x, batched."""
    eye = torch.zeros((stop - start, n), dtype=x.dtype)
    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    return vmap(fn)(eye.reshape(stop - start, *x.shape))


def identifiability(
    model: nn.Module,
    input_shape: tuple[int, ...],
    loss: str | None = None,
    *,
    batch_size: int = 1,
    seed: int = 0,
    plot: str | None = None,
    method: str = "auto",
    max_unknowns: int = 16384,
) -> dict[str, Any]:
    """Numerical rank and singular spectrum of d(gradient)/d(input) at a seeded random instance (Python API).

    The instance is the one `rgap_audit.analysis` audits for the same seed (rgap_audit.instance). See
    `instance_identifiability` for the keys of the result.
    """
    from rgap_audit.instance import build_instance
    from rgap_audit.options import AuditOptions, LoadedModel

    loaded = LoadedModel(file="<api>", name=type(model).__name__, module=model, input_shape=tuple(input_shape))
    inst = build_instance(loaded, AuditOptions(batch_size=batch_size, loss=loss, seed=seed))
    return instance_identifiability(inst, plot=plot, method=method, max_unknowns=max_unknowns)


def instance_identifiability(
    inst: Instance, *, plot: str | None = None, method: str = "auto", max_unknowns: int = 16384
) -> dict[str, Any]:
    """Numerical rank and singular spectrum of d(gradient)/d(input) at the instance.

    `method` is "auto", "dense-svd" or "gram-eigh". With `plot`, the spectrum is drawn to that PNG path
    (matplotlib, the `report` extra: rgap_audit.figures.MissingExtra without it).
    Meant for small inputs: it costs one Jacobian product per unknown, so more than `max_unknowns` is
    refused. Returns a JSON-ready dict (see the keys below).
    """
    if method not in ("auto", "dense-svd", "gram-eigh"):
        raise ValueError(f"unknown method {method!r}")
    n_req = inst.x.numel()
    if n_req > max_unknowns:
        raise ValueError(
            f"{n_req} input entries: the whole-network Jacobian needs one product per entry and an "
            f"{n_req}x{n_req} eigenproblem; identifiability is for inputs up to {max_unknowns} entries"
        )
    if not inst.x.is_floating_point():
        raise ValueError("the model takes integer token ids: the gradient has no Jacobian with respect to them")
    t0 = time.perf_counter()
    model = inst.gm
    x = inst.x.detach().to(torch.float64)
    loss, labels, batch_size, seed = inst.loss, inst.labels, inst.batch, inst.seed
    g = _gradient_map(model, loss, labels)
    n = x.numel()
    n_grad = int(g(x).numel())
    if method == "auto":
        method = "dense-svd" if n_grad * n <= DENSE_LIMIT or n_grad < n else "gram-eigh"
    chunk = max(1, min(n, CHUNK_ELEMS // max(n_grad, 1)))

    def jv(v: torch.Tensor) -> torch.Tensor:
        return jvp(g, (x,), (v,))[1]

    if method == "dense-svd":
        cols = []
        for s in range(0, n, chunk):
            progress.step("identifiability", "Jacobian columns", s, n)
            cols.append(_columns(jv, x, n, s, min(n, s + chunk)))
        jac = torch.cat(cols).T.numpy()  # (n_grad, n)
        sv = np.linalg.svd(jac, compute_uv=False)
        sv = np.concatenate([sv, np.zeros(n - sv.size)]) if sv.size < n else sv
        smax = float(sv[0]) if sv.size else 0.0
        tol = max(n_grad, n) * _EPS * smax
        floor = tol
    else:
        vjp_fn = vjp(g, x)[1]

        def gram_col(v: torch.Tensor) -> torch.Tensor:
            return vjp_fn(jv(v))[0]

        blocks = []
        for s in range(0, n, chunk):
            progress.step("identifiability", "Gram columns", s, n)
            blocks.append(_columns(gram_col, x, n, s, min(n, s + chunk)).reshape(-1, n))
        gram = torch.cat(blocks).numpy()
        gram = 0.5 * (gram + gram.T)
        lam = np.linalg.eigvalsh(gram)[::-1]
        lam_max = float(max(lam[0], 0.0)) if lam.size else 0.0
        sv = np.sqrt(np.clip(lam, 0.0, None))
        smax = math.sqrt(lam_max)
        tol = math.sqrt(10.0 * n * _EPS * lam_max)  # eigenvalues of J^T J are exact to about n * eps * lam_max
        floor = tol
    rank = int((sv > tol).sum()) if smax > 0 else 0
    smin = float(sv[-1]) if sv.size else 0.0
    result: dict[str, Any] = {
        "unknowns": n,
        "gradient_entries": n_grad,
        "rank": rank,
        "deficit": n - rank,
        "locally_unique": rank == n,
        "sigma_max": smax,
        "sigma_min": smin,
        "sigma_min_rel": smin / smax if smax > 0 else 0.0,
        "sigma_min_kept_rel": float(sv[rank - 1]) / smax if rank > 0 else 0.0,
        "tolerance_rel": floor / smax if smax > 0 else 0.0,
        "singular_values": [float(s) for s in sv],
        "method": method,
        "batch_size": batch_size,
        "loss": loss,
        "seed": seed,
        "seconds": 0.0,
        "plot": None,
        "summary": "",
    }
    if rank == n:
        result["summary"] = (
            f"the whole gradient determines the input locally: Jacobian rank {rank} = {n} unknowns, "
            f"smallest relative singular value {result['sigma_min_rel']:.2e}"
        )
    else:
        result["summary"] = (
            f"the whole gradient leaves {n - rank} of {n} input directions undetermined at this instance "
            f"(Jacobian rank {rank}): the input is not locally unique"
        )
    if plot is not None:
        plot_spectrum(result, plot)
        result["plot"] = str(plot)
    result["seconds"] = time.perf_counter() - t0
    return result


def plot_spectrum(result: dict[str, Any], path: str, name: str = "") -> None:
    """Draw sigma_i / sigma_max against i on a log axis, with the rank threshold and the rank, to a PNG
    (rgap_audit.figures, matplotlib: the `report` extra)."""
    from rgap_audit import figures

    png = figures.spectrum_png({**result, "rank_tol": result["tolerance_rel"]}, name)
    if png is None:
        raise ValueError("no singular values to plot (the Jacobian is zero)")
    with open(path, "wb") as fh:
        fh.write(png)
