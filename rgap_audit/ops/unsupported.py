"""Layers with weights that rgap-audit does not decompose yet, each with the precise reason: they are
reported as not understood and never counted as safe."""

from __future__ import annotations

import torch.nn as nn

from rgap_audit.ops.base import UNKNOWN, OpInfo, register

_MHA_WHY = (
    "not decomposed here (add_bias_kv / add_zero_attn: rgap_audit.ops.attention covers the rest): the fused "
    "call is not analysed"
)
_TRANSFORMER_WHY = (
    "not decomposed here (a MultiheadAttention inside is not covered, see rgap_audit.ops.attention): the whole "
    "layer is one fused module"
)
_RNN_WHY = "recurrent: one weight shared across time steps inside a fused kernel; not decomposed"
_BILINEAR_WHY = "bilinear layer x1^T A x2: its gradient is quadratic in the input, not a linear system; not analysed"

register(OpInfo("Bilinear", UNKNOWN, False, _BILINEAR_WHY), nn.Bilinear)
register(OpInfo("MultiheadAttention", UNKNOWN, False, _MHA_WHY), nn.MultiheadAttention)
for _cls in (nn.TransformerEncoderLayer, nn.TransformerEncoder):
    register(OpInfo(_cls.__name__, UNKNOWN, False, _TRANSFORMER_WHY), _cls)
register(OpInfo("RNN", UNKNOWN, False, _RNN_WHY), nn.RNNBase)
register(OpInfo("RNNCell", UNKNOWN, False, _RNN_WHY), nn.RNNCellBase)
