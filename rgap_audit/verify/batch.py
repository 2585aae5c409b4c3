"""--verify with a batch (B > 1): R-GAP as deployed, unaware of B, on the summed gradient of B samples.

The reconstruction is measured against every sample (errors, the nearest sample, the least-squares
combination of the samples that fits it best), and, when the model input reaches a Linear through
reshapes only, the span leak: the rows of that layer's weight gradient sum_n k_n x_n^T lie in span{x_n}.
"""

from __future__ import annotations

import math
import time

import torch

from rgap_audit import ops
from rgap_audit.attack.engine import Reconstruction, attack_graph
from rgap_audit.errors import AttackUnsupported, AuditError
from rgap_audit.instance import Instance, record
from rgap_audit.links import input_chain
from rgap_audit.records import Combination, Metrics, ModelReport, SampleError, SpanLeak, Verification, VerifiedLayer
from rgap_audit.span import RULE as SPAN_RULE
from rgap_audit.span import row_space
from rgap_audit.threads import single_thread
from rgap_audit.tolerances import COMBINATION_TOL, EXACT, SPAN_IN_TOL, SPAN_RTOL
from rgap_audit.verify.images import image_shaped, panel, write_figure
from rgap_audit.verify.metrics import combination_fit, image_metrics


def candidates(rec: Reconstruction) -> list[tuple[str, torch.Tensor]]:
    """Every input the engine returned: plain, its equally consistent alternatives, the projected variant's."""
    out: list[tuple[str, torch.Tensor]] = []
    for tag, r in (("plain", rec), ("projected", rec.projected)):
        if r is None or r.input is None:
            continue
        out.append((tag, r.input))
        out.extend((f"{tag} alternative {i}", a) for i, a in enumerate(r.alternatives, 1))
    return out


def span_leak(client: Instance) -> tuple[SpanLeak | None, str | None]:
    """Rank of the first Linear's weight gradient dL/dW = sum_n k_n x_n^T and each sample's distance to its row space.

    A classical fact, measured: the rows of dL/dW lie in span{x_n}, so the gradient reveals the subspace
    the batch spans. Returns (result, None), or (None, why it was skipped).
    """
    lg = client.graph
    node, steps, why = input_chain(lg, client.env)
    if node is None:
        if why == "the input feeds several branches":
            n = len(lg.consumers(lg.input_node))
            return None, f"the model input feeds {n} operations, not one chain into a Linear"
        last = steps[-1].node if steps else lg.output_node
        return None, f"the model input reaches {last} before any weighted layer ({why})"
    stop = next((s for s in steps if s.role != ops.PASS), None)
    if stop is not None:
        return None, f"the model input reaches {stop.node} ({stop.name}) before any weighted layer"
    gn = lg.node(node)
    spec = lg.conv_spec(node)
    if spec.ndim != 0:
        return None, (
            f"the first weighted layer {node} ({gn.info.name}) is not a Linear: its weight gradient combines patches "
            "of the samples, not whole samples"
        )
    rows = math.prod((gn.in_shape or ())[1:]) // spec.n_in
    if rows != 1:
        return None, f"the first Linear {node} reads {rows} rows per sample: its gradient rows lie in the span of those rows"
    wname, _ = lg.param_names(node)
    if wname is None:
        return None, f"the first Linear {node}'s weight is not a parameter of the model"
    g = client.param_grads.get(wname)
    if g is None:
        return None, f"the first Linear {node}'s weight is frozen: the client shares no gradient for it"
    G = g.detach().to(torch.float64)
    if gn.info.param_transposed and G.dim() == 2:
        G = G.T  # x @ W: the parameter is (in, out)
    G = G.reshape(-1, spec.n_in)
    samples = client.x
    X = samples.reshape(samples.shape[0], -1).to(torch.float64)
    with single_thread():
        measured = row_space(G, X)
    rank, dist = measured.rank, measured.distances
    inside = measured.holds_every_sample
    B = X.shape[0]
    where = gn.module_path or node
    if inside:
        sentence = (
            f"The weight gradient of {where}, the first layer, has numerical rank {rank} and every sample lies "
            f"within {max(dist):.1g} (relative) of its row space: the shared gradient reveals the subspace spanned by "
            f"the {B} samples" + (", exactly" if rank == B else "") + "."
        )
    else:
        sentence = (
            f"The weight gradient of {where}, the first layer, has numerical rank {rank}; the samples lie at relative "
            f"distance up to {max(dist):.2g} from its row space, so it does not reveal the span of the batch."
        )
    return SpanLeak(
        layer=node,
        module_path=gn.module_path,
        parameter=wname,
        weight_gradient_shape=list(G.shape),
        numerical_rank=rank,
        rank_rtol=SPAN_RTOL,
        rank_rule=SPAN_RULE,
        singular_values_rel=measured.singular_values_rel[: B + 2],
        distance_rel=dist,
        in_row_space_tol=SPAN_IN_TOL,
        all_in_row_space=inside,
        summary=sentence,
    ), None


