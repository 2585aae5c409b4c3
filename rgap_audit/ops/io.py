"""The graph's two ends: the client's private input and the model output the loss sees."""

from __future__ import annotations

from rgap_audit.ops.base import CONSTANT, IO, PASS, OpInfo

INPUT = OpInfo("input", IO, True, "the client's private input: what the attack recovers", link=PASS, jacobian=CONSTANT)
OUTPUT = OpInfo("output", IO, True, "the model output, seen by the loss", link=PASS, jacobian=CONSTANT)
