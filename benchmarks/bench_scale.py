"""Scale benchmark: wall time and peak memory of the static audit at ImageNet resolution.

Cases (each runs in a fresh subprocess, so peak RSS is its own):

* resnet18   - examples/resnet_bn.py:resnet18 (11.7 M parameters, BatchNorm, residual adds), 3x224x224
* resnet18-cifar - examples/resnet_bn.py:resnet18_cifar (3x3 stem, no max-pool), 3x32x32
* mobilenetv2-cifar - examples/mobilenet_cifar.py:mobilenetv2_cifar (inverted residuals, depthwise convs), 3x32x32
* transformer-64x128 - two nn.TransformerEncoderLayer blocks on 64 tokens of width 128, Linear head
* vgg-chain  - a VGG-style chain of eight 3x3 convolutions with LeakyReLU and stride-2 downsampling
               (bias-free, no pooling, so the R-GAP chain passes every activation), 3x224x224
* cnn6d-ident - whole-network identifiability of CNN6-d at 3x32x32 (rgap-notes section 3: rank 3072)
* vgg-verify  - static audit + full R-GAP reconstruction (rgap_audit.attack.verify) of vgg_tall(), a
               chain that is recoverable with margin at every layer, 3x224x224: wall time, per-layer time,
               peak RSS, relative error of every recovered layer input and of the input
* vgg-deficient-verify - the same for vgg-chain, which is deficient by counting at its stride-2 layers:
               the reconstruction must fail below the first deficient layer, as the static verdict says
* resnet-small-verify - audit + --verify of examples/resnet_bn.py:resnet_small (identity and projection
               shortcuts) at 3x16x16: the joint segments solved at the true patterns
* resnet18-cifar-verify - audit + --verify of the CIFAR ResNet-18 (its segments by LSQR on jvp/vjp)

Usage:  python benchmarks/bench_scale.py                 (the static cases: resnet18 ... cnn6d-ident)
        python benchmarks/bench_scale.py --cases all     (also the two verify cases)
        python benchmarks/bench_scale.py --case resnet18 (one case in this process; prints JSON)

Peak memory is measured two ways: resource.ru_maxrss (the whole process: torch's tensors included)
and tracemalloc (Python and numpy allocations only; torch's allocator is invisible to it).
The targets: static audit of ResNet-18 at 224 in under 30 s on 2 cores with bounded memory; each 32x32
model and the transformer in under 15 s; the VGG-style chain verifies in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import torch
import torch.nn as nn

from rgap_audit.records import plain

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

DEFAULT_CASES = ["resnet18", "resnet18-cifar", "mobilenetv2-cifar", "transformer-64x128", "vgg-chain", "cnn6d-ident"]
ALL_CASES = DEFAULT_CASES + ["vgg-verify", "vgg-deficient-verify", "resnet-small-verify", "resnet18-cifar-verify"]


class Encoder(nn.Module):
    """Two nn.TransformerEncoderLayer blocks (width 128, 4 heads, MLP 512, post-norm) over 64 tokens,
    mean-pooled into a Linear head: the standard PyTorch transformer block as vision/text repos use it."""

    def __init__(self, d: int = 128, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(x).mean(dim=1))


def _model(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """The network, input shape and loss of a case."""
    if name == "resnet18":
        from resnet_bn import resnet18

        return resnet18(), (3, 224, 224), "cross-entropy"
    if name.startswith("resnet18-cifar"):
        from resnet_bn import resnet18_cifar

        return resnet18_cifar(), (3, 32, 32), "cross-entropy"
    if name == "resnet-small-verify":
        from resnet_bn import resnet_small

        return resnet_small(), (3, 16, 16), "cross-entropy"
    if name == "mobilenetv2-cifar":
        from mobilenet_cifar import mobilenetv2_cifar

        return mobilenetv2_cifar(), (3, 32, 32), "cross-entropy"
    if name == "transformer-64x128":
        return Encoder(), (64, 128), "cross-entropy"
    if name == "vgg-verify":
        return vgg_tall(), (3, 224, 224), "logistic"
    return vgg_chain(), (3, 224, 224), "logistic"


def vgg_chain() -> nn.Sequential:
    """Eight 3x3 convolutions (16-16-32-32-64-64-128-128 channels, five of stride 2), LeakyReLU(0.2),
    Flatten and Linear(128*7*7 -> 1): 224 -> 112 -> 56 -> 28 -> 14 -> 7.

    The static-audit case, and the *deficient* verify case: a 16->32 stride-2 layer at 112x112 has
    16*112*112 = 200704 unknowns but only 32*56*56 = 100352 forward rows and 4608 gradient rows, so no
    attack recovers its input in closed form (the 32->64 layer at 56 likewise); its doubling of channels
    per stride 2 is a quarter of what the stride's four input phases would need.
    """
    cfg = [(3, 16, 2), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 2)]
    layers: list[nn.Module] = []
    for c_in, c_out, s in cfg:
        layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 7 * 7, 1, bias=False))


def vgg_tall() -> nn.Sequential:
    """Three 3x3 convolutions 3->16 (stride 2), 16->24 (stride 1), 24->128 (stride 2), LeakyReLU(0.2),
    bias-free, Flatten and Linear(128*56*56 -> 1): 224 -> 112 -> 112 -> 56. The *recoverable* verify case.

    Every layer has more forward rows than unknowns, with margin: 200704 >= 150528, 301056 >= 200704,
    401408 >= 301056 (per frequency of the stride phases: 16 outputs for 12 phase channels, 24 for 16,
    128 for 96). The margin matters: an exactly square layer (16->16 stride 1, or 16->64 stride 2, as a
    "channels x4 per stride 2" chain has) is full rank by counting, but its forward rows are
    exponentially ill-conditioned in the image size (a handful of border directions; measured cond(F)
    1.5e4 at 16x16 and 4.3e6 at 32x32 for 4->4 channels), so at 112x112 only the gradient rows could pin
    those directions, and the Fourier-preconditioned solve does not converge there. The Linear head of a
    logistic loss gives its input exactly, so the chain's recovery rests on the three convolutions.
    """
    cfg = [(3, 16, 2), (16, 24, 1), (24, 128, 2)]
    layers: list[nn.Module] = []
    for c_in, c_out, s in cfg:
        layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 56 * 56, 1, bias=False))


def _verify_summary(ver) -> dict:
    """Scalars of verify()'s result plus one line per layer: time, method, nullity, relative error."""
    res = plain(ver)
    out = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool)) or v is None}
    out["layers"] = [
        {
            "node": e["node"],
            "seconds": round(e["seconds"], 2),
            "method": e["method"],
            "static_deficit": e["static_deficit"],
            "measured_nullity": e["measured_nullity"],
            "rel_error": e["rel_error"],
            "residual_fwd": e["residual_fwd"],
            "residual_grad": e["residual_grad"],
        }
        for e in res.get("layers", [])
    ]
    return out


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _summary(rep) -> dict:
    layers = [r for r in rep.layers if r.unknowns is not None]
    return {
        "status": rep.verdict.status.value,
        "summary": rep.verdict.summary,
        "layers": len(layers),
        "exact": sum(r.rank is not None for r in layers),
        "bounded": sum(r.rank is None for r in layers),
        "methods": sorted({r.rank_method or "-" for r in layers}),
        "timings": {k: round(v, 2) for k, v in rep.timings.items()},
        "slowest": sorted(((round(r.seconds, 2), r.node, r.rank_method) for r in rep.layers), reverse=True)[:5],
    }


