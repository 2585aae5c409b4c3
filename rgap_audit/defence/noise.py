"""DP-SGD-style noise against the closed-form attack: the measured error against sigma, and what it was predicted to be.

The client clips its (per-sample: batch 1) gradient to norm C and adds Gaussian noise of standard deviation sigma * C
to every entry. The attack runs at log-spaced sigma, `seeds` noise draws each, until the error has exceeded the
threshold at two sigmas in a row. The prediction is the first-order worst case of the noiseless run: the relative
noise on layer l's gradient, nu_l sigma with nu_l = C sqrt(n_l) / |dL/dW_l|, grows through the attack's measured
gains as e_l = solve_gain_l (link_gain_l e_above + nu_l sigma) (verify.criterion's recursion with the noise in
place of the rounding), so it is linear in sigma and an upper bound to first order: below `sigma_stop_predicted`
the attack is not stopped. The prediction itself is measured in the linear regime: one probe per layer, noise on
that layer's gradient alone at a tiny sigma, gives the input error per unit sigma it causes; independent noise adds
in quadrature, so the predicted error at sigma is sigma x sqrt(sum of the squares), a straight line in log-log.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from rgap_audit.attack.engine import Reconstruction
from rgap_audit.defence.accountant import DELTA, ROUNDS, SAMPLE_RATE, privacy_cost
from rgap_audit.defence.attackrun import Outcome, attack, psnr
from rgap_audit.defence.gradients import clip_and_noise, global_norm
from rgap_audit.instance import Instance
from rgap_audit.records import LayerNoiseGain, Metrics, NoiseDefence, NoisePoint, Panel
from rgap_audit.verify.images import image_shaped, panel

THRESHOLD = 0.5
SEEDS = 3
SIGMAS = tuple(10.0**k for k in range(-9, 2))  # one per decade, 1e-9 .. 10
PROBE_FACTOR = 0.1  # the per-layer probes run at min(sigmas) x this: first order (linear) on every example
ABOVE_TO_STOP = 2  # sigmas in a row whose every seed exceeds the threshold end the sweep


def _layer_params(client: Instance, node: str) -> list[str]:
    return [n for n in client.graph.param_names(node) if n is not None and n in client.param_grads]


def _noise_on(client: Instance, names: list[str], clip_norm: float, sigma: float, seed: int) -> dict[str, torch.Tensor]:
    """The gradient with noise sigma * clip_norm on the parameters `names` only (the probes of one layer)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(client.param_grads)
    for n in names:
        g = client.param_grads[n]
        out[n] = g + (sigma * clip_norm) * torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.dtype)
    return out


