"""`--verify`: attack the audited instance with closed-form R-GAP and compare with the static verdict.

    client   the instance attacked: the audited one, or another --input / --weights on the same graph
    inputs   reading --input (tensor or image) and --weights (a state dict, weights_only=True)
    metrics  relative error, MSE / PSNR / SSIM, nearest candidate, combination of samples
    images   the comparison PNGs of --save-images
    criterion  what "recovered" means: the error against what the measured conditioning allows, and the
               privacy-leak thresholds (PSNR, SSIM) in the reader's units
    judge    B = 1: whether one run confirms the static verdict, and the sentence saying so
    single   B = 1: one run of the attack, per-layer errors next to the predicted ones
    seeds    --verify-seeds N: the runs on N inputs, median and worst, the verdict over all of them
    batch    B > 1: R-GAP on the summed gradient, per-sample errors, combination, span leak

`verify` returns a Verification record; `settle` returns the model verdict that record implies (a new
ModelVerdict: the static one is never edited). May import: attack, instance, links, records, span.
"""

from __future__ import annotations

from dataclasses import replace

from rgap_audit.analysis import Audit
from rgap_audit.attack.engine import INTEGER_INPUT
from rgap_audit.records import Basis, Criterion, ModelStatus, ModelVerdict, Verification
from rgap_audit.threads import single_thread
from rgap_audit.tolerances import VERIFY_SEEDS
from rgap_audit.verify.batch import verify_batch
from rgap_audit.verify.client import client_instance
from rgap_audit.verify.criterion import make_criterion
from rgap_audit.verify.seeds import combine, seeded_clients
from rgap_audit.verify.single import verify_single

__all__ = ["make_criterion", "settle", "verify"]


def verify(
    audit: Audit,
    *,
    input: str | None = None,
    weights: str | None = None,
    save_images: str | None = None,
    debug: bool = False,
    seeds: int = VERIFY_SEEDS,
    criterion: Criterion | None = None,
) -> Verification:
    """Attack the audited model with closed-form R-GAP and compare with the audit's static verdict.

    seeds: at B = 1, the attack runs on the audited input and on seeds - 1 further seeded random inputs (one run
    with --input); the verdict is confirmed only when every run confirms it. criterion: what counts as recovered
    (make_criterion(); the defaults of rgap_audit.tolerances when None).
    Bad input (a checkpoint that does not match, an input of the wrong shape, NaN/Inf gradients) raises
    AuditError; an attack that does not handle the model returns attempted=False with the reason.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    crit = criterion or make_criterion()
    if not audit.instance.x.is_floating_point():  # token ids: a limit of the attack, before any batch-1 view is built
        return Verification(attempted=False, confirmed=None, summary=f"Not attempted: {INTEGER_INPUT}.")
    with single_thread():
        client = client_instance(audit.instance, input, weights)
        if client.batch > 1:
            result = verify_batch(client, audit.report, input, weights, save_images, debug)
            if seeds > 1:
                result.warnings.append("--verify-seeds: a batch is verified on the audited instance only")
            return result
        first = verify_single(client, audit.report, input, weights, save_images, crit)
        runs: list[tuple[int | None, Verification]] = [(None if input else client.seed, first)]
        if first.attempted and not input:
            for seed, other in seeded_clients(client, seeds):
                runs.append((seed, verify_single(other, audit.report, None, weights, None, crit)))
        elif input and seeds > 1:
            first.warnings.append("--verify-seeds: --input gives one input; the further runs use seeded random inputs only")
        result = combine(runs)
    if _demonstrated(audit.report.verdict, result, client.batch):
        was = audit.report.verdict.status.value
        result.settled = f"verdict {was} -> recoverable-verified: the attack recovered the input on every run, as a privacy leak"
    return result


def _demonstrated(verdict: ModelVerdict, result: Verification, batch: int) -> bool:
    """At B = 1, every run's input came back as a privacy leak although the static verdict did not say it would."""
    return (
        batch == 1
        and result.attempted
        and result.leak is True
        and verdict.input_recoverable is not True
        and not result.given_pattern  # solved at the true patterns: what the analysis assumed, not a demonstration
    )


def settle(verdict: ModelVerdict, result: Verification, batch: int = 1) -> ModelVerdict:
    """The model verdict once the attack has been measured.

    A confirmation adds `verified` to what the verdict rests on. At B = 1, an input recovered as a privacy leak on
    every run that the static verdict did not predict (undecided, or deficient) is a demonstrated leak, which outranks the analysis:
    the status becomes recoverable-verified and the summary keeps what the analysis said.
    """
    out = verdict
    if result.confirmed is True:
        out = replace(out, basis=Basis.VERIFIED)
    if _demonstrated(verdict, result, batch):
        was = verdict.status.value
        n = max(1, len(result.runs))
        worst = result.worst_rel_error if result.worst_rel_error is not None else result.rel_error
        psnr = result.worst_psnr_db if result.runs else result.psnr_db
        out = replace(
            out,
            status=ModelStatus.RECOVERABLE_VERIFIED,
            input_recoverable=True,
            basis=Basis.VERIFIED,
            summary=(
                f"the closed-form attack recovered the input on {'every one of ' if n > 1 else ''}{n} input{'s' if n > 1 else ''} "
                f"as a privacy leak (worst relative error {worst:.2g}, worst PSNR {'inf' if psnr is None else f'{psnr:.1f}'} dB; "
                f"--verify); the static analysis alone said {was}: {verdict.summary}"
            ),
        )
    return out
