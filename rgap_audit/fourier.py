"""Forward rows of a large convolution, solved matrix-free with a Fourier (circulant) preconditioner.

At ImageNet resolution the forward system F x = z of one convolution has ~2e5 unknowns and up to ~1e8
non-zeros: the sparse matrix, let alone a factor of F^T F, does not fit comfortably, and plain LSQR needs
thousands of iterations. But F is block-Toeplitz. Splitting the input into its s^d stride phases
(polyphase: x_r[q] = x[s q + r]) turns a stride-s convolution into a stride-1 convolution with
C_in * s^d input channels, whose periodic (circulant) version C is diagonal in Fourier space: one small
C_out x (C_in s^d) matrix W(w) per frequency. P = E^T (C^H C)^-1 E (E: embedding of the input into the
periodic phase grid; the per-frequency Gram inverted once, Tikhonov-regularised) approximates
(F^T F)^-1; F and C differ only where a window reaches past the border, so CG on the normal equations
preconditioned by P (in CGLS form, one F, one F^T and one P per iteration) needs a few hundred
iterations at 224x224 instead of many thousands. F itself is applied exactly (the layer's own
convolution and its adjoint), so the answer is exact to the solver's tolerance; P only changes how fast.

Whether the forward rows determine x is measured, not assumed: a random probe v is solved alongside z
(one batched solve of [z, F v]); x is reported as determined only when v comes back (PROBE_TOL).
Square layers (C_out = C_in s^d) are full rank by counting but their finite Toeplitz sections are
exponentially ill-conditioned in the image size (a few border directions): the probe does not come back
there, and the solver says so instead of claiming a recovery.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.grad as nng

from rgap_audit.convspec import ConvSpec
from rgap_audit.tolerances import CG_TOL

TIKHONOV_REL = 1e-6  # per-frequency regularisation of the circulant Gram, relative to the largest |W(w)|
MAX_ITERS = 1500  # in all passes together; a layer that needs more is reported as not converged
STALL_CHECK, STALL_WINDOW = 25, 200  # probe error checked every 25 iterations; must halve within 200


@dataclass
class FourierResult:
    """Solution of the forward rows and what the solve measured about it."""

    x: torch.Tensor  # (*x_shape)
    iterations: int
    converged: bool
    probe_error: float  # |v' - v| / |v| for a random probe v solved from F v
    residual: float  # |F x - z| / |z|
    grid: tuple[int, ...]  # the periodic grid of the preconditioner (per spatial dim)


def eligible(spec: ConvSpec) -> bool:
    """The solver handles ungrouped 1-3-d convolutions (any stride, padding, dilation)."""
    return 1 <= spec.ndim <= 3 and spec.groups == 1


def memory_bytes(spec: ConvSpec) -> int:
    """Estimated peak bytes of building the preconditioner: the kernel on the phase grid (float64),
    the per-frequency symbol (complex128, with a copy) and the Gram, its factor and inverse (complex128).
    With C_out = C_in = 512 at 28x28 this is several GB: callers check it against their budget."""
    grid = _grid(spec)
    j = spec.in_channels * math.prod(spec.stride)
    co = spec.out_channels
    n_freq = math.prod(grid[:-1]) * (grid[-1] // 2 + 1)
    return 8 * co * j * math.prod(grid) + 32 * n_freq * co * j + 48 * n_freq * j * j


def _grid(spec: ConvSpec) -> tuple[int, ...]:
    """Periodic grid: every output position and every stride phase of the input, plus the kernel's reach
    in phase units and one (measured: 30-40 % fewer iterations than wrapping round at the output size)."""
    return tuple(
        max(o, -(-h // s)) + -(-d * (k - 1) // s) + 1
        for o, h, s, k, d in zip(spec.out_spatial, spec.in_spatial, spec.stride, spec.kernel, spec.dilation)
    )


def _symbol(spec: ConvSpec, grid: tuple[int, ...]) -> torch.Tensor:
    """W(w) for every rfft frequency: (n_freq, C_out, C_in * prod(stride)), complex128.

    Output o reads input t = s o + d u - p for kernel offset u; with t = s q + r (phase r, 0 <= r < s)
    that is x_r[o + m], m = (d u - p - r) / s. As a circular convolution z = h * x_r, h[-m mod N] = w[u].
    """
    nd = spec.ndim
    w = spec.weight.to(torch.float64)
    co, ci = w.shape[:2]
    ph = spec.stride
    h = torch.zeros(co, ci, *ph, *grid, dtype=torch.float64)
    for u in itertools.product(*(range(k) for k in spec.kernel)):
        r_idx, m_idx = [], []
        for j in range(nd):
            a = spec.dilation[j] * u[j] - spec.padding[j]
            r = a % ph[j]
            r_idx.append(r)
            m_idx.append((-(a - r) // ph[j]) % grid[j])
        h[(slice(None), slice(None), *r_idx, *m_idx)] += w[(slice(None), slice(None), *u)]  # type: ignore[index]
    hf = torch.fft.rfftn(h, dim=tuple(range(-nd, 0)))  # (co, ci, *ph, *freq)
    hf = hf.reshape(co, ci * math.prod(ph), -1)
    return hf.permute(2, 0, 1).contiguous()


def _gram_inverse(sym: torch.Tensor, rel: float) -> torch.Tensor:
    """Per-frequency inverse of the Gram W^H W (J x J, Hermitian), eps ~ rel * max |W(w)|.

    Tall or square W: (W^H W + eps^2 I)^-1 by Cholesky. Wide W (fewer outputs than phase channels: the
    layer is deficient) has a singular Gram; its pseudo-inverse (eigenvalues below eps^2 dropped) keeps
    the iterates out of the directions no row sees instead of amplifying them by 1 / eps^2.
    """
    n_f, co, j = sym.shape
    g = sym.conj().transpose(1, 2) @ sym
    # max |W(w)|^2 up to a factor J: the largest diagonal entry of the Gram (an SVD per frequency costs more)
    smax2 = float(g.diagonal(dim1=1, dim2=2).real.max()) if n_f else 1.0
    eps2 = rel**2 * max(smax2, 1e-300)
    if co < j:
        lam, q = torch.linalg.eigh(g)
        inv = torch.where(lam > eps2, 1.0 / lam.clamp_min(eps2), torch.zeros_like(lam))
        return (q * inv[:, None, :].to(q.dtype)) @ q.conj().transpose(1, 2)
    g.diagonal(dim1=1, dim2=2).add_(eps2)
    return torch.cholesky_inverse(torch.linalg.cholesky(g))


class Preconditioner:
    """P ~ (F^T F)^-1: split x into its stride phases, FFT, per-frequency (W^H W)^-1, inverse FFT, interleave.

    P = E^T C^-1 E with E the (zero-filling) embedding of the input into the phase grid and C the
    circulant Gram, so P is symmetric positive semi-definite, as preconditioned CG needs.
    """

    def __init__(self, spec: ConvSpec, rel: float = TIKHONOV_REL):
        self.spec = spec
        self.grid = _grid(spec)
        self.nd = spec.ndim
        self.dims = tuple(range(-self.nd, 0))
        self.inv = _gram_inverse(_symbol(spec, self.grid), rel)  # (n_freq, J, J)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *in_spatial) -> (B, C_in, *in_spatial)."""
        y = self._deinterleave(x)
        b, j = y.shape[:2]
        yf = torch.fft.rfftn(y, dim=self.dims)
        fshape = yf.shape[2:]
        yf = yf.reshape(b, j, -1).permute(2, 1, 0)  # (n_freq, J, B)
        out = (self.inv @ yf).permute(2, 1, 0).reshape(b, j, *fshape)
        return self._interleave(torch.fft.irfftn(out, s=self.grid, dim=self.dims))

    def _interleave(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C_in * prod(s), *grid) -> (B, C_in, *in_spatial): x[s q + r] = x_r[q], cropped."""
        b, s, g = y.shape[0], self.spec.stride, self.grid
        ci = self.spec.in_channels
        y = y.reshape(b, ci, *s, *g)
        perm = [0, 1] + [p for j in range(self.nd) for p in (2 + self.nd + j, 2 + j)]
        x = y.permute(*perm).reshape(b, ci, *(gj * sj for gj, sj in zip(g, s)))
        return x[(slice(None), slice(None), *(slice(0, h) for h in self.spec.in_spatial))]

    def _deinterleave(self, x: torch.Tensor) -> torch.Tensor:
        """Adjoint of _interleave: zero-fill to the phase grid, split into phases."""
        b, s, g = x.shape[0], self.spec.stride, self.grid
        ci = self.spec.in_channels
        x = _pad_to(x, tuple(gj * sj for gj, sj in zip(g, s)))
        x = x.reshape(b, ci, *(v for j in range(self.nd) for v in (g[j], s[j])))
        perm = [0, 1] + [2 + 2 * j + 1 for j in range(self.nd)] + [2 + 2 * j for j in range(self.nd)]
        return x.permute(*perm).reshape(b, ci * math.prod(s), *g)


def _pad_to(v: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing dims of v at their ends up to size."""
    pads: list[int] = []
    for have, want in zip(reversed(v.shape[-len(size) :]), reversed(size)):
        pads += [0, want - have]
    return torch.nn.functional.pad(v, pads) if any(pads) else v


