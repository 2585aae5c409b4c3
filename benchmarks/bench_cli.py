"""Time the command line as a pre-commit hook runs it, as ratios to `python -c "import torch"`.

One run measures, in fresh processes, round-robin (so that the machine's load falls on every command
alike), best and median of --rounds:

* `import torch`: the floor every audit pays (the reference of every ratio);
* `rgap-audit rules`, and a file that defines no model (`--allow-no-models`), cold and cached;
* the CLI audit of CNN6, FCN3 (examples/paper_nets.py) and a LeNet-style CNN (examples/dlg_lenet.py),
  cold (`--no-cache`) and served from the results cache (`--cache-dir`, filled once before timing).

Targets (issue 15): CNN6 cold within 1.5x of `import torch`, every cached run within 1.2x. The ratios:
best over best, and the median over rounds of each run over the `import torch` run just before it
(on a busy machine the pair shares the load; the best-of ratio can pair a lucky torch with an unlucky
audit).
Run: python benchmarks/bench_cli.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUDIT = [sys.executable, "-m", "rgap_audit"]


def commands(cache: str, plain: str) -> dict[str, list[str]]:
    ex = ROOT / "examples"
    out: dict[str, list[str]] = {
        "import torch": [sys.executable, "-c", "import torch"],
        "rgap-audit rules": [*AUDIT, "rules"],
    }
    targets = {
        "no-model file": [plain, "--allow-no-models"],
        "CNN6": [f"{ex / 'paper_nets.py'}:CNN6"],
        "FCN3": [f"{ex / 'paper_nets.py'}:FCN3"],
        "LeNet": [f"{ex / 'dlg_lenet.py'}:LeNet"],
    }
    for name, args in targets.items():
        out[f"{name} cold"] = [*AUDIT, *args, "--format", "concise", "--no-cache"]
        out[f"{name} cached"] = [*AUDIT, *args, "--format", "concise", "--cache-dir", cache]
    return out


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - t, proc.returncode, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's rgap_audit
    env.pop("PRE_COMMIT", None)
    # as installed (pip compiles bytecode) or run from a checkout: Python caches the compiled modules;
    # without this, a session with PYTHONDONTWRITEBYTECODE=1 recompiles rgap_audit's ~80 modules per run
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("RGAP_AUDIT_NO_CACHE", None)
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "utils.py")
        Path(plain).write_text("def helper():\n    return 1\n")
        cmds = commands(os.path.join(tmp, "cache"), plain)
        outputs: dict[str, tuple[int, str]] = {}
        for name, cmd in cmds.items():  # one untimed run each: fills the cache, compiles bytecode
            _s, code, out = run(cmd, env)
            outputs[name] = (code, out)
        for name in cmds:
            if name.endswith(" cached"):
                cold = outputs[name.replace(" cached", " cold")]
                assert outputs[name] == cold, f"{name}: the cached run printed something else than the cold run"
        times: dict[str, list[float]] = {name: [] for name in cmds}
        paired: dict[str, list[float]] = {name: [] for name in cmds}  # each run over an `import torch` run just before it
        for _ in range(args.rounds):
            for name, cmd in cmds.items():
                ref_s = run(cmds["import torch"], env)[0]
                seconds, code, _out = run(cmd, env)
                assert code == outputs[name][0], f"{name}: exit code {code}, first run {outputs[name][0]}"
                times[name].append(seconds)
                paired[name].append(seconds / ref_s)
    ref = min(times["import torch"])
    load = os.getloadavg()[0]
    print(f"{args.rounds} rounds of fresh processes, each command right after an `import torch` run; load average {load:.1f}")
    print(f"{'command':22s} {'best s':>7s} {'median s':>9s} {'best / best torch':>18s} {'median paired ratio':>20s}")
    for name, ts in times.items():
        print(f"{name:22s} {min(ts):7.2f} {statistics.median(ts):9.2f} {min(ts) / ref:17.2f}x {statistics.median(paired[name]):19.2f}x")
    cnn6 = min(times["CNN6 cold"]) / ref
    worst_cached = max(min(ts) / ref for name, ts in times.items() if name.endswith(" cached"))
    print(f"targets: CNN6 cold {cnn6:.2f}x (<= 1.5x: {'met' if cnn6 <= 1.5 else 'NOT met'}); "
          f"slowest cached run {worst_cached:.2f}x (<= 1.2x: {'met' if worst_cached <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