def noise_gains(
    client: Instance, rec: Reconstruction, clip_norm: float, probe_sigma: float, clean_error: float | None = None
) -> tuple[list[LayerNoiseGain], float | None, float | None, int]:
    """Per weighted layer (output first): its noise-to-signal ratio at sigma = 1, the input error per unit sigma when
    only its gradient is noised (measured, one probe at probe_sigma) and the worst case of that from the gains.
    Returns the layers, the predicted input error per unit sigma (probes added in quadrature: independent noise),
    its worst case (the gains' recursion), and the attack runs the probes took."""
    steps = rec.layers
    nus: list[float | None] = []
    for s in steps:
        sub = {n: client.param_grads[n] for n in _layer_params(client, s.node)}
        norm = global_norm(sub) if sub else 0.0
        entries = sum(g.numel() for g in sub.values())
        nus.append(clip_norm * math.sqrt(entries) / norm if norm > 0 else None)
    # worst case: layer l's own relative noise reaches the input times solve_gain_l x prod below (link_gain x solve_gain)
    n = len(steps)
    bound: list[float | None] = [None] * n
    below = rec.input_gain
    for i in range(n - 1, -1, -1):
        s = steps[i]
        bound[i] = None if (below is None or s.solve_gain is None) else below * s.solve_gain
        if below is not None and s.solve_gain is not None and s.link_gain is not None:
            below = 0.0 if s.link_gain == 0 else below * s.solve_gain * s.link_gain
        else:
            below = None
    bound_total: float | None = 0.0
    for b, nu in zip(bound, nus):
        bound_total = None if bound_total is None or b is None or nu is None else bound_total + b * nu
    # measured: one probe per layer, noise on that layer's parameters only, in the linear regime
    per_sigma: list[float | None] = []
    runs = 0
    for i, s in enumerate(steps):
        names = _layer_params(client, s.node)
        if not names:
            per_sigma.append(None)
            continue
        out = attack(client, _noise_on(client, names, clip_norm, probe_sigma, int(client.seed) * 7919 + 101 + i))
        runs += 1
        # the noiseless run's own rounding error is independent of the probe's: taken out in quadrature (0: this layer's
        # effect is below that floor at the probe; probing harder leaves the linear regime on CNN6 from sigma ~ 1e-6)
        e = None if out.rel_error is None else math.sqrt(max(out.rel_error**2 - (clean_error or 0.0) ** 2, 0.0))
        per_sigma.append(None if e is None else e / probe_sigma)
    known = [p for p in per_sigma if p is not None]
    total = math.sqrt(sum(p * p for p in known)) if known and len(known) == len(per_sigma) else None
    gains = [
        LayerNoiseGain(
            node=s.node, module_path=s.module_path, solve_gain=s.solve_gain, link_gain=s.link_gain, noise_to_signal=nu,
            input_error_per_sigma=p, amplification=None if p is None or not nu else p / nu,
            bound_amplification=b, share=None if (p is None or not total) else (p / total) ** 2,
        )
        for s, nu, p, b in zip(steps, nus, per_sigma, bound)
    ]
    return gains, total, bound_total, runs


def _crossing(sigmas: list[float], errs: list[float | None], threshold: float) -> float | None:
    """The smallest sigma at which one seed's error exceeds the threshold, interpolated in log-log between the last
    sigma below and the first above (the first sigma itself when the error already exceeds there); None: never."""
    for i, e in enumerate(errs):
        if e is None or e > threshold:
            prev = errs[i - 1] if i > 0 else None
            if i == 0 or e is None or prev is None or prev <= 0:
                return sigmas[i]
            t = (math.log(threshold) - math.log(prev)) / (math.log(e) - math.log(prev))
            return math.exp(math.log(sigmas[i - 1]) + t * (math.log(sigmas[i]) - math.log(sigmas[i - 1])))
    return None


def _best_clean(client: Instance) -> tuple[Reconstruction | None, float | None]:
    """The noiseless run whose gains the prediction uses (the variant that recovered the input best), and its error."""
    out: Outcome = attack(client, client.param_grads)
    rec = out.reconstruction
    if rec is None:
        return None, None
    if rec.projected is not None and (rec.rel_error is None or (rec.projected.rel_error or math.inf) < rec.rel_error):
        return rec.projected, out.rel_error
    return rec, out.rel_error


