"""--defences: the noise, gradient compression, batch size and architecture change that stop the closed-form attack,
each measured (the attack run on the defended gradient, or the full analysis re-run on the changed model).

    gradients     what a client does to its gradient: clip + Gaussian noise, top-k, fp16 / int8
    attackrun     one attack run on a modified gradient, measured against the true input
    noise         the sigma sweep, the predicted curve, per-layer noise amplification
    accountant    epsilon at delta of a sigma (Opacus' RDP accountant; the `dp` extra)
    compression   top-k and quantisation sweeps
    batch         the smallest batch size whose static verdict is not recoverable
    architecture  single edits (width, stride, kernel, pooling) that make the input not recoverable, re-audited

`run_defences(audit, options)` fills a `Defences` record (records.py); `defences(model, input_shape, ...)` is the
Python API. May import: analysis, attack, verify, instance, ops (the edit table), records, threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from rgap_audit.analysis import Audit, audit_instance
from rgap_audit.defence.accountant import DELTA, ROUNDS, SAMPLE_RATE
from rgap_audit.defence.architecture import BUDGET_S, apply_edit, architecture_defence
from rgap_audit.defence.batch import MAX_BATCH, batch_defence, verdict_at
from rgap_audit.defence.compression import compression_defence
from rgap_audit.defence.noise import SEEDS, THRESHOLD, noise_defence
from rgap_audit.instance import Instance, build_instance
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import Defences
from rgap_audit.threads import single_thread

__all__ = ["PARTS", "DefenceOptions", "apply_edit", "defences", "run_defences"]

PARTS = ("noise", "compression", "batch", "architecture")


@dataclass
class DefenceOptions:
    """What --defences measures and with which knobs (command line: --defences, --clip-norm, --dp-*)."""

    parts: tuple[str, ...] = PARTS
    clip_norm: float | None = None  # None: the instance's gradient norm (clipping is then the identity)
    threshold: float = THRESHOLD  # the attack is stopped above this relative error
    seeds: int = SEEDS  # noise draws per sigma
    delta: float = DELTA
    rounds: int = ROUNDS
    sample_rate: float = SAMPLE_RATE
    max_batch: int = MAX_BATCH
    budget_s: float = BUDGET_S  # the architecture search's wall time


def _attack_client(audit: Audit, options: AuditOptions) -> Instance:
    """The instance the attack sweeps run on: the audited one at batch 1, else the same model re-run at batch 1."""
    if audit.instance.batch == 1:
        return audit.instance
    return verdict_at(audit.instance.loaded, options, 1).instance


def run_defences(audit: Audit, options: AuditOptions, defence: DefenceOptions | None = None) -> Defences:
    """Every part of `defence.parts` on one audited model; a part that cannot run says why in `skipped`."""
    d = defence or DefenceOptions()
    unknown = [p for p in d.parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown defence part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    t0 = time.perf_counter()
    out = Defences()
    loaded = audit.instance.loaded
    attackable = audit.instance.x.is_floating_point()
    with single_thread():
        if ("noise" in d.parts or "compression" in d.parts) and not attackable:
            out.skipped.append("noise, compression: the attack does not run on integer (token id) inputs")
        elif "noise" in d.parts or "compression" in d.parts:
            client = _attack_client(audit, options)
            if "noise" in d.parts:
                out.noise = noise_defence(
                    client, clip_norm=d.clip_norm, threshold=d.threshold, seeds=d.seeds, delta=d.delta, rounds=d.rounds,
                    sample_rate=d.sample_rate,
                )
            if "compression" in d.parts:
                out.compression = compression_defence(client, threshold=d.threshold)
        if "batch" in d.parts:
            out.batch = batch_defence(loaded, options, audit.report, max_batch=d.max_batch)
        if "architecture" in d.parts:
            if audit.report.verdict.input_recoverable is True:
                specs = {n: s.spec for n, s in audit.systems.items()}
                out.architecture = architecture_defence(loaded, options, audit.instance.graph, specs, budget_s=d.budget_s)
            else:
                out.skipped.append(f"architecture: the input is not recoverable as audited ({audit.report.verdict.status.value})")
    out.seconds = time.perf_counter() - t0
    return out


def defences(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    loss: str | None = None,
    seed: int = 0,
    name: str | None = None,
    options: DefenceOptions | None = None,
) -> Defences:
    """Python API: audit a model object at batch 1 and measure the defences that stop the closed-form attack."""
    loaded = LoadedModel(file="<api>", name=name or type(model).__name__, module=model, input_shape=tuple(input_shape), loss=loss)
    opts = AuditOptions(batch_size=1, loss=loss, seed=seed)
    with single_thread():
        audited = audit_instance(build_instance(loaded, opts), opts)
    return run_defences(audited, replace(opts), options)
