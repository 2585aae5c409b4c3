"""The static analysis: the R-GAP walk over one instance and the model verdict.

    walk       Walker: one LayerRecord per op, from the output down
    forward    what is known of each layer's output (forward rows), known input entries
    bounds     bounds carried down when a rank is only bounded
    probe      the forward probe of large fully known layers
    rows       an op's own parameter rows (BatchNorm gamma) against the layer below
    verdict    the model verdict: one decision table
    state      what the walk has learnt per node, and the systems it ranked

May import: instance, links, layergraph, rank, fourier, span, ops, records, tolerances. Nothing here
traces a model or runs the attack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rgap_audit import tolerances
from rgap_audit.analysis.state import LayerSystem, WalkState
from rgap_audit.analysis.verdict import model_verdict
from rgap_audit.analysis.walk import Walker
from rgap_audit.instance import Instance, build_instance
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import ModelReport
from rgap_audit.threads import single_thread

__all__ = ["Audit", "LayerSystem", "Walker", "audit", "audit_instance", "audit_loaded", "audit_model"]


@dataclass
class Audit:
    """The static audit of one instance: the report, and the systems it ranked (for the attack)."""

    report: ModelReport
    instance: Instance
    systems: dict[str, LayerSystem]


def audit_instance(inst: Instance, options: AuditOptions) -> Audit:
    """The walk and the verdict on an instance already built (in the caller's thread pools: the
    pipeline and `audit_loaded` run it single-threaded)."""
    t0 = time.perf_counter()
    walker = Walker(inst, options)
    records = walker.run()
    t_walk = time.perf_counter()
    verdict = model_verdict(inst, walker.state, records)
    state: WalkState = walker.state
    loaded = inst.loaded
    report = ModelReport(
        file=loaded.file,
        model=loaded.name,
        input_shape=list(inst.input_shape),
        batch_size=inst.batch,
        loss=inst.loss,
        seed=inst.seed,
        dtype="float64",
        layers=records,
        verdict=verdict,
        location=loaded.location,
        warnings=state.warnings,
        timings={**inst.timings, "walk_s": t_walk - t0, "total_s": sum(inst.timings.values()) + time.perf_counter() - t0},
        tolerances=tolerances.summary(),
        output=inst.output,
        private_input=inst.private_input,
    )
    return Audit(report, inst, state.systems)


def audit_loaded(loaded: LoadedModel, options: AuditOptions) -> ModelReport:
    """Audit one loaded model: build its instance, walk it, decide the verdict."""
    with single_thread():
        return audit_instance(build_instance(loaded, options), options).report


def audit_model(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    loss: str | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Audit:
    """Python API: audit a model object and keep its instance and ranked systems (for `rgap_audit.verify`)."""
    loaded = LoadedModel(file="<api>", name=name or type(model).__name__, module=model, input_shape=tuple(input_shape))
    options = AuditOptions(batch_size=batch_size, loss=loss, seed=seed)
    with single_thread():
        return audit_instance(build_instance(loaded, options), options)


def audit(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    loss: str | None = None,
    seed: int = 0,
    name: str | None = None,
) -> ModelReport:
    """Python API: audit a model object directly (notebooks, tests)."""
    return audit_model(model, input_shape, batch_size=batch_size, loss=loss, seed=seed, name=name).report
