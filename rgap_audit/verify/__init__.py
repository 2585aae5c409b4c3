"""`--verify`: attack the audited instance with closed-form R-GAP and compare with the static verdict.

    client   the instance attacked: the audited one, or another --input / --weights on the same graph
    inputs   reading --input (tensor or image) and --weights (a state dict, weights_only=True)
    metrics  relative error, MSE / PSNR, nearest candidate, combination of samples
    images   the comparison PNGs of --save-images
    single   B = 1: per-layer errors and the verdict sentence
    batch    B > 1: R-GAP on the summed gradient, per-sample errors, combination, span leak

`verify` returns a Verification record; `settle` returns the model verdict that record implies (a new
ModelVerdict: the static one is never edited). May import: attack, instance, links, records, span.
"""

from __future__ import annotations

from dataclasses import replace

from rgap_audit.analysis import Audit
from rgap_audit.attack.engine import INTEGER_INPUT
from rgap_audit.records import Basis, ModelStatus, ModelVerdict, Verification
from rgap_audit.threads import single_thread
from rgap_audit.tolerances import EXACT
from rgap_audit.verify.batch import verify_batch
from rgap_audit.verify.client import client_instance
from rgap_audit.verify.single import verify_single

__all__ = ["settle", "verify"]


def verify(
    audit: Audit,
    *,
    input: str | None = None,
    weights: str | None = None,
    save_images: str | None = None,
    debug: bool = False,
) -> Verification:
    """Attack the audited model with closed-form R-GAP and compare with the audit's static verdict.

    Bad input (a checkpoint that does not match, an input of the wrong shape, NaN/Inf gradients) raises
    AuditError; an attack that does not handle the model returns attempted=False with the reason.
    """
    if not audit.instance.x.is_floating_point():  # token ids: a limit of the attack, before any batch-1 view is built
        return Verification(attempted=False, confirmed=None, summary=f"Not attempted: {INTEGER_INPUT}.")
    with single_thread():
        client = client_instance(audit.instance, input, weights)
        if client.batch > 1:
            return verify_batch(client, audit.report, input, weights, save_images, debug)
        result = verify_single(client, audit.report, input, weights, save_images)
    if _demonstrated(audit.report.verdict, result, client.batch):
        was = audit.report.verdict.status.value
        result.settled = f"verdict {was} -> recoverable-verified: the attack recovered the input"
    return result


def _demonstrated(verdict: ModelVerdict, result: Verification, batch: int) -> bool:
    """One sample's input recovered although the static verdict did not say it would be."""
    return batch == 1 and result.rel_error is not None and result.rel_error <= EXACT and verdict.input_recoverable is not True


def settle(verdict: ModelVerdict, result: Verification, batch: int = 1) -> ModelVerdict:
    """The model verdict once the attack has been measured.

    A confirmation adds `verified` to what the verdict rests on. At B = 1, a recovered input the static
    verdict did not predict (undecided, or deficient) is a demonstrated leak, which outranks the analysis:
    the status becomes recoverable-verified and the summary keeps what the analysis said.
    """
    out = verdict
    if result.confirmed is True:
        out = replace(out, basis=Basis.VERIFIED)
    if _demonstrated(verdict, result, batch):
        was = verdict.status.value
        out = replace(
            out,
            status=ModelStatus.RECOVERABLE_VERIFIED,
            input_recoverable=True,
            basis=Basis.VERIFIED,
            summary=(
                f"the closed-form attack recovered the input of the seeded instance (relative error {result.rel_error:.2g}, "
                f"--verify); the static analysis alone said {was}: {verdict.summary}"
            ),
        )
    return out
