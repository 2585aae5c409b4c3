"""A transposed convolution as the equivalent stride-1 convolution on a zero-inserted input.

conv_transpose(x; W, stride s, padding p, output_padding op, groups g, dilation d) equals, per spatial
dim, a stride-1 convolution (dilation d, groups g) of the "frame" V, with weight W' = W flipped
spatially and with input/output channels swapped within each group:

    V[m] = x[i] where m = s*i + lead, zero elsewhere;  lead = d*(k-1) - p,  trail = lead + op,
    frame length L_f = s*(H-1) + 1 + lead + trail = L_out + d*(k-1).

(Proof: the conv reads V[j + d*u'] W'[u'] = x[i] W[k-1-u'] where j + d*u' = s*i + lead, i.e.
j = s*i - p + d*u with u = k-1-u', the definition of the transposed convolution.)

The equivalent ConvSpec pads symmetrically by P = max(lead, 0) and takes as its input the frame
positions [P, L_f - P): the s-1 zeros inserted between entries and the op entries appended after
them are KNOWN inputs (zeros), never unknowns. When lead < 0 the frame starts inside the zero-
inserted input: the entries of x that fall before it (or after its end) reach no output at all; they
are unknowns with no constraint, reported as undetermined by the rank code (rank.py).

The weight gradient wrt W is a re-indexing of the one wrt W', so the rank of the gradient rows is that
of the equivalent convolution. Everything the rank code reports is mapped back to the layer's actual
input coordinates (N, *in_shape) by `ConvTransposeEmbedding`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from rgap_audit.convspec import ConvSpec
from rgap_audit.errors import AuditError


@dataclass(frozen=True)
class ConvTransposeSpec:
    """z = conv_transpose(x; W), in the layer's own coordinates (the shapes the walk sees).

    weight_t: (C_in, C_out // groups, *kernel), float64, as the module holds it (the transposed layout).
    in_shape: one sample's input, (C_in, *spatial). Exposes the ConvSpec surface the walk uses
    (in_shape, out_shape, n_in, n_out, n_weight, ndim, bias, forward, weight_grad); the rank code
    works on `embedding().spec`, the equivalent stride-1 ConvSpec.

    It has no `weight`: code written for ConvSpec reads `.weight` as (C_out, C_in // groups, *kernel)
    with the stride on the input side, which this layer is not. Reading it raises AuditError, so that
    such code (the closed-form attack, which handles ConvSpec only) stops with a clear one-line reason
    instead of solving the wrong system.
    """

    weight_t: torch.Tensor
    in_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1
    bias: torch.Tensor | None = None

    transposed = True  # class attribute: lets callers tell this from a ConvSpec without importing it

    @property
    def weight(self) -> torch.Tensor:
        """Refused: see the class docstring (use weight_t, or embedding().spec.weight for W')."""
        raise AuditError(
            f"{self.describe()}: the closed-form attack does not handle transposed convolutions "
            "(the static analysis does, through the equivalent convolution)"
        )

    def describe(self) -> str:
        """A short name for messages, e.g. ConvTranspose2d(4->3, k=(3, 3), stride=(2, 2))."""
        return (
            f"ConvTranspose{self.ndim}d({self.in_channels}->{self.out_channels}, k={self.kernel}, stride={self.stride})"
        )

    # ------------------------------------------------------------------ shape facts
    @property
    def ndim(self) -> int:
        return self.weight_t.dim() - 2

    @property
    def in_channels(self) -> int:
        return self.in_shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight_t.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_t.shape[2:])

    @property
    def in_spatial(self) -> tuple[int, ...]:
        return tuple(self.in_shape[1:])

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (h - 1) * s - 2 * p + d * (k - 1) + op + 1
            for h, k, s, p, op, d in zip(
                self.in_spatial, self.kernel, self.stride, self.padding, self.output_padding, self.dilation
            )
        )

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.out_channels, *self.out_spatial)

    @property
    def n_in(self) -> int:
        return int(np.prod(self.in_shape, dtype=np.int64))

    @property
    def n_out(self) -> int:
        return int(np.prod(self.out_shape, dtype=np.int64))

    @property
    def n_weight(self) -> int:
        return self.weight_t.numel()

    # ------------------------------------------------------------------ the operator
    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """Apply the layer to a batch x of shape (N, *in_shape)."""
        w = self.weight_t.to(x.dtype)
        b = None if (self.bias is None or not with_bias) else self.bias.to(x.dtype)
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.ndim - 1]
        return conv_t(x, w, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation)

    def weight_grad(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """dL/dW for inputs x (N, *in_shape) and output gradients k (N, *out_shape), by autograd."""
        w = self.weight_t.to(x.dtype).detach().requires_grad_(True)
        spec = ConvTransposeSpec(
            w, self.in_shape, self.stride, self.padding, self.output_padding, self.dilation, self.groups, None
        )
        (g,) = torch.autograd.grad((spec.forward(x, with_bias=False) * k.to(x.dtype)).sum(), w)
        return g

    # ------------------------------------------------------------------ the equivalent convolution
    def equivalent_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """W' (C_out, C_in // groups, *kernel): channels swapped within each group, kernel flipped."""
        w = self.weight_t if w is None else w
        g, cig, cog = self.groups, self.in_channels // self.groups, w.shape[1]
        wp = w.reshape(g, cig, cog, *self.kernel).transpose(1, 2).reshape(g * cog, cig, *self.kernel)
        return wp.flip(list(range(2, 2 + self.ndim)))

    def grad_from_equivalent(self, gp: torch.Tensor) -> torch.Tensor:
        """dL/dW from dL/dW' (the inverse re-indexing of equivalent_weight)."""
        g, cig, cog = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
        gp = gp.flip(list(range(2, 2 + self.ndim)))
        return gp.reshape(g, cog, cig, *self.kernel).transpose(1, 2).reshape(g * cig, cog, *self.kernel)

    def embedding(self) -> ConvTransposeEmbedding:
        """The equivalent stride-1 convolution and the map from actual to its input coordinates."""
        return ConvTransposeEmbedding(self)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def make(
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        in_shape: tuple[int, ...],
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        dilation=1,
        output_size=None,
    ) -> ConvTransposeSpec:
        """Normalise call arguments (ints or tuples; output_size as in the module's forward).

        Raises ValueError for what the layer cannot compute (torch would refuse it too).
        """
        w = weight.detach().to(torch.float64)
        nd = w.dim() - 2
        if nd not in (1, 2, 3):
            raise ValueError(f"transposed convolution with a {w.dim()}-d weight is not supported")

        def tup(v, name: str) -> tuple[int, ...]:
            if isinstance(v, str):
                raise ValueError(f"string {name} {v!r} is not supported")
            t = tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * nd
            if len(t) == 1 and nd > 1:
                t = t * nd
            if len(t) != nd:
                raise ValueError(f"{name} {v!r} does not match a {nd}-d kernel")
            return t

        in_shape = tuple(int(a) for a in in_shape)
        groups = int(groups)
        if len(in_shape) != nd + 1:
            raise ValueError(f"input shape {in_shape} does not match a {nd}-d transposed convolution")
        if in_shape[0] != w.shape[0] or in_shape[0] % groups:
            raise ValueError(f"input has {in_shape[0]} channels, the weight {w.shape[0]} (groups={groups})")
        spec = ConvTransposeSpec(
            weight_t=w,
            in_shape=in_shape,
            stride=tup(stride, "stride"),
            padding=tup(padding, "padding"),
            output_padding=tup(output_padding, "output_padding"),
            dilation=tup(dilation, "dilation"),
            groups=groups,
            bias=None if bias is None else bias.detach().to(torch.float64),
        )
        if output_size is not None:  # the module's forward(x, output_size): output_padding follows from it
            size = [int(a) for a in output_size][-nd:]
            base = replace(spec, output_padding=(0,) * nd)
            spec = replace(spec, output_padding=tuple(o - b for o, b in zip(size, base.out_spatial)))
        for s, d, op in zip(spec.stride, spec.dilation, spec.output_padding):
            if s < 1 or d < 1 or not 0 <= op < max(s, d):
                raise ValueError(
                    f"output_padding {spec.output_padding} must be smaller than stride or dilation "
                    f"(stride {spec.stride}, dilation {spec.dilation})"
                )
        if any(o < 1 for o in spec.out_spatial):
            raise ValueError(f"output size {spec.out_spatial} is empty")
        return spec

    @staticmethod
    def from_module(module: torch.nn.Module, in_shape: tuple[int, ...], output_size=None) -> ConvTransposeSpec:
        """Build from a ConvTranspose module (read through its op-table entry); in_shape is one sample's input shape."""
        from rgap_audit.ops import lookup

        info = lookup(None, module)
        spec = None if info.conv_spec is None else info.conv_spec(module, (), {"output_size": output_size}, tuple(in_shape))
        if not isinstance(spec, ConvTransposeSpec):
            raise TypeError(f"not a ConvTranspose module: {type(module).__name__}")
        return spec


class ConvTransposeEmbedding:
    """The equivalent ConvSpec of a ConvTransposeSpec and the map between the two input coordinates.

    Per spatial dim, actual position i sits at position s*i + min(lead, 0) of the equivalent input
    (length L_f - 2*max(lead, 0)), or nowhere when that falls outside it ("cropped": it reaches no
    output). Every other position of the equivalent input is a known zero.
    """

    def __init__(self, spec: ConvTransposeSpec):
        self.source = spec
        sizes, per_dim = [], []
        pads = []
        for h, k, s, p, _op, d, o in zip(
            spec.in_spatial, spec.kernel, spec.stride, spec.padding, spec.output_padding, spec.dilation, spec.out_spatial
        ):
            lead = d * (k - 1) - p
            pad = max(lead, 0)
            size = o + d * (k - 1) - 2 * pad
            pos = s * np.arange(h) + min(lead, 0)
            per_dim.append(np.where((pos >= 0) & (pos < size), pos, -1))
            sizes.append(size)
            pads.append(pad)
        self.spatial: tuple[int, ...] = tuple(sizes)
        self.spec = ConvSpec(
            weight=spec.equivalent_weight(),
            in_shape=(spec.in_channels, *self.spatial),
            stride=(1,) * spec.ndim,
            padding=tuple(pads),
            dilation=spec.dilation,
            groups=spec.groups,
            bias=spec.bias,
        )
        grids = np.meshgrid(*per_dim, indexing="ij")
        ok = np.ones(grids[0].shape, dtype=bool)
        for gr in grids:
            ok &= gr >= 0
        flat = np.ravel_multi_index(tuple(np.where(ok, gr, 0) for gr in grids), self.spatial)
        self.index: np.ndarray = np.where(ok, flat, -1).reshape(-1).astype(np.int64)
        """per actual flat spatial position: its flat position in the equivalent input, -1 if cropped"""

    @cached_property
    def placed(self) -> np.ndarray:
        """Actual flat spatial positions that have a place in the equivalent input."""
        return np.flatnonzero(self.index >= 0)

    @property
    def n_cropped(self) -> int:
        """Actual spatial positions that reach no output (only when d*(k-1) < padding)."""
        return int(self.index.size - self.placed.size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, *in_shape) -> the equivalent input (N, C_in, *spatial), zeros elsewhere."""
        n, c = x.shape[0], self.source.in_channels
        out = x.new_zeros(n, c, int(np.prod(self.spatial, dtype=np.int64)))
        p = torch.from_numpy(self.placed)
        out[:, :, torch.from_numpy(self.index[self.placed])] = x.reshape(n, c, -1)[:, :, p]
        return out.reshape(n, c, *self.spatial)

    def known_mask(self, n: int, known: torch.Tensor | None) -> torch.Tensor:
        """Known entries of the equivalent input: every inserted/appended zero, plus the actual `known`."""
        c = self.source.in_channels
        s_eq = int(np.prod(self.spatial, dtype=np.int64))
        mask = torch.ones(n, c, s_eq, dtype=torch.bool)
        real = torch.zeros(n, c, s_eq, dtype=torch.bool)
        real[:, :, torch.from_numpy(self.index[self.placed])] = True
        mask &= ~real
        if known is not None:
            kn = known.detach().reshape(n, c, -1).to(torch.bool)
            mask[:, :, torch.from_numpy(self.index[self.placed])] = kn[:, :, torch.from_numpy(self.placed)]
        return mask.reshape(n, c, *self.spatial)

    def pull_back(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Rows in equivalent-input coordinates (N * C_in * S_eq, d) -> actual (N * C_in * S, d)."""
        c = self.source.in_channels
        d = rows.shape[1]
        r = rows.reshape(n, c, rows.shape[0] // max(1, n * c), d)
        out = rows.new_zeros(n, c, self.index.size, d)
        out[:, :, torch.from_numpy(self.placed)] = r[:, :, torch.from_numpy(self.index[self.placed])]
        return out.reshape(n * c * self.index.size, d)

    def cropped_unknowns(self, n: int, known: torch.Tensor | None) -> torch.Tensor:
        """Flat actual indices (into N * n_in) of unknown entries that reach no output."""
        c = self.source.in_channels
        mask = torch.zeros(n, c, self.index.size, dtype=torch.bool)
        mask[:, :, torch.from_numpy(self.index < 0)] = True
        if known is not None:
            mask &= ~known.detach().reshape(n, c, -1).to(torch.bool)
        return torch.nonzero(mask.reshape(-1)).reshape(-1)
