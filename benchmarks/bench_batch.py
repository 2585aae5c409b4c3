"""Time the static audit at the batch sizes clients use, as ratios to the B = 1 audit of the same model in
the same run (issue 14's targets on the 2-core machine: CNN6 at B = 8 under 10 s, at B = 64 under 60 s,
with an exact verdict).

For every case it prints the verdict under attacker (a) (each sample's dL/dz known), what it rests on,
the input directions left undetermined (a range when only bounded), the span the first Linear's gradient
reveals (attacker (b)), the seconds, and the ratio to B = 1; per layer, the rank method and seconds.

Run: python benchmarks/bench_batch.py [--cases cnn6,cnn6-d,conv-head,fcn3,lenet,resnet-cifar] [--batches 8,64]
(PYTHONPATH=<another checkout> runs the same cases on that checkout's rgap_audit, for an A/B.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import dlg_lenet
import paper_nets
import resnet_bn
import torch

from rgap_audit.analysis import audit
from rgap_audit.sweep import batch_point, deficit_text


def conv_head() -> torch.nn.Sequential:
    """CNN6's stem under a Linear head: at B > 1 the head leaves half its inputs undetermined, carried into the
    stem as a dense basis (the batch-carried route)."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 12, 4, 2, 2, bias=False), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(12 * 17 * 17, 1, bias=False))


CASES = {
    "cnn6": ("CNN6", paper_nets.cnn6, (3, 32, 32), "logistic"),
    "cnn6-d": ("CNN6-d", paper_nets.cnn6_d, (3, 32, 32), "logistic"),
    "conv-head": ("Conv stem + Linear head", conv_head, (3, 32, 32), "logistic"),
    "fcn3": ("FCN3", paper_nets.fcn3, (1, 28, 28), "logistic"),
    "lenet": ("LeNet (sigmoid)", dlg_lenet.LeNet, (3, 32, 32), "cross-entropy"),
    "resnet-cifar": ("ResNet-tiny (CIFAR-style)", resnet_bn.resnet_tiny, (3, 16, 16), "cross-entropy"),
}
DEFAULT_BATCHES = {"cnn6": [8, 64], "cnn6-d": [2, 4, 8], "conv-head": [2], "fcn3": [8, 64], "lenet": [8], "resnet-cifar": [8]}


def _one(make, shape, loss: str, b: int) -> tuple[float, object]:
    torch.manual_seed(0)  # the same weights at every B and in every run
    model = make()
    t = time.perf_counter()
    rep = audit(model, shape, batch_size=b, loss=loss)
    return time.perf_counter() - t, rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default: per case, 8 and 64)")
    args = ap.parse_args()
    audit(paper_nets.fcn3(), (1, 28, 28))  # warm-up: first use of torch.func
    for key in args.cases.split(","):
        name, make, shape, loss = CASES[key.strip()]
        batches = [int(b) for b in args.batches.split(",")] if args.batches else DEFAULT_BATCHES[key.strip()]
        base, rep1 = _one(make, shape, loss, 1)
        print(f"{name}: B=1 {base:.2f} s, {rep1.verdict.status.value}")
        for b in batches:
            secs, rep = _one(make, shape, loss, b)
            p = batch_point(rep, secs)
            layers = ", ".join(f"{r.module_path or r.node}:{r.rank_method}:{r.seconds:.1f}s" for r in rep.layers if r.unknowns is not None)
            span = "n/a" if p.span_rank is None else f"rank {p.span_rank}{' (leak)' if p.span_leak else ''}"
            print(
                f"  B={b:<3d} {secs:7.2f} s  ({secs / base:6.1f}x B=1)  (a) {p.status.value} [{p.basis.value}], "
                f"input directions undetermined {deficit_text(p)}; (b) first-layer span {span}"
            )
            print(f"         {layers}")


if __name__ == "__main__":
    main()
