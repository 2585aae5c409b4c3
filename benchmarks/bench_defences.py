"""Time the whole --defences run for CNN6 (examples/paper_nets.py), per part, with the number of attack runs and
re-audits it took and the cost per attack run, measured in the same run.

Run: python benchmarks/bench_defences.py [MODEL ...]   (default CNN6; also CNN6-d, FCN3)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import paper_nets
import torch

from rgap_audit.defence import defences

MODELS = {"CNN6": (paper_nets.cnn6, (3, 32, 32)), "CNN6-d": (paper_nets.cnn6_d, (3, 32, 32)), "FCN3": (paper_nets.fcn3, (1, 28, 28))}


def main(names: list[str]) -> None:
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for name in names:
        make, shape = MODELS[name]
        torch.manual_seed(0)  # the weights the command line audits (factories run under --seed 0)
        model = make()
        t = time.perf_counter()
        found = defences(model, shape, loss="logistic", name=name)
        wall = time.perf_counter() - t
        noise, comp, batch, arch = found.noise, found.compression, found.batch, found.architecture
        runs = (noise.attack_runs if noise else 0) + (comp.attack_runs if comp else 0)
        attack_s = (noise.seconds if noise else 0.0) + (comp.seconds if comp else 0.0)
        print(f"{name}: --defences in {wall:.1f} s (audit included)")
        if noise:
            print(f"  noise        {noise.seconds:6.1f} s  {noise.attack_runs} attack runs; sigma_stop {noise.sigma_stop}")
        if comp:
            print(f"  compression  {comp.seconds:6.1f} s  {comp.attack_runs} attack runs")
        if batch:
            print(f"  batch        {batch.seconds:6.1f} s  {len(batch.points) - 1} re-audits at B > 1 (+ the batch attack); stop {batch.batch_stop}")
        if arch:
            print(f"  architecture {arch.seconds:6.1f} s  {arch.tried} re-audits, {arch.not_tried} not tried within the budget")
        if runs:
            print(f"  cost per attack run: {attack_s / runs:.2f} s ({runs} runs)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["CNN6"])