def measured_outcome(per_sample: list[SampleError], nearest: int | None, comb: Combination | None, reason: str | None) -> str:
    """What R-GAP recovered from the summed gradient, in one clause."""
    if nearest is None:
        return f"R-GAP produced no input from the summed gradient ({reason})"
    rec = [p for p in per_sample if p.recovered]
    near = per_sample[nearest]
    if rec:
        return "R-GAP recovered " + ", ".join(f"sample {p.sample} (relative error {p.rel_error:.2g})" for p in rec)
    if comb is not None and comb.combination:
        coefs = ", ".join(f"{c:.3g}" for c in comb.coefficients)
        return (
            f"R-GAP recovered a combination of the samples (coefficients {coefs}; relative residual "
            f"{comb.residual_rel:.2g}), none of them individually (nearest: sample {nearest}, relative error "
            f"{near.rel_error:.2g})"
        )
    if comb is not None and comb.fills_input_space:
        return (
            f"R-GAP recovered no sample (nearest: sample {nearest}, relative error {near.rel_error:.2g}); the "
            f"{len(per_sample)} samples span the whole input space, so being a combination of them says nothing"
        )
    res = "n/a" if comb is None or comb.residual_rel is None else f"{comb.residual_rel:.2g}"
    return (
        f"R-GAP recovered neither a sample nor a combination of them (nearest: sample {nearest}, relative error "
        f"{near.rel_error:.2g}; least-squares combination residual {res})"
    )


def judge_batch(report: ModelReport, batch: int, per_sample: list[SampleError], outcome: str, produced: bool) -> tuple[bool | None, str]:
    """Whether the batch experiment confirms the static verdict, and one plain sentence saying so."""
    v = report.verdict.input_recoverable
    recovered = [p for p in per_sample if p.recovered]
    if v is False:
        if recovered:
            return False, f"Not confirmed: the analysis predicts no closed-form recovery, yet {outcome} from the summed gradient of {batch} samples."
        if not produced:
            return None, f"Not confirmed either way: {outcome}; the analysis predicts no closed-form recovery."
        return True, (
            f"Confirmed: the analysis predicts no closed-form recovery, and from the summed gradient of {batch} samples "
            f"{outcome}."
        )
    said = "could not decide" if v is None else "predicts recovery"
    return None, (
        f"Not a confirmation either way: the analysis {said}, but R-GAP on a summed gradient returns one input, so it "
        f"cannot confirm recovery of {batch} samples; {outcome}."
    )


