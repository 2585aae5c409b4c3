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
_RNN_WHY = (
    "recurrent layer (RNN, LSTM, GRU): one set of weights shared across time steps inside a fused kernel; its weight "
    "gradient is linear in each step's input given the hidden states and gates, as a Linear's is, but rgap-audit does "
    "not decompose it into steps yet, so it is not analysed"
)
_BILINEAR_WHY = "bilinear layer x1^T A x2: its gradient is quadratic in the input, not a linear system; not analysed"

register(OpInfo("Bilinear", UNKNOWN, False, _BILINEAR_WHY), nn.Bilinear)
register(OpInfo("MultiheadAttention", UNKNOWN, False, _MHA_WHY), nn.MultiheadAttention)
for _cls in (nn.TransformerEncoderLayer, nn.TransformerEncoder):
    register(OpInfo(_cls.__name__, UNKNOWN, False, _TRANSFORMER_WHY), _cls)
for _rnn in (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell):  # named as the user wrote them
    register(OpInfo(_rnn.__name__, UNKNOWN, False, _RNN_WHY), _rnn)
register(OpInfo("RNN", UNKNOWN, False, _RNN_WHY), nn.RNNBase)
register(OpInfo("RNNCell", UNKNOWN, False, _RNN_WHY), nn.RNNCellBase)
