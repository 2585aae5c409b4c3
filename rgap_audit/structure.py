"""The forward operator W of a weighted layer as a sparse matrix, by index arithmetic.

For a layer (ConvSpec) with input x (N samples, C_in channels, spatial S), kernel offset o reads the
(unpadded) input position t(o, p) for output position p; padded positions are known zeros and have no
column. The rank code's proof that the forward rows alone have full column rank (rank.forward_full_rank)
and the attack's matrix-free solvers read W from here; the gradient rows' blocks are rank.py's.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from rgap_audit.convspec import ConvSpec


def window_index(spec: ConvSpec) -> torch.Tensor:
    """(n_offsets, n_out_positions) flat index of the unpadded input position read, -1 on padding."""
    nd = spec.ndim
    if nd == 0:
        return torch.zeros(1, 1, dtype=torch.long)
    out_sp = spec.out_spatial
    flat = valid = None
    for j in range(nd):
        h, kk, s, p, d, o = (
            spec.in_spatial[j],
            spec.kernel[j],
            spec.stride[j],
            spec.padding[j],
            spec.dilation[j],
            out_sp[j],
        )
        t = s * torch.arange(o)[None, :] + d * torch.arange(kk)[:, None] - p  # (kk, o)
        shape = [1] * (2 * nd)
        shape[j], shape[nd + j] = kk, o
        t = t.reshape(shape)
        v = (t >= 0) & (t < h)
        flat = t if flat is None else flat * h + t
        valid = v if valid is None else valid & v
    assert flat is not None and valid is not None
    idx = torch.where(valid, flat, torch.full_like(flat, -1))
    return idx.reshape(math.prod(spec.kernel), math.prod(out_sp))


def n_samples(spec: ConvSpec, x_shape: tuple[int, ...]) -> int:
    """Samples N of a layer input of full shape x_shape (leading dims of a Linear input are samples)."""
    return math.prod(x_shape) // spec.n_in


def sparse_forward(spec: ConvSpec, n: int, tmap: torch.Tensor | None = None) -> sp.csr_matrix:
    """W as a scipy CSR matrix: rows (n, f, out position), columns (n, c, in position), bias excluded."""
    if tmap is None:
        tmap = window_index(spec)
    g = spec.groups
    co, ci = spec.out_channels, spec.in_channels
    cog, cig = co // g, ci // g
    n_off, L = tmap.shape
    n_sp = spec.n_in // ci
    w = spec.weight.reshape(co, cig, n_off)
    o_idx, l_idx = torch.nonzero(tmap >= 0, as_tuple=True)
    t_idx = tmap[o_idx, l_idx]
    f = torch.arange(co)[:, None, None]
    cl = torch.arange(cig)[None, :, None]
    c = (f // cog) * cig + cl  # global input channel
    rows0 = (f * L + l_idx[None, None, :]).expand(co, cig, len(o_idx))
    cols0 = (c * n_sp + t_idx[None, None, :]).expand(co, cig, len(o_idx))
    vals = w[:, :, o_idx].expand(co, cig, len(o_idx))
    rows = (rows0.reshape(1, -1) + torch.arange(n)[:, None] * (co * L)).reshape(-1)
    cols = (cols0.reshape(1, -1) + torch.arange(n)[:, None] * (ci * n_sp)).reshape(-1)
    v = vals.reshape(1, -1).expand(n, -1).reshape(-1)
    return sp.csr_matrix(
        (v.numpy(), (rows.numpy(), cols.numpy())), shape=(n * co * L, n * ci * n_sp)
    )


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).reshape(-1).numpy()


def entry_map(push, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """For a linear map `push` (tensors of `shape` -> tensors) that moves entries one by one (an elementwise
    scaling, reshapes, permutations, dropped entries): per output entry j, the input entry i(j) it reads
    (-1 where none) and its factor s_j, from two pushes (ones, and 1..n); checked on a seeded random third.
    None when the map is not of that kind. Lets J v and J^T v be gathers and scatters instead of autograd."""
    n = math.prod(shape)
    with torch.no_grad():
        scale = push(torch.ones(shape, dtype=torch.float64)).reshape(-1).numpy()
        at = push(torch.arange(1, n + 1, dtype=torch.float64).reshape(shape)).reshape(-1).numpy()
        r = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        pr = push(r).reshape(-1).numpy()
    live = scale != 0
    idx = np.full(scale.size, -1, dtype=np.int64)
    ratio = at[live] / scale[live]
    idx[live] = np.rint(ratio).astype(np.int64) - 1
    if live.any() and (np.abs(ratio - np.rint(ratio)).max() > 1e-6 or idx[live].min() < 0 or idx[live].max() >= n):
        return None
    expect = np.where(live, scale * r.reshape(-1).numpy()[np.maximum(idx, 0)], 0.0)
    if not np.allclose(expect, pr, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(pr).max(initial=0.0)))):
        return None
    return idx, scale