def noise_defence(
    client: Instance,
    *,
    clip_norm: float | None = None,
    threshold: float = THRESHOLD,
    seeds: int = SEEDS,
    sigmas: tuple[float, ...] = SIGMAS,
    delta: float = DELTA,
    rounds: int = ROUNDS,
    sample_rate: float = SAMPLE_RATE,
) -> NoiseDefence:
    """The noise sweep on one client (batch 1): measured and predicted error against sigma, the sigma that stops the
    attack with its spread over seeds, its privacy cost, and each layer's noise amplification."""
    t0 = time.perf_counter()
    source = "--clip-norm" if clip_norm is not None else "the instance's gradient norm"
    c = float(clip_norm) if clip_norm is not None else global_norm(client.param_grads)
    probe = min(sigmas) * PROBE_FACTOR
    clean, clean_error = _best_clean(client)
    gains, slope, bound_slope, runs = noise_gains(client, clean, c, probe, clean_error) if clean is not None else ([], None, None, 0)
    runs += 1
    points: list[NoisePoint] = []
    per_seed: list[list[float | None]] = [[] for _ in range(seeds)]
    above = 0
    kept: list[tuple[float, float | None, torch.Tensor | None]] = []  # (sigma, error, reconstruction) of the first seed
    for sigma in sorted(sigmas):
        errs: list[float | None] = []
        psnrs: list[float | None] = []
        for j in range(seeds):
            gen = torch.Generator().manual_seed(int(client.seed) * 7919 + j)
            out = attack(client, clip_and_noise(client.param_grads, c, sigma, gen))
            runs += 1
            errs.append(out.rel_error)
            psnrs.append(out.psnr_db)
            if j == 0:
                kept.append((sigma, out.rel_error, out.best))
            per_seed[j].append(out.rel_error)
        known = [e for e in errs if e is not None]
        med = statistics.median([math.inf if e is None else e for e in errs]) if errs else None
        points.append(NoisePoint(sigma, errs, psnrs, med if med is None or math.isfinite(med) else None,
                                 None if slope is None else slope * sigma, None if bound_slope is None else bound_slope * sigma))
        above = above + 1 if (len(known) == len(errs) and all(e > threshold for e in known)) or not known else 0
        if above >= ABOVE_TO_STOP:
            break
    swept = [p.sigma for p in points]
    crossings = [_crossing(swept, errs, threshold) for errs in per_seed]
    found = [x for x in crossings if x is not None]
    stop = statistics.median(found) if len(found) == len(crossings) and found else None
    predicted = None if not slope else threshold / slope
    bound = None if not bound_slope else threshold / bound_slope
    cost = privacy_cost(stop, delta=delta, rounds=rounds, sample_rate=sample_rate) if stop is not None else None
    if stop is None:
        summary = f"the attack's relative error stayed at or below {threshold:g} up to sigma = {swept[-1]:.2g} on some noise draw"
    else:
        eps = "n/a" if cost is None or cost.epsilon_one_release is None else f"{cost.epsilon_one_release:.3g}"
        summary = (
            f"R-GAP's relative error exceeds {threshold:g} from sigma = {stop:.2g} (over {seeds} noise draws "
            f"{min(found):.2g} .. {max(found):.2g}; clip norm {c:.3g}, {source}); epsilon at delta = {delta:g}: {eps} for one release"
        )
        if cost is not None and cost.epsilon_rounds is not None:
            summary += f", {cost.epsilon_rounds:.3g} for {rounds} rounds at sampling rate {sample_rate:g}"
        if predicted is not None:
            summary += f"; predicted (first order, per-layer probes): {predicted:.2g}"
        if bound is not None:
            summary += f"; the worst case from the attack's gains keeps the error below the threshold up to sigma = {bound:.2g} only"
    result = NoiseDefence(
        clip_norm=c, clip_norm_source=source, threshold=threshold, seeds=seeds, points=points, sigma_stop=stop,
        sigma_stop_low=min(found) if stop is not None else None, sigma_stop_high=max(found) if stop is not None else None,
        sigma_stop_predicted=predicted, sigma_stop_bound=bound, probe_sigma=probe, privacy=cost, layers=gains, attack_runs=runs,
        seconds=time.perf_counter() - t0, summary=summary,
    )
    if image_shaped(client.input_shape):
        result.panels = _panels(client, kept, threshold)
    return result


def _panels(client: Instance, kept: list[tuple[float, float | None, torch.Tensor | None]], threshold: float) -> list[Panel]:
    """Reconstructions at three noise levels of the sweep: the last sigma below the threshold, the first above it,
    and the one before the last below (first noise draw each)."""
    got = [(s, e, r) for s, e, r in kept if r is not None and e is not None]
    first_above = next((i for i, (_, e, _) in enumerate(got) if e > threshold), len(got))
    chosen = sorted({max(first_above - 2, 0), max(first_above - 1, 0), min(first_above, len(got) - 1)}) if got else []
    out = []
    for i in chosen:
        sigma, err, rec = got[i]
        assert rec is not None and err is not None
        m = Metrics(rel_error=err, mse=0.0, psnr_db=psnr(client.x, rec))
        out.append(panel(f"sigma = {sigma:.1g}", client.x, rec, m))
    return out
