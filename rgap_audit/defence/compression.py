"""Gradient compression as federated-learning stacks ship it: top-k sparsification per tensor and per-tensor
quantisation (fp16, int8), each measured by running the attack on the compressed gradient of the audited input.

Compression is deterministic, so each level is one attack run. The level that stops the attack is the mildest
one of the sweep whose error exceeds the threshold (or from which nothing comes back).
"""

from __future__ import annotations

import time

from rgap_audit.defence.attackrun import attack
from rgap_audit.defence.gradients import to_fp16, to_int8, top_k
from rgap_audit.instance import Instance
from rgap_audit.records import CompressionDefence, CompressionPoint

KEEP = (0.999, 0.99, 0.9, 0.5, 0.1, 0.01)  # fractions of each tensor kept, mildest first
QUANTISERS = (("fp16", 16, to_fp16), ("int8", 8, to_int8))  # widest first


def _stops(err: float | None, threshold: float) -> bool:
    return err is None or err > threshold


def compression_defence(client: Instance, *, threshold: float = 0.5, keep: tuple[float, ...] = KEEP) -> CompressionDefence:
    """Top-k at each kept fraction and fp16 / int8 quantisation: the attack's measured error at each."""
    t0 = time.perf_counter()
    points: list[CompressionPoint] = []
    for p in sorted(keep, reverse=True):
        out = attack(client, top_k(client.param_grads, p))
        points.append(CompressionPoint("top-k", p, None, out.rel_error, out.psnr_db, _stops(out.rel_error, threshold)))
    for name, bits, quantise in QUANTISERS:
        out = attack(client, quantise(client.param_grads))
        points.append(CompressionPoint(name, None, bits, out.rel_error, out.psnr_db, _stops(out.rel_error, threshold)))
    topk_stop = next((p.keep_fraction for p in points if p.method == "top-k" and p.stops), None)
    quant_stop = next((p.method for p in points if p.bits is not None and p.stops), None)
    parts = []
    if topk_stop is not None:
        parts.append(f"top-k keeping {100 * topk_stop:g} % of each tensor stops it")
    else:
        parts.append(f"no top-k level down to {100 * min(keep):g} % stops it")
    if quant_stop is not None:
        parts.append(f"{quant_stop} quantisation stops it")
    else:
        parts.append("neither fp16 nor int8 quantisation stops it")
    summary = f"relative error above {threshold:g}: " + "; ".join(parts) + " (measured on the audited input)"
    return CompressionDefence(threshold, points, topk_stop, quant_stop, len(points), time.perf_counter() - t0, summary)