def _adjoint_conv(spec: ConvSpec, v: torch.Tensor) -> torch.Tensor:
    """F^T v for a batch v (B, C_out, *out_spatial): the layer's input gradient (bias-free)."""
    fn = (nng.conv1d_input, nng.conv2d_input, nng.conv3d_input)[spec.ndim - 1]
    w = spec.weight.to(v.dtype)
    return fn((v.shape[0], *spec.in_shape), w, v, spec.stride, spec.padding, spec.dilation, spec.groups)


def _norms(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def pcgls(
    spec: ConvSpec,
    pre: Preconditioner,
    r: torch.Tensor,
    stop: torch.Tensor,
    max_iters: int = MAX_ITERS,
    watch: Callable[[torch.Tensor], float] | None = None,
):
    """Preconditioned CGLS for a batch of right-hand sides r (B, C_out, *out): min |F x - r| per column.

    CG on F^T F x = F^T r with preconditioner P, keeping the residual in the output space (Bjorck's CGLS
    form). stop: (B,) absolute thresholds on |F^T r|. watch(x): an error that must keep falling (the
    probe's); the solve gives up when it has not halved in STALL_WINDOW iterations (square layers: a few
    nearly invisible border directions that CG would chase for thousands of iterations). Returns (x,
    iterations, converged). Each column has its own step lengths; a converged column stops moving.
    """
    x = torch.zeros((r.shape[0], *spec.in_shape), dtype=r.dtype)
    r = r.clone()
    s = _adjoint_conv(spec, r)
    active = _norms(s) > stop
    if not bool(active.any()):
        return x, 0, True
    zz = pre.apply(s)
    p = zz.clone()
    gamma = _dot(s, zz)
    it = 0
    history: list[float] = []
    for it in range(1, max_iters + 1):
        q = spec.forward(p, with_bias=False)
        qq = _norms(q) ** 2
        alpha = torch.where(active & (qq > 0), gamma / qq.clamp_min(1e-300), torch.zeros_like(gamma))
        x = x + _bcast(alpha, p) * p
        r = r - _bcast(alpha, q) * q
        s = _adjoint_conv(spec, r)
        active = active & (_norms(s) > stop)
        if not bool(active.any()):
            break
        if watch is not None and it % STALL_CHECK == 0:
            history.append(watch(x))
            back = STALL_WINDOW // STALL_CHECK
            if len(history) > back and history[-1] > 0.5 * history[-1 - back]:
                break
        zz = pre.apply(s)
        g_new = _dot(s, zz)
        beta = torch.where(active, g_new / gamma.clamp_min(1e-300), torch.zeros_like(gamma))
        p = torch.where(_bcast(active, p), zz + _bcast(beta, p) * p, p)
        gamma = torch.where(active, g_new, gamma)
    return x, it, not bool(active.any())


def solve(
    spec: ConvSpec,
    zb: torch.Tensor | None,
    x_shape: tuple[int, ...],
    seed: int = 0,
    max_iters: int = MAX_ITERS,
) -> FourierResult:
    """min |F x - zb| for one sample's full output zb (bias removed), with a random probe of F's rank.

    The probe v is solved alongside from F v (one batched solve). Up to three passes of PCGLS on the
    true residual (the recurrence's residual drifts at ~eps cond), max_iters iterations in all.
    zb None: the probe alone (a rank test at half the cost); x and residual are then the probe's.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(1, *spec.in_shape, generator=gen, dtype=torch.float64)
    fv = spec.forward(v, with_bias=False)
    z = fv if zb is None else zb.to(torch.float64).reshape(1, *spec.out_shape)
    b = fv if zb is None else torch.cat([z, fv])
    p = b.shape[0] - 1  # the probe's row
    pre = Preconditioner(spec)
    stop = CG_TOL * _norms(_adjoint_conv(spec, b))
    x = torch.zeros(b.shape[0], *spec.in_shape, dtype=torch.float64)
    iters, converged = 0, False
    for _ in range(3):  # the passes share one budget of max_iters
        watch = lambda dx, x0=x: float((x0[p] + dx[p] - v[0]).norm() / v.norm())
        dx, n_it, converged = pcgls(spec, pre, b - spec.forward(x, with_bias=False), stop, max_iters - iters, watch)
        x, iters = x + dx, iters + n_it
        if n_it == 0 or iters >= max_iters or not converged:
            break
    probe_err = float((x[p] - v[0]).norm() / v.norm())
    rz = float((spec.forward(x[:1], with_bias=False) - z).norm() / z.norm().clamp_min(1e-300))
    return FourierResult(x[0].reshape(x_shape), iters, converged, probe_err, rz, pre.grid)
