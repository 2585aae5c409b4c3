"""--verify-seeds N: the attack on N inputs, since one seeded input is a single sample of a claim about an
architecture. The first run is the audited instance; run j draws its input and labels as the instance does, from a
generator seeded with seed + j (same weights). The verdict is confirmed only when every run confirms it, and a
verdict that holds on some inputs and not others says so."""

from __future__ import annotations

import math
import statistics

import torch

from rgap_audit.instance import Instance, seeded_input
from rgap_audit.losses import make_labels
from rgap_audit.records import Verification, VerifyRun


def seeded_clients(client: Instance, n: int) -> list[tuple[int, Instance]]:
    """The N - 1 further clients: the same graph and weights on inputs seeded with client.seed + 1, + 2, ..."""
    out = []
    for j in range(1, n):
        seed = int(client.seed) + j
        gen = torch.Generator().manual_seed(seed)
        x = seeded_input(client.loaded, client.input_shape, client.batch, gen)
        labels = make_labels(client.loss, client.batch, client.out_features, gen)
        out.append((seed, client.replay(x, labels)))
    return out


def as_run(seed: int | None, v: Verification) -> VerifyRun:
    """One run's outcome."""
    return VerifyRun(
        seed=seed, confirmed=v.confirmed, rel_error=v.rel_error, psnr_db=v.psnr_db, ssim=v.ssim, leak=v.leak,
        within_conditioning=v.within_conditioning, predicted_error=v.predicted_error, error_entered_at=v.error_entered_at,
        variant=v.variant, summary=v.summary,
    )


def _stats(runs: list[VerifyRun], first: Verification) -> str:
    """Median and worst over the runs, in one sentence."""
    seeds = ", ".join(str(r.seed) for r in runs)
    if first.worst_rel_error is None:
        return f" On all {len(runs)} inputs (seeds {seeds}) the attack reconstructed no input."
    text = f" Over {len(runs)} inputs (seeds {seeds}): relative error median {first.median_rel_error:.2g}, worst {first.worst_rel_error:.2g}"
    psnr = "inf" if first.worst_psnr_db is None else f"{first.worst_psnr_db:.1f}"
    text += f"; worst PSNR {psnr} dB" + ("" if first.worst_ssim is None else f", worst SSIM {first.worst_ssim:.3f}")
    return text + "."


def combine(results: list[tuple[int | None, Verification]]) -> Verification:
    """The first run's record, with every run, the median and worst errors, and the verdict over all runs."""
    first = results[0][1]
    if not first.attempted:
        return first
    runs = [as_run(seed, v) for seed, v in results]
    first.runs = runs
    if len(runs) == 1:
        first.worst_rel_error = first.median_rel_error = first.rel_error
        first.worst_psnr_db, first.worst_ssim = first.psnr_db, first.ssim
        return first
    errs = [math.inf if r.rel_error is None else r.rel_error for r in runs]  # no input reconstructed: the worst
    if all(r.rel_error is None for r in runs):
        first.median_rel_error = first.worst_rel_error = None
    else:
        first.median_rel_error, first.worst_rel_error = float(statistics.median(errs)), max(errs)
    psnrs = [r.psnr_db for r in runs if r.psnr_db is not None]
    first.worst_psnr_db = min(psnrs) if psnrs else None  # None: every run an exact copy
    ssims = [r.ssim for r in runs]
    first.worst_ssim = None if any(s is None for s in ssims) else min(s for s in ssims if s is not None)
    first.leak = all(r.leak is True for r in runs)
    within = [r.within_conditioning for r in runs]
    first.within_conditioning = False if False in within else (True if all(w is True for w in within) else None)
    bad = next((r for r in runs if r.within_conditioning is False), None)
    first.error_entered_at = None if bad is None else bad.error_entered_at
    values = [r.confirmed for r in runs]
    combined = True if all(c is True for c in values) else (False if False in values else None)
    first.confirmed = combined
    if len(set(values)) == 1:
        first.summary = first.summary + _stats(runs, first)
    else:
        odd = next(r for r in runs if r.confirmed is not True and r.confirmed == combined)
        held = [str(r.seed) for r in runs if r.confirmed is True]
        head = "Not confirmed" if combined is False else "Not confirmed either way"
        first.summary = (
            f"{head} on every input: the static verdict is confirmed on {len(held)} of {len(runs)} inputs "
            f"(seed{'s' if len(held) != 1 else ''} {', '.join(held) or 'none'}) and not on seed {odd.seed}: {odd.summary}"
            + _stats(runs, first)
        )
    first.given_pattern = sorted({g for _s, v in results for g in v.given_pattern})
    seen = set(first.warnings)
    for seed, v in results[1:]:
        for w in v.warnings:
            if w not in seen:
                seen.add(w)
                first.warnings.append(f"seed {seed}: {w}")
    return first
