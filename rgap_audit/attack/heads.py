"""The last layer: recover its input x and output gradient k from the head's gradient, in closed form.

Every head returns candidates (x, k, label); more than one when the gradient alone cannot decide
(the logistic loss's sign and two-root ambiguity, a two-class cross-entropy without bias). The
engine keeps the candidate whose recursion stays consistent and whose re-computed gradient matches.
Scalar equations are solved with a 1-D root finder (scipy brentq), never an iterative optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import expit

# f(u) = -u / (1 + e^u) has its minimum at u* = 1 + e^{-u*}; f(u*) = -(u* - 1)
U_STAR = 1.2784645427610738
F_MIN = -(U_STAR - 1.0)


@dataclass
class HeadCandidate:
    """One consistent reading of the head gradient."""

    x: torch.Tensor  # the head layer's input, full shape
    k: torch.Tensor  # dL/dz of the head layer, full shape
    label: float | int | None
    note: str
    gain: float = 1.0  # relative error of x per unit roundoff of the head's closed form (1: a division; a root's conditioning)


@dataclass
class HeadResult:
    candidates: list[HeadCandidate]
    method: str
    info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def logistic_f(u: float) -> float:
    """<w, dL/dw> as a function of the margin u = y * mu: -u / (1 + e^u), computed stably."""
    return -u * float(expit(-u))


def logistic_roots(t: float) -> list[float]:
    """All margins u with -u/(1+e^u) = t: one root for t >= 0, two for F_MIN < t < 0, none below F_MIN."""
    if not math.isfinite(t):
        return []
    if t == 0.0:
        return [0.0]
    tol = {"xtol": 1e-300, "rtol": 4 * np.finfo(float).eps, "maxiter": 500}
    if t > 0:
        lo = -1.0
        while logistic_f(lo) < t:
            lo *= 2.0
        return [brentq(lambda u: logistic_f(u) - t, lo, 0.0, **tol)]
    if abs(t - F_MIN) <= 1e-13:
        return [U_STAR]
    if t < F_MIN:
        return []
    hi = 2 * U_STAR
    while logistic_f(hi) < t:
        hi *= 2.0
        if hi > 1e6:
            break
    r1 = brentq(lambda u: logistic_f(u) - t, 0.0, U_STAR, **tol)
    r2 = brentq(lambda u: logistic_f(u) - t, U_STAR, hi, **tol)
    return [r1, r2]


def logistic_gain(u: float, wg: float) -> float:
    """Relative error of x = dL/dw / k per unit roundoff of <w, dL/dw>, for the margin root u.

    k = -y s(-u) (s the logistic function), so rel(x) = s(u) |du|, and du = dt / f'(u) with dt <= eps |w| |dL/dw|
    (wg = |w| |dL/dw|). At the minimum of f (f' = 0) the root is second-order: du = sqrt(2 dt / |f''(u)|). The
    smaller of the two estimates is the valid one on either side.
    """
    eps = float(np.finfo(float).eps)
    s_u = float(expit(u))

    def fprime(v: float) -> float:
        return float(expit(-v)) * (v * float(expit(v)) - 1.0)

    first = s_u * wg / max(abs(fprime(u)), 1e-300)
    h = 1e-4 * max(1.0, abs(u))
    f2 = abs(fprime(u + h) - fprime(u - h)) / (2 * h)
    second = s_u * math.sqrt(2.0 * wg / (eps * max(f2, 1e-300)))
    return max(1.0, min(first, second))


def _labels_pm(label) -> list[float]:
    if label is None:
        return [1.0, -1.0]
    y = float(label)
    if y not in (1.0, -1.0):
        raise ValueError(f"a logistic label is +1 or -1, got {label!r}")
    return [y]


def logistic_head(w: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None, x_shape, k_shape, label=None) -> HeadResult:
    """Logistic loss on one output mu = w.x (+ b), L = log(1 + exp(-y mu)).

    With a bias: k = dL/db, x = dL/dw / k, y = -sign(k). Without: solve -u/(1+e^u) = <w, dL/dw> for the
    margin u (two roots when the target lies in (F_MIN, 0)); each root and each label sign gives
    k = -y/(1+e^u), x = dL/dw / k. (x, y) and (-x, -y) give the same head gradient: the layers
    below (or nothing, for a single-layer model) must decide.
    """
    g = dw.reshape(-1).to(torch.float64)
    if float(g.norm()) == 0.0:
        raise ValueError("the head's weight gradient is zero: the loss is saturated and nothing can be recovered")
    if db is not None:
        kb = float(db.reshape(-1)[0])
        if kb == 0.0:
            raise ValueError("the head's bias gradient is zero: nothing can be recovered")
        x = (g / kb).reshape(x_shape)
        y = -1.0 if kb > 0 else 1.0
        warn = []
        if label is not None and float(label) != y:
            warn.append(f"given label {label} disagrees with the label the bias gradient reveals ({y:+g})")
        cand = HeadCandidate(x, torch.full(k_shape, kb, dtype=torch.float64), y, "bias leak")
        return HeadResult([cand], "logistic head with bias: x = dL/dw / dL/db (exact)", {"label_from": "bias gradient sign"}, warn)
    t = float(torch.dot(w.reshape(-1).to(torch.float64), g))
    roots = logistic_roots(t)
    if not roots:
        raise ValueError(
            f"<w, dL/dw> = {t:.6g} is below the minimum {F_MIN:.6f} of -u/(1+e^u): the gradient is not that of a "
            "logistic loss on one sample"
        )
    cands = []
    wg = float(w.reshape(-1).to(torch.float64).norm() * g.norm())
    for u in roots:
        gain = logistic_gain(u, wg)
        for y in _labels_pm(label):
            k = -y * float(expit(-u))
            cands.append(
                HeadCandidate((g / k).reshape(x_shape), torch.full(k_shape, k, dtype=torch.float64), y, f"u={u:.6g}, y={y:+g}", gain)
            )
    info = {"target": t, "roots": roots, "two_roots": len(roots) == 2}
    warn = []
    if len(roots) == 2:
        warn.append(
            f"logistic head: <w, dL/dw> = {t:.4g} lies in ({F_MIN:.4f}, 0): two margins u = {roots[0]:.4g} and "
            f"{roots[1]:.4g} fit; both are tried and the one whose gradient matches is kept"
        )
    return HeadResult(cands, "logistic head: 1-D root of -u/(1+e^u) = <w, dL/dw> (brentq)", info, warn)


def ce_bias_head(dw: torch.Tensor, db: torch.Tensor, x_shape, k_shape, label=None) -> HeadResult:
    """Cross-entropy with a biased head: dL/db = softmax(z) - onehot(y) (label: its negative entry), x = dW^T db / |db|^2."""
    b = db.reshape(-1).to(torch.float64)
    W = dw.reshape(b.numel(), -1).to(torch.float64)
    nb = float(b.norm())
    if nb == 0.0:
        raise ValueError("the head's bias gradient is zero (the prediction is saturated): nothing can be recovered")
    neg = torch.nonzero(b < -1e-12 * nb).reshape(-1).tolist()
    warn = []
    if len(neg) == 1:
        y = int(neg[0])
        info: dict[str, object] = {"label_from": "the only negative entry of dL/db"}
    else:
        y = None
        info = {"label_from": None}
        warn.append(f"label not recoverable: dL/db has {len(neg)} negative entries (expected one; batch > 1?)")
    if label is not None and y is not None and int(label) != y:
        warn.append(f"given label {label} disagrees with the label the bias gradient reveals ({y})")
    x = (W.T @ b / nb**2).reshape(x_shape)
    rank1 = float((W - torch.outer(b, W.T @ b / nb**2)).norm() / W.norm().clamp_min(1e-300))
    info["rank1_residual"] = rank1
    if rank1 > 1e-6:
        warn.append(f"head weight gradient is not rank one (residual {rank1:.2g}): more than one sample?")
    cand = HeadCandidate(x, b.reshape(k_shape).clone(), y, "bias leak")
    return HeadResult([cand], "cross-entropy head with bias: label from dL/db, x = dW^T db / |db|^2 (exact)", info, warn)


def ce_nobias_head(w: torch.Tensor, dw: torch.Tensor, x_shape, k_shape, label=None) -> HeadResult:
    """Cross-entropy without bias: dW = k x^T with k = softmax(W x) - onehot(y).

    dW gives x up to a scale s: x = s * xh, k = k~ / s with k~ = dW xh. The label is the entry of k~ whose
    sign differs from all others (ambiguous for two classes). s solves the 1-D equation
    s (1 - softmax(s W xh)_y) = -k~_y sign(s); all its roots are bracketed on a log grid, found with brentq
    and kept when the whole vector k~/s = softmax(s W xh) - e_y matches.
    """
    W = w.reshape(w.shape[0], -1).to(torch.float64)
    G = dw.reshape(W.shape).to(torch.float64)
    C = W.shape[0]
    norms = G.norm(dim=1)
    if float(norms.max()) == 0.0:
        raise ValueError("the head's weight gradient is zero (the prediction is saturated): nothing can be recovered")
    xh = G[int(norms.argmax())] / norms.max()
    kt = G @ xh
    rank1 = float((G - torch.outer(kt, xh)).norm() / G.norm())
    v = (W @ xh).numpy()
    ktn = kt.numpy()
    scale = float(np.abs(ktn).max())
    warn = []
    if rank1 > 1e-6:
        warn.append(f"head weight gradient is not rank one (residual {rank1:.2g}): more than one sample?")
    sig = np.where(np.abs(ktn) > 1e-13 * scale, np.sign(ktn), 0)
    pos, neg = np.nonzero(sig > 0)[0], np.nonzero(sig < 0)[0]
    if label is not None:
        labels = [int(label)]
    elif len(pos) == 1 and len(neg) != 1:
        labels = [int(pos[0])]
    elif len(neg) == 1 and len(pos) != 1:
        labels = [int(neg[0])]
    elif len(pos) == 1 and len(neg) == 1:
        labels = [int(pos[0]), int(neg[0])]  # two classes (or all others underflow): both are tried
    else:
        raise ValueError("label not recoverable: the head gradient has no entry whose sign differs from all others")

    def softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    cands = []
    roots_all = {}
    for y in labels:
        sgn = -np.sign(ktn[y])  # k_true[y] < 0  =>  sign(s) = -sign(k~_y)
        target = abs(ktn[y])

        def h(rho, y=y, sgn=sgn, target=target):
            p = softmax(sgn * rho * v)
            return rho * (1.0 - p[..., y]) - target

        grid = np.logspace(-12, 12, 961)
        hv = np.array([h(r) for r in grid])
        roots = []
        for i in np.nonzero(np.sign(hv[:-1]) * np.sign(hv[1:]) < 0)[0]:
            roots.append(brentq(h, grid[i], grid[i + 1], xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500))
        roots_all[y] = roots
        for rho in roots:
            s = sgn * rho
            ktrue = softmax(s * v) - np.eye(C)[y]
            mism = float(np.linalg.norm(ktn / s - ktrue)) / max(float(np.linalg.norm(ktn / s)), 1e-300)
            if mism < 1e-6:
                # s solves h(rho) = 0 with h(rho) = rho (1 - p_y) - |k~_y|: a relative error eps in k~_y moves rho by
                # eps |k~_y| / |h'(rho)|, i.e. x = s xh by that over rho
                dr = 1e-6 * rho
                slope = abs(h(rho + dr) - h(rho - dr)) / (2 * dr)
                gain = max(1.0, target / max(rho * slope, 1e-300))
                cands.append(
                    HeadCandidate(
                        (xh * s).reshape(x_shape),
                        torch.from_numpy(ktn / s).reshape(k_shape),
                        y,
                        f"y={y}, s={s:.6g}",
                        gain,
                    )
                )
    if not cands:
        raise ValueError("no scale s makes dW consistent with a cross-entropy gradient on one sample")
    info = {"label_candidates": labels, "scale_roots": {str(k): v for k, v in roots_all.items()}, "rank1_residual": rank1}
    if len({c.label for c in cands}) > 1:
        warn.append("cross-entropy head without bias and two classes: the label is decided by the layers below")
    return HeadResult(cands, "cross-entropy head without bias: rank-1 factor, 1-D scale equation (brentq)", info, warn)
