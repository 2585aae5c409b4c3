"""Index arithmetic for the per-layer systems of R-GAP, without dense circulant matrices.

A weighted layer (ConvSpec) with input x (N samples, C_in channels, spatial S) and output gradient
k gives the gradient constraints  dL/dW[f, c, o] = sum_{n,p} k[n, f, p] * x[n, c, t(o, p)],  where
t(o, p) is the (unpadded) input position that kernel offset o reads for output position p. They are
block-diagonal over input channels and the block G depends only on the channel's group:
G has rows (f in group, o) and columns (n, t). Padded positions are known zeros: they have no column.

The forward constraints W x = z are built as a scipy sparse matrix from the same index map, or applied
matrix-free with the layer's own convolution.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from rgap_audit import rank
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
    idx = torch.where(valid, flat, torch.full_like(flat, -1))
    return idx.reshape(math.prod(spec.kernel), math.prod(out_sp))


def n_samples(spec: ConvSpec, x_shape: tuple[int, ...]) -> int:
    """Samples N of a layer input of full shape x_shape (leading dims of a Linear input are samples)."""
    return math.prod(x_shape) // spec.n_in


def x_to_channels(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    """(N, *in_shape) -> (C_in, N * n_spatial): one column vector per input channel."""
    c = spec.in_channels
    n = x.numel() // spec.n_in
    return x.reshape(n, c, -1).permute(1, 0, 2).reshape(c, -1)


def channels_to_x(spec: ConvSpec, xc: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of x_to_channels, back to the full shape x_shape."""
    c = spec.in_channels
    n = math.prod(x_shape) // spec.n_in
    return xc.reshape(c, n, -1).permute(1, 0, 2).reshape(x_shape)


def gradient_blocks(spec: ConvSpec, k: torch.Tensor) -> list[torch.Tensor]:
    """The gradient-constraint block G_g of every group g: rows (f, offset), columns (n, position).

    k: the layer's output gradient, any shape with N * n_out entries. The blocks are the rank
    analysis's own (rgap_audit.rank.gradient_blocks), so the attack solves the system the audit ranks.
    """
    n = k.numel() // spec.n_out
    blocks = rank.gradient_blocks(spec, k.reshape(n, *spec.out_shape).to(torch.float64))
    return [torch.from_numpy(block) for _channels, block in blocks]


def gradient_rhs(spec: ConvSpec, dw: torch.Tensor) -> list[torch.Tensor]:
    """Right-hand sides per group: (rows of G_g, channels of the group), from dL/dW."""
    g = spec.groups
    cog = spec.out_channels // g
    cig = spec.in_channels // g
    dw = dw.to(torch.float64).reshape(spec.out_channels, cig, -1)
    return [dw[gi * cog : (gi + 1) * cog].permute(0, 2, 1).reshape(-1, cig) for gi in range(g)]


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


def forward_on_channel_basis(spec: ConvSpec, n: int, bases: list[torch.Tensor]) -> torch.Tensor:
    """W applied to every null vector of every channel: the dense reduced matrix F Z.

    bases[g]: (n * n_sp, m_g) orthonormal basis of null(G_g), the same for every channel of group g.
    Returns (N * n_out, sum_g C_in_g * m_g); column order (group, channel in group, basis vector).
    """
    g = spec.groups
    co, ci = spec.out_channels, spec.in_channels
    cog, cig = co // g, ci // g
    n_sp = spec.n_in // ci
    L = spec.n_out // co
    out_cols = []
    for gi, Z in enumerate(bases):
        m = Z.shape[1]
        if m == 0:
            continue
        w = spec.weight[gi * cog : (gi + 1) * cog]  # (cog, cig, *k)
        zt = Z.T.reshape(m, n, n_sp)  # basis vectors as (m, n, positions)
        if spec.ndim == 0:
            # z[n, f] = w[f, c] x[n, c]: column (c, j) = outer(Z[:, j], w[:, c])
            blk = torch.einsum("jn,fc->cjnf", zt[:, :, 0], w)  # (cig, m, n, cog)
            blk = blk.reshape(cig, m, n, cog, 1)
        else:
            wd = w.transpose(0, 1).reshape(cig * cog, 1, *spec.kernel)
            inp = zt.reshape(m * n, 1, *spec.in_spatial).expand(m * n, cig, *spec.in_spatial)
            dw_spec = ConvSpec(wd, (cig, *spec.in_spatial), spec.stride, spec.padding, spec.dilation, cig)
            out = dw_spec.forward(inp.contiguous(), with_bias=False)  # (m*n, cig*cog, *out)
            blk = out.reshape(m, n, cig, cog, L).permute(2, 0, 1, 3, 4)  # (cig, m, n, cog, L)
        full = torch.zeros(cig, m, n, co, L, dtype=torch.float64)
        full[:, :, :, gi * cog : (gi + 1) * cog] = blk
        out_cols.append(full.reshape(cig * m, n * co * L).T)
    if not out_cols:
        return torch.zeros(n * spec.n_out, 0, dtype=torch.float64)
    return torch.cat(out_cols, dim=1)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).reshape(-1).numpy()
