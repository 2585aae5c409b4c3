"""Pooling, reductions and selections: linear (average pools, means, sums, indexing) or selecting by
value (max-pool); none is invertible, so the layer below gets forward rows on what they keep only.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.ops.base import CONSTANT, IDENTITY, INVERT, POOL, OpInfo, aten, register
from rgap_audit.ops.shapes import IDENTITY_OP

_AVG_WHY = "linear: averages each window; the layer below gets forward constraints on window averages only (not invertible)"
_ADAPTIVE_AVG_WHY = (
    "linear: averages regions to a fixed output size; forward constraints on region averages only "
    "(not invertible unless every region is one entry)"
)
_MAXPOOL_WHY = "not invertible: only the arg-max entries of its input are known; the chain below is partial"
_MEAN_WHY = "a reduction (mean/sum over dimensions): linear, only the reduced values are known (not invertible)"


def _avgpool_instance(m: Any, base: OpInfo) -> OpInfo:
    def ones(v) -> bool:
        return all(int(a) == 1 for a in (v if isinstance(v, (tuple, list)) else (v,)))

    stride = m.stride if m.stride is not None else m.kernel_size
    if ones(m.kernel_size) and ones(stride) and not any(
        int(p) for p in (m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,))
    ):
        return replace(
            base, invertible=True, inverse=IDENTITY_OP.inverse, link=INVERT, elementwise=True,
            why="kernel 1, stride 1: the identity",
        )
    return base


_maxpool = OpInfo("MaxPool", POOL, False, _MAXPOOL_WHY)
register(
    _maxpool,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
)
register(
    OpInfo("AdaptiveMaxPool", POOL, False, _MAXPOOL_WHY),
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)
register(
    OpInfo("AvgPool", POOL, False, _AVG_WHY, instance=_avgpool_instance, jacobian=CONSTANT),
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
)
register(
    OpInfo("avg_pool", POOL, False, _AVG_WHY, jacobian=CONSTANT),
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
)
register(
    OpInfo("AdaptiveAvgPool", POOL, False, _ADAPTIVE_AVG_WHY, jacobian=CONSTANT),
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
)
register(OpInfo("mean", POOL, False, _MEAN_WHY, jacobian=CONSTANT), torch.mean, "mean", aten.mean.dim, aten.mean.default)
register(
    OpInfo("sum", POOL, False, _MEAN_WHY, jacobian=CONSTANT), torch.sum, "sum", aten.sum.dim_IntList, aten.sum.default
)
TUPLE_ITEM = OpInfo(
    "output-item", IDENTITY, True,
    "one output of an operation that returns several (an RNN's (output, hidden)): a choice between outputs, no entry dropped",
    jacobian=CONSTANT,
)
register(
    OpInfo(
        "getitem", POOL, False,
        "indexing/slicing: a selection of entries, linear; the entries it drops are lost to the chain",
        jacobian=CONSTANT, on_tuple=TUPLE_ITEM,
    ),
    operator.getitem,
)
register(
    OpInfo(
        "split", POOL, False,
        "splits a tensor into slices (chunk, split, unbind): each piece is a selection of entries, linear; "
        "what is known of one piece says nothing of the others",
        jacobian=CONSTANT,
    ),
    torch.chunk, torch.split, torch.unbind, torch.tensor_split, "chunk", "split", "unbind", "tensor_split",
    aten.split.Tensor, aten.chunk.default, aten.unbind.int,
)
register(
    OpInfo(
        "narrow", POOL, False, "a slice of the input (narrow, select): linear; the entries it drops are lost to the chain",
        jacobian=CONSTANT,
    ),
    torch.narrow, torch.select, "narrow", aten.narrow.default, aten.select.int,
)
