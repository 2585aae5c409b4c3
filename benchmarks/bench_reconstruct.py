"""Closed-form R-GAP against a DLG-style optimisation baseline, on the same models, inputs and gradients.

For CNN6, CNN6-d and FCN3 (examples/paper_nets.py, random init, seeded uniform [0,1) input, float64):
time and MSE of rgap_audit.attack.reconstruct (warm: one untimed run first, then the median of
--repeats runs; the cold first run is printed too) and of rgap_audit.attack.dlg (L-BFGS on the
gradient distance, label given, bounded by --budget seconds), then the ratios.

MSE is computed after mapping the original input's [min, max] to [0, 1] (PSNR peak 1.0). Where the
baseline never reaches our MSE within its budget the speed ratio is a lower bound, printed with '>='.

    python benchmarks/bench_reconstruct.py [--budget 60] [--repeats 3] [--models CNN6,FCN3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from examples.paper_nets import cnn6, cnn6_d, fcn3
from rgap_audit.attack import reconstruct
from rgap_audit.attack.dlg import dlg
from rgap_audit.losses import client_gradient
from rgap_audit.threads import single_thread
from rgap_audit.verify.metrics import image_metrics

MODELS = {"CNN6": (cnn6, (3, 32, 32)), "CNN6-d": (cnn6_d, (3, 32, 32)), "FCN3": (fcn3, (1, 28, 28))}


def _mse(x, x_rec):
    return image_metrics(x, x_rec).mse


def _ours(model, grads, shape, x, repeats):
    t = time.perf_counter()
    rec = reconstruct(model, grads, shape, "logistic", true_input=x)
    cold = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        rec = reconstruct(model, grads, shape, "logistic")
        times.append(time.perf_counter() - t)
    best = rec.best()
    cands = [c for c in [best.input, *best.alternatives] if c is not None]
    mse = min(_mse(x, c) for c in cands) if cands else float("nan")
    plain = min(_mse(x, c) for c in [rec.input, *rec.alternatives]) if rec.input is not None else float("nan")
    return {"cold": cold, "warm": statistics.median(times), "mse": mse, "mse_plain": plain, "variant": best.variant,
            "ambiguous": len(cands) > 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of L-BFGS for the baseline, per model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; float64; seed {args.seed}; baseline budget {args.budget:g} s per model")
    print("ours: closed-form R-GAP (best of plain / projected variant by the attacker's own gradient check)")
    print("DLG: L-BFGS on |g(x') - g|^2, label given, random normal start\n")
    rows = []
    for name in args.models.split(","):
        factory, shape = MODELS[name]
        torch.manual_seed(args.seed)
        model = factory()
        g = torch.Generator().manual_seed(args.seed)
        x = torch.rand((1, *shape), generator=g, dtype=torch.float64)
        # label -1 with a positive margin would give the logistic two-root case: in these positively
        # homogeneous nets x and c*x then give the same gradient; the MSE below is that of the closest
        with torch.no_grad():
            label = 1.0 if float(model.double()(x)) < 0 else -1.0
        model = model.float()
        grads = client_gradient(model, x, "logistic", torch.tensor([label], dtype=torch.float64))
        ours = _ours(model, grads, shape, x, args.repeats)
        with single_thread():
            base = dlg(model, grads, shape, "logistic", label, budget_s=args.budget, seed=args.seed, true_input=x, mse_fn=_mse)
        reach = next((t for t, _, m in base.history if m <= ours["mse"]), None)
        base_mse = base.history[-1][2] if base.history else float("nan")
        plateau = next((t for t, _, m in base.history if m <= 1.01 * base_mse), float("nan"))
        best_base = min((m for _, _, m in base.history), default=float("nan"))
        rows.append((name, ours, base, reach, base_mse, best_base))
        ratio = (f"{reach / ours['warm']:.0f}x" if reach is not None else f">= {base.seconds / ours['warm']:.0f}x")
        print(f"{name}: ours {ours['warm']*1e3:.0f} ms warm ({ours['cold']*1e3:.0f} ms cold), MSE {ours['mse']:.2e} "
              f"[{ours['variant']}; plain R-GAP MSE {ours['mse_plain']:.2e}]")
        print(f"{'':{len(name)}}  DLG  {base.seconds:.1f} s, {base.iterations} L-BFGS steps / {base.evaluations} evaluations "
              f"({base.stopped}), final MSE {base_mse:.2e} (within 1% of it after {plateau:.1f} s), best {best_base:.2e}, "
              f"gradient distance {base.grad_distance:.2e}")
        print(f"{'':{len(name)}}  time to DLG's final MSE or better: ours {ours['warm']*1e3:.0f} ms; "
              f"speed-up at equal or better MSE: {ratio}; MSE ratio DLG/ours: {base_mse / max(ours['mse'], 1e-300):.1e}\n")
    print("| model | ours (warm) | ours MSE | DLG time | DLG MSE | speed-up at equal or better MSE | MSE DLG/ours |")
    print("|---|---|---|---|---|---|---|")
    for name, ours, base, reach, base_mse, _ in rows:
        ratio = f"{reach / ours['warm']:.0f}x" if reach is not None else f">= {base.seconds / ours['warm']:.0f}x (DLG never reached our MSE)"
        print(f"| {name} | {ours['warm']:.2f} s | {ours['mse']:.1e} | {base.seconds:.0f} s | {base_mse:.1e} | {ratio} | {base_mse / max(ours['mse'], 1e-300):.0e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
