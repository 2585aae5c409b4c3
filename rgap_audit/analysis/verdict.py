"""The model verdict: one decision table over what the walk found at the layer that reads the input.

The facts (`InputFacts`) are gathered first; the first row of `DECISIONS` whose condition holds gives
the status, what it rests on and its summary. Not-understood ops turn anything short of a proven
leak into `unknown` (never counted as safe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rgap_audit import ops
from rgap_audit.analysis.state import WalkState
from rgap_audit.convspec import ConvSpec
from rgap_audit.instance import Instance
from rgap_audit.links import input_chain
from rgap_audit.records import Basis, BatchSpan, LayerRecord, ModelStatus, ModelVerdict, Verdict
from rgap_audit.span import patch_space, row_space
from rgap_audit.tolerances import SPAN_IN_TOL

CAVEAT_DEFICIT = (
    "A layer-wise deficit makes the closed-form recursion fail and the recovery worse conditioned, "
    "but it is not proof of safety: attacks that use all layers jointly (gradient matching, or the "
    "Jacobian of the whole gradient map) may still recover the input."
)
CAVEAT_PATTERN = "Activation patterns (which units are active, signs) are taken as known to the attacker, as in R-GAP."
CAVEAT_BATCH = (
    "With {b} samples sharing one gradient, the per-sample dL/dz is taken from the instance: "
    "an upper bound on what an attacker knows."
)
ATTACKER_PER_SAMPLE = "given each sample's dL/dz (RGAP403: an upper bound on any attacker of the summed gradient)"


@dataclass
class InputFacts:
    """What the decision table looks at."""

    rec: LayerRecord | None  # the weighted layer that reads the model input, None when there is none
    layer: str  # how the summary names it
    path_ok: bool  # the ops before it are invertible
    why_path: str  # why not (or why there is no such layer)
    value_known: bool  # the walk recovered the model input itself (every pattern above derivable)
    deficient: int  # deficient layers in the model
    total_deficit: int
    batch: int


def _r(f: InputFacts) -> LayerRecord:
    """The input layer's record; the table's first row handles a model without one."""
    assert f.rec is not None
    return f.rec


def _bounded_deficient(f: InputFacts) -> bool:
    r = f.rec
    return r is not None and r.deficit is None and r.rank_upper is not None and r.unknowns is not None and r.rank_upper < r.unknowns


def _given_pattern_summary(f: InputFacts) -> str:
    if f.batch > 1:
        return (
            f"the {f.batch} inputs are determined by the gradient and forward constraints of {f.layer} "
            "given each sample's dL/dz, which a gradient summed over the batch does not reveal "
            "(R-GAP's recursion cannot start at the output); an attacker who separates the samples "
            "may still recover them"
        )
    return (
        f"the input is determined by the gradient and forward constraints of {f.layer}, "
        "but forming them needs dL/dz, which rests on activation patterns above that the attacker "
        "cannot derive in closed form; an attacker who estimates them may still recover the input"
    )


@dataclass(frozen=True)
class Decision:
    """One row of the table: when it applies, the status, what it rests on (None: numerical rank), the summary."""

    when: Callable[[InputFacts], bool]
    status: ModelStatus
    basis: Basis
    summary: Callable[[InputFacts], str]


DECISIONS: tuple[Decision, ...] = (
    Decision(
        lambda f: f.rec is None, ModelStatus.UNKNOWN, Basis.NUMERICAL,
        lambda f: f"the input cannot be traced to a weighted layer: {f.why_path}",
    ),
    Decision(
        lambda f: _r(f).verdict == Verdict.LEAKS_EXACTLY and f.path_ok, ModelStatus.LEAKS_EXACTLY, Basis.STRUCTURE,
        lambda f: f"the input leaks exactly through {f.layer}: x = dL/dW[j] / dL/db[j]",
    ),
    Decision(
        lambda f: _r(f).unknowns is None, ModelStatus.UNKNOWN, Basis.STRUCTURE,
        lambda f: f"the input {f.layer} could not be analysed: {_r(f).reason}",
    ),
    Decision(
        _bounded_deficient, ModelStatus.DEFICIENT, Basis.BOUNDS,
        lambda f: (
            f"input not recoverable in closed form: at least {(_r(f).unknowns or 0) - (_r(f).rank_upper or 0)} of {_r(f).unknowns} "
            f"input directions undetermined (proven bounds: rank {_r(f).rank_lower}..{_r(f).rank_upper} at {f.layer})"
        ),
    ),
    Decision(
        lambda f: _r(f).deficit is None, ModelStatus.UNKNOWN, Basis.BOUNDS,
        lambda f: f"input {f.layer} only bounded: rank {_r(f).rank_lower}..{_r(f).rank_upper} of {_r(f).unknowns}",
    ),
    Decision(
        lambda f: _r(f).deficit == 0 and f.path_ok and not f.value_known,
        ModelStatus.RECOVERABLE_GIVEN_PATTERN, Basis.NUMERICAL, _given_pattern_summary,
    ),
    Decision(
        lambda f: _r(f).deficit == 0 and f.path_ok and f.deficient > 0, ModelStatus.RECOVERABLE_JOINT, Basis.NUMERICAL,
        lambda f: (
            f"input recoverable in closed form, though {f.deficient} layer(s) are deficient "
            f"(total {f.total_deficit}): a solve that keeps only the known directions of each z pins it down"
        ),
    ),
    Decision(
        lambda f: _r(f).deficit == 0 and f.path_ok, ModelStatus.RECOVERABLE_LAYERWISE, Basis.NUMERICAL,
        lambda f: "input recoverable in closed form, layer by layer (R-GAP)",
    ),
    Decision(
        lambda f: _r(f).deficit == 0, ModelStatus.DEFICIENT, Basis.NUMERICAL,
        lambda f: f"the first layer's input is recoverable, but {f.why_path}",
    ),
    Decision(
        lambda f: True, ModelStatus.DEFICIENT, Basis.NUMERICAL,
        lambda f: (
            f"{_r(f).deficit} of {_r(f).unknowns} input directions undetermined in closed form (at {f.layer}); "
            f"the other {(_r(f).unknowns or 0) - (_r(f).deficit or 0)} are determined"
        ),
    ),
)


def _unit_name(rec: LayerRecord | None, first: str | None) -> str:
    """How the summary names the unit that reads the input: a layer, or a joint segment."""
    if rec is None:
        return ""
    if rec.kind == ops.SEGMENT:
        return f"joint segment {rec.node}" + (f" ({rec.module_path})" if rec.module_path else "")
    return f"layer {rec.module_path or first} ({rec.op})"


def decide(f: InputFacts) -> Decision:
    return next(d for d in DECISIONS if d.when(f))


def input_layer(inst: Instance, stops: dict[str, str] | None = None) -> tuple[str | None, bool, str]:
    """The weighted layer (or joint segment, `stops`) that reads the model input, whether the ops before
    it are invertible, and why not."""
    first, steps, why = input_chain(inst.graph, inst.env, stops)
    if first is None:
        return None, False, why
    lossy = [s.name for s in steps if not s.info.invertible]
    return first, not lossy, ("" if not lossy else f"the ops before it are not invertible ({', '.join(lossy)})")


def batch_span(inst: Instance, first: str, rec: LayerRecord) -> BatchSpan | None:
    """B > 1: the subspace the shared weight gradient of the layer reading the input reveals, measured on
    the instance (rgap_audit.span). A Linear: dL/dW = sum_n k_n x_n^T, its rows lie in span{x_n}: the
    numerical rank of dL/dW and each sample's relative distance to its row space. A 1-D or 2-D
    convolution without groups: dL/dW (C_out x C_in k) = sum_n sum_p k_n[:, p] patch_n(p)^T, its rows lie
    in the span of the batch's input patches: its rank and each patch's distance. A leak (RGAP404) is a
    row space that holds every sample (patch) and is a proper subspace of their space."""
    lg = inst.graph
    module = lg.node(first).module
    if module is None or getattr(module, "weight", None) is None or not module.weight.requires_grad:
        return None
    try:
        spec = lg.conv_spec(first)
    except (ValueError, TypeError):
        return None
    x = inst.values[lg.data_args(first)[0]].detach().to(torch.float64)
    if x.numel() != inst.batch * spec.n_in:
        return None
    k = inst.grads[first].detach().to(torch.float64)
    if spec.ndim == 0:
        x = x.reshape(inst.batch, spec.n_in)
        measured = row_space(k.reshape(inst.batch, -1).T @ x, x, seed=inst.seed)  # k^T x: the shared gradient of the weight
        if not measured.distances or measured.rank == 0:
            return None
        dist = max(measured.distances)
        leak = measured.rank == inst.batch < spec.n_in and dist <= SPAN_IN_TOL
        span = BatchSpan(rank=measured.rank, distance=float(f"{dist:.3g}"), samples=inst.batch, count=inst.batch, dims=spec.n_in, leak=leak)
    elif isinstance(spec, ConvSpec) and spec.ndim in (1, 2) and spec.groups == 1:
        x = x.reshape(inst.batch, *spec.in_shape)
        grad_w = spec.weight_grad(x, k.reshape(inst.batch, *spec.out_shape))
        patches = patch_space(grad_w.reshape(grad_w.shape[0], -1), (_patches(spec, x[n : n + 1]) for n in range(inst.batch)))
        if patches.rank == 0 or patches.count == 0:
            return None
        leak = patches.proper and patches.holds_every_patch
        span = BatchSpan(
            rank=patches.rank, distance=float(f"{patches.distance:.3g}"), samples=inst.batch,
            vectors="input patch", count=patches.count, dims=patches.dims, leak=leak,
        )  # fmt: skip
    else:
        return None
    rec.span = span
    return span


def _patches(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    """The input patches a 1-D or 2-D convolution reads from x (N, *in_shape), one row each (N P, C_in k),
    zero padding included, in the layout of the weight's flattened kernel."""
    if spec.ndim == 1:
        cols = F.unfold(
            x.unsqueeze(2), (1, spec.kernel[0]), dilation=(1, spec.dilation[0]), padding=(0, spec.padding[0]), stride=(1, spec.stride[0])
        )
    else:
        cols = F.unfold(x, spec.kernel, dilation=spec.dilation, padding=spec.padding, stride=spec.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def span_caveat(first: str, span: BatchSpan, batch: int) -> str:
    """The verdict's caveat when the span leaks (RGAP404)."""
    if span.vectors == "sample":
        return (
            f"With {batch} samples, the weight gradient of {first} spans a {span.rank}-dimensional "
            f"subspace that holds every sample (largest relative distance {span.distance:.1e}, measured): "
            "the batch's span leaks whatever the per-sample verdict."
        )
    return (
        f"With {batch} samples, the weight gradient of {first} spans a {span.rank}-dimensional subspace of its "
        f"{span.dims}-dimensional patch space that holds every one of the batch's {span.count} input patches "
        f"(largest relative distance {span.distance:.1e}, measured): the span of the patches leaks whatever the "
        "per-sample verdict."
    )


def model_verdict(inst: Instance, state: WalkState, records: list[LayerRecord]) -> ModelVerdict:
    """The verdict of the model from the walk's records (DECISIONS), with its caveats."""
    # units: weighted layers outside joint segments, and the segments (their inner rows are layer-wise only)
    layers = [r for r in records if r.kind in (ops.LAYER, ops.SEGMENT) and r.unknowns is not None and r.in_segment is None]
    deficient = [r for r in layers if r.verdict == Verdict.DEFICIENT]
    total_deficit = sum(r.deficit or 0 for r in deficient)
    not_understood = [r for r in records if r.verdict == Verdict.NOT_UNDERSTOOD]
    caveats = [CAVEAT_PATTERN]
    if inst.batch > 1:
        caveats.append(CAVEAT_BATCH.format(b=inst.batch))
    if deficient:
        caveats.append(CAVEAT_DEFICIT)
    first, path_ok, why_path = input_layer(inst, state.stops)
    rec = next((r for r in records if r.node == first), None) if first is not None else None
    lg = inst.graph
    for r in records:  # what the layer reads is the private input itself (RGAP201), not internal features (RGAP205)
        r.reads_input = r is rec or (r.kind == ops.EMBEDDING and lg.data_args(r.node)[:1] == [lg.input_node])
    if rec is not None and path_ok and inst.batch > 1:
        assert first is not None
        span = batch_span(inst, first, rec)
        if span is not None and span.leak:
            caveats.append(span_caveat(first, span, inst.batch))
    facts = InputFacts(
        rec=rec,
        layer=_unit_name(rec, first),
        path_ok=path_ok,
        why_path=why_path,
        value_known=state.val_known.get(inst.graph.input_node, False),
        deficient=len(deficient),
        total_deficit=total_deficit,
        batch=inst.batch,
    )
    row = decide(facts)
    status, summary = row.status, row.summary(facts)
    if not_understood:
        names = ", ".join(sorted({r.op for r in not_understood}))
        if status.input_recoverable is not True:
            status = ModelStatus.UNKNOWN
        summary += f"; not understood: {names} (never counted as safe)"
    return ModelVerdict(
        status=status,
        input_recoverable=status.input_recoverable,
        deficient_layers=len(deficient),
        total_deficit=total_deficit,
        input_deficit=None if rec is None else rec.deficit,
        basis=row.basis,
        summary=summary,
        caveats=caveats,
        attacker=ATTACKER_PER_SAMPLE if inst.batch > 1 else None,
    )
