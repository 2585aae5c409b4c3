"""Time the static audit of the paper's networks (CNN6, CNN6-d, FCN3), per layer and in total.

Also times CNN6 with the BLAS pools left at their default size, to show what running the linear
algebra single-threaded buys on this machine. Run: python benchmarks/bench_audit.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import paper_nets

from rgap_audit.analysis import audit, audit_instance
from rgap_audit.instance import build_instance
from rgap_audit.options import AuditOptions, LoadedModel

MODELS = [("CNN6", paper_nets.cnn6, (3, 32, 32)), ("CNN6-d", paper_nets.cnn6_d, (3, 32, 32)), ("FCN3", paper_nets.fcn3, (1, 28, 28))]


def main() -> None:
    audit(paper_nets.fcn3(), (1, 28, 28))  # warm-up: first use of torch.func
    totals = {}
    for name, make, shape in MODELS:
        t = time.perf_counter()
        rep = audit(make(), shape)
        totals[name] = time.perf_counter() - t
        per_layer = ", ".join(f"{r.module_path}:{r.seconds:.2f}s" for r in rep.layers if r.unknowns is not None)
        print(f"{name:7s} audit {totals[name]:6.2f} s  status {rep.verdict.status.value:26s} [{per_layer}]")
    loaded = LoadedModel(file="<bench>", name="CNN6", module=paper_nets.cnn6(), input_shape=(3, 32, 32))
    t = time.perf_counter()
    audit_instance(build_instance(loaded, AuditOptions()), AuditOptions())  # default thread pools
    default = time.perf_counter() - t
    print(f"CNN6 with default BLAS threads: {default:.2f} s; single-threaded is {default / totals['CNN6']:.2f}x faster")


if __name__ == "__main__":
    main()
