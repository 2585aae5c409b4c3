"""One normalised description of a linear layer with weights: Linear or N-d convolution.

A Linear layer is treated as a convolution with zero spatial dimensions: weight (out, in),
input (N, in). Leading dimensions of a Linear input beyond the batch (tokens, say) become extra
samples N, since every position shares the one weight gradient. That way the rank analysis and
the reconstruction engine handle Linear, Conv1d, Conv2d and Conv3d (groups, stride, padding,
dilation) with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvSpec:
    """A bias-optional linear operator z = W * x, as a convolution over `len(kernel)` dims.

    weight: (C_out, C_in // groups, *kernel), float64.
    in_shape: one sample's input, (C_in, *spatial); for a Linear, (in_features,).
    """

    weight: torch.Tensor
    in_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: torch.Tensor | None = None

    # ------------------------------------------------------------------ shape facts
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (0 for a Linear layer)."""
        return self.weight.dim() - 2

    @property
    def in_channels(self) -> int:
        return self.in_shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def in_spatial(self) -> tuple[int, ...]:
        return tuple(self.in_shape[1:])

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (h + 2 * p - d * (k - 1) - 1) // s + 1
            for h, k, s, p, d in zip(self.in_spatial, self.kernel, self.stride, self.padding, self.dilation)
        )

    @property
    def out_shape(self) -> tuple[int, ...]:
        """One sample's output, (C_out, *out_spatial)."""
        return (self.out_channels, *self.out_spatial)

    @property
    def n_in(self) -> int:
        """Unknowns per sample: input entries, padding excluded."""
        n = 1
        for d in self.in_shape:
            n *= d
        return n

    @property
    def n_out(self) -> int:
        n = 1
        for d in self.out_shape:
            n *= d
        return n

    @property
    def n_weight(self) -> int:
        """Entries of the weight, i.e. rows of the gradient constraints dL/dW."""
        return self.weight.numel()

    # ------------------------------------------------------------------ the operator
    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """Apply the layer to a batch x of shape (N, *in_shape)."""
        b = self.bias if with_bias else None
        w = self.weight.to(x.dtype)
        b = None if b is None else b.to(x.dtype)
        if self.ndim == 0:
            return F.linear(x, w, b)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]
        return conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def weight_grad(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """dL/dW for inputs x (N, *in_shape) and output gradients k (N, *out_shape): k^T x for a Linear,
        aten's convolution_backward (weight only) for a convolution. Linear in x, and written without
        autograd so that it composes with torch.func's jvp and vmap (whose reverse mode first loads
        TorchDynamo, about 2 s in every process)."""
        w = self.weight.to(x.dtype).detach()
        kk = k.to(x.dtype)
        if self.ndim == 0:
            return kk.reshape(-1, w.shape[0]).T @ x.reshape(-1, w.shape[1])
        nd = self.ndim
        xs, ks = x.reshape(-1, *self.in_shape), kk.reshape(-1, *self.out_shape)
        stride, padding, dilation = list(self.stride), list(self.padding), list(self.dilation)
        return torch.ops.aten.convolution_backward(
            ks, xs, w, None, stride, padding, dilation, False, [0] * nd, self.groups, [False, True, False]
        )[1]

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def from_module(module: torch.nn.Module, in_shape: tuple[int, ...]) -> ConvSpec:
        """Build from a Linear or convolution module (read through its op-table entry); in_shape is one
        sample's input shape."""
        from rgap_audit.ops import lookup

        info = lookup(None, module)
        if info.conv_spec is None:
            raise TypeError(f"not a weighted layer: {type(module).__name__}")
        spec = info.conv_spec(module, (), {}, tuple(in_shape))
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"{type(module).__name__} is not a plain convolution or Linear layer")
        return spec

    @staticmethod
    def linear(weight: torch.Tensor, bias: torch.Tensor | None, in_shape: tuple[int, ...] | None = None) -> ConvSpec:
        w = weight.detach().to(torch.float64)
        return ConvSpec(
            weight=w,
            in_shape=(w.shape[1],) if in_shape is None else (in_shape[-1],),
            bias=None if bias is None else bias.detach().to(torch.float64),
        )

    @staticmethod
    def conv(
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        in_shape: tuple[int, ...],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
    ) -> ConvSpec:
        w = weight.detach().to(torch.float64)
        nd = w.dim() - 2

        def tup(v) -> tuple[int, ...]:
            return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * nd

        return ConvSpec(
            weight=w,
            in_shape=tuple(int(a) for a in in_shape),
            stride=tup(stride),
            padding=tup(padding),
            dilation=tup(dilation),
            groups=int(groups),
            bias=None if bias is None else bias.detach().to(torch.float64),
        )