def run_case(name: str, trace_memory: bool = True) -> dict:
    """Run one case in this process and measure it (tracemalloc slows Python-heavy code a little)."""
    torch.manual_seed(0)
    out: dict = {"case": name}
    if name != "cnn6d-ident" and name in ALL_CASES:
        model, shape, loss = _model(name)
        model.eval()
        rss0 = _rss_mb()
        if trace_memory:
            tracemalloc.start()
        t0 = time.perf_counter()
        if name.endswith("verify"):
            from rgap_audit.analysis import audit_instance
            from rgap_audit.instance import build_instance
            from rgap_audit.options import AuditOptions, LoadedModel
            from rgap_audit.verify import verify

            loaded = LoadedModel(file="<bench>", name=name, module=model, input_shape=shape, loss=loss)
            options = AuditOptions()
            audited = audit_instance(build_instance(loaded, options), options)
            rep = audited.report
            out["audit_seconds"] = round(time.perf_counter() - t0, 2)
            out["static"] = {"status": rep.verdict.status.value, "summary": rep.verdict.summary}
            res = verify(audited, seeds=1)  # one reconstruction: the time is that of one attack
            out["result"] = _verify_summary(res)
        else:
            from rgap_audit.analysis import audit

            rep = audit(model, shape, loss=loss)
            out["result"] = _summary(rep)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        if trace_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out["tracemalloc_peak_mb"] = round(peak / 2**20, 1)
        out["rss_before_mb"] = round(rss0, 1)
        out["rss_peak_mb"] = round(_rss_mb(), 1)
        return out
    if name == "cnn6d-ident":
        from paper_nets import cnn6_d

        from rgap_audit.identifiability import identifiability

        rss0 = _rss_mb()
        t0 = time.perf_counter()
        res = identifiability(cnn6_d(), (3, 32, 32), "logistic")
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["result"] = {k: res[k] for k in ("rank", "unknowns", "gradient_entries", "sigma_min_rel", "tolerance_rel", "method")}
        out["rss_before_mb"] = round(rss0, 1)
        out["rss_peak_mb"] = round(_rss_mb(), 1)
        return out
    raise SystemExit(f"unknown case {name!r}; known: {', '.join(ALL_CASES)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help="run one case in this process and print its JSON")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated cases, or 'all'")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    ap.add_argument("--no-tracemalloc", action="store_true", help="time without tracemalloc (RSS only)")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, trace_memory=not args.no_tracemalloc)))
        return 0
    cases = ALL_CASES if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    failed = 0
    for case in cases:
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--case", case, *(["--no-tracemalloc"] if args.no_tracemalloc else [])],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            print(f"{case}: timed out after {args.timeout:.0f} s")
            failed += 1
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{case}: failed (exit {proc.returncode}): {tail}")
            failed += 1
            continue
        res = json.loads(lines[-1])
        if "skipped" in res:
            print(f"{case}: skipped: {res['skipped']}")
            continue
        mem = f"peak RSS {res['rss_peak_mb']:.0f} MiB (before {res['rss_before_mb']:.0f})"
        if "tracemalloc_peak_mb" in res:
            mem += f", tracemalloc peak {res['tracemalloc_peak_mb']:.0f} MiB"
        print(f"{case}: {res['seconds']:.1f} s, {mem}")
        result = dict(res.get("result", {}))
        per_layer = result.pop("layers") if isinstance(result.get("layers"), list) else None
        if "audit_seconds" in res:
            print(f"    static audit {res['audit_seconds']:.1f} s: {json.dumps(res.get('static', {}))}")
        print("    " + json.dumps(result))
        for e in per_layer or []:
            print("    layer " + json.dumps(e))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