def verify_batch(
    client: Instance, report: ModelReport, input: str | None, weights: str | None, save_images: str | None, debug: bool
) -> Verification:
    """R-GAP as deployed (it does not know B) on the summed gradient of the client's B samples."""
    name = client.loaded.name
    batch, shape, x, labels, loss = client.batch, client.input_shape, client.x, client.labels, client.loss
    graph = client.single_sample()
    env = record(graph, x[:1], None).env  # the constants of a one-sample run
    warnings: list[str] = []
    rec: Reconstruction | None = None
    status, reason = "reconstructed", None
    t0 = time.perf_counter()
    try:
        rec = attack_graph(graph, env, client.param_grads, shape, loss)
    except AttackUnsupported as err:
        return Verification(attempted=False, confirmed=None, summary=f"Not attempted: {err.cause}.")
    except AuditError as err:
        # the heads' consistency checks (ValueError, re-raised as "head <node>: ...") fail on gradients that no
        # single sample produces: a measured outcome of the batch. Everything else is about the model: re-raise.
        if not (isinstance(err.__cause__, ValueError) and str(err.cause).startswith("head ")):
            err.model = err.model or name
            raise
        status, reason = "refused", str(err.cause)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if debug:  # --debug: the traceback, not a recorded outcome
            raise
        # the engine is written for one sample's gradient; a crash on a summed one is reported, not hidden
        status, reason = "engine-error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        warnings.append(
            f"the reconstruction engine raised {type(exc).__name__} on the summed gradient: a defect of the engine on a "
            "gradient no single sample produces, recorded here as the attack's outcome"
        )
    wall = time.perf_counter() - t0
    if status in ("refused", "engine-error") and loss == "cross-entropy":
        # what the head sees, from the outputs: R-GAP reads the label as the ONE negative entry
        out = client.values[next(iter(client.graph.data_args(client.graph.output_node)))].reshape(batch, -1)
        k = torch.softmax(out, dim=1) - torch.nn.functional.one_hot(labels, out.shape[1]).to(torch.float64)
        neg = int((k.sum(0) < 0).sum())
        if neg != 1:
            why = (
                f"the summed output gradient dL/dz has {neg} negative entries, so the label R-GAP reads from it "
                "(the one negative entry, for one sample) is undefined"
            )
            reason = f"{reason} ({why})" if status == "refused" else f"{why}; the engine then stopped with {reason}"
    if rec is not None:
        warnings.extend(rec.warnings)
        if rec.projected is not None:
            warnings.extend(f"projected variant: {w}" for w in rec.projected.warnings)
    cands = candidates(rec) if rec is not None else []
    if rec is not None and not cands:
        status, reason = "no-input", "; ".join(rec.warnings[-1:]) or "the walk did not reach the input"
    per_sample: list[SampleError] = []
    nearest_rec: list[torch.Tensor] = []
    for n in range(batch):
        xn = x[n : n + 1]
        if not cands:
            per_sample.append(SampleError(n, labels[n].item(), None, None, None, None, False))
            continue
        errs = [float((c.reshape(xn.shape) - xn).norm()) for _, c in cands]
        i = min(range(len(cands)), key=errs.__getitem__)
        m = image_metrics(xn, cands[i][1].reshape(xn.shape))
        nearest_rec.append(cands[i][1])
        per_sample.append(SampleError(n, labels[n].item(), m.rel_error, m.mse, m.psnr_db, cands[i][0], m.rel_error <= EXACT))
    nearest = None if not cands else min(range(batch), key=lambda n: per_sample[n].rel_error or math.inf)

    comb: Combination | None = None
    if cands:
        with single_thread():
            fits = [(combination_fit(x, c), tag) for tag, c in cands]
        # the candidate best explained by the samples (an all-zero reconstruction has no residual: ranked last)
        fit, tag = min(fits, key=lambda ft: math.inf if ft[0].residual_rel is None else ft[0].residual_rel)
        fit.candidate = tag
        fit.tolerance = COMBINATION_TOL
        fit.combination = fit.residual_rel is not None and fit.residual_rel <= COMBINATION_TOL and not fit.fills_input_space
        if fit.fills_input_space:
            warnings.append(
                f"the {batch} samples span all {math.prod(shape)} input directions: every vector is a combination of "
                "them, so the combination fit says nothing"
            )
        comb = fit

    leak, leak_why = span_leak(client)
    outcome = measured_outcome(per_sample, nearest, comb, reason)
    confirmed, sentence = judge_batch(report, batch, per_sample, outcome, bool(cands))
    best = per_sample[nearest] if nearest is not None else None
    result = Verification(
        attempted=True,
        confirmed=confirmed,
        summary=sentence,
        batch_size=batch,
        input=input or f"{batch} seeded uniform [0,1) random inputs (seed {client.seed})",
        weights=weights or "as constructed",
        loss=loss,
        attack="closed-form R-GAP on the summed gradient, unaware of the batch size (as deployed)",
        outcome=status,
        reason=reason,
        rel_error=None if best is None else best.rel_error,
        mse=None if best is None else best.mse,
        psnr_db=None if best is None else best.psnr_db,
        scaling=(
            "per sample: MSE and PSNR after mapping that sample's [min, max] to [0, 1], PSNR peak 1.0; the top-level "
            "rel_error / mse / psnr_db are those of the nearest sample"
        ),
        seconds=wall,
        tolerance=EXACT,
        labels=labels.tolist(),
        label_recovered=None if rec is None else rec.label,
        label_status=None if rec is None else rec.label_status,
        candidates=len(cands),
        per_sample=per_sample,
        nearest_sample=nearest,
        combination=comb,
        span_leak=leak,
        span_leak_reason=leak_why,
        warnings=warnings,
    )
    if rec is not None:  # what the attack found per layer (no truth per layer: the batch has B inputs)
        result.layers = [
            VerifiedLayer(
                node=s.node, module_path=s.module_path, op=s.op, static_verdict=None, static_deficit=None,
                measured_nullity=s.nullity_given_pattern if s.nullity_given_pattern is not None else s.nullity,
                measured_nullity_without_pattern=s.nullity, rel_error=None, method=s.method, residual_grad=s.residual_grad,
                residual_fwd=s.residual_fwd,
            )
            for s in rec.layers
        ]
    if image_shaped(shape) and nearest_rec:
        result.panels = []
        for n, r in enumerate(nearest_rec):
            p = per_sample[n]
            m = Metrics(p.rel_error or 0.0, p.mse or 0.0, p.psnr_db)
            result.panels.append(panel(f"sample {n} (nearest candidate: {p.candidate})", x[n], r, m))
    if save_images:
        if result.panels:
            title = f"{client.loaded.name}: R-GAP on the summed gradient of {batch} samples"
            result.image = write_figure(save_images, client.loaded, f".batch{batch}", result.panels, title)
        else:
            result.warnings.append("no image written: the input is not image-shaped (C in 1 or 3, H, W) or no input was reconstructed")
    return result

