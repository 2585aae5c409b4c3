"""Hand-built ModelReports for the rule, format and suppression tests (records.py is the contract).

Each builder takes the path of a model file and, when given the source text, places every
location on the line of that text that constructs the layer, as the loader does.
"""

from __future__ import annotations

from pathlib import Path

from rgap_audit.records import Basis, BatchSpan, Chain, LayerRecord, Location, ModelReport, ModelStatus, ModelVerdict, Verdict

MLP_SOURCE = '''\
import torch.nn as nn

NOTE = "# rgap: ignore[RGAP201]"  # a directive-looking string: not a comment


class BiasedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.act = nn.Sigmoid()
        self.fc2 = nn.Linear(32, 10, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ReluCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(12, 20, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(20, 36, 3, padding=1)
        self.head = nn.Linear(36 * 64, 1, bias=False)
'''


def line_of(source: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    return next(i for i, text in enumerate(source.splitlines(), 1) if needle in text)


def _loc(file: str, source: str, needle: str, col: int = 9) -> Location:
    return Location(file, line_of(source, needle), col)


def leaky_mlp(file: str = "models/mlp.py", source: str = MLP_SOURCE) -> ModelReport:
    """BiasedMLP: fc2 recoverable, Sigmoid passes, fc1 (Linear with bias) leaks exactly."""
    layers = [
        LayerRecord(
            index=0, node="fc2", op="Linear", kind="layer", module_path="fc2",
            input_shape=[1, 32], output_shape=[1, 10],
            unknowns=32, grad_rows=320, fwd_rows=0, rank_grad=32, rank_grad_counting=32, rank=32,
            rank_method="closed-form", deficit=0, sigma_min_rel=0.3, chain=Chain.PARTIAL,
            chain_reason="cross-entropy, B=1: z known up to a constant",
            verdict=Verdict.RECOVERABLE, basis=Basis.NUMERICAL, reason="rank 32 = 32 unknowns: closed-form solve",
            location=_loc(file, source, "self.fc2 ="),
        ),
        LayerRecord(
            index=1, node="act", op="Sigmoid", kind="activation", module_path="act",
            input_shape=[1, 32], output_shape=[1, 32], verdict=Verdict.PASSES, basis=Basis.STRUCTURE,
            reason="invertible", location=_loc(file, source, "self.act ="),
        ),
        LayerRecord(
            index=2, node="fc1", op="Linear", kind="layer", module_path="fc1",
            input_shape=[1, 64], output_shape=[1, 32],
            unknowns=64, grad_rows=2048, fwd_rows=32, rank_grad=64, rank_grad_counting=64, rank=64,
            rank_method="closed-form", deficit=0, sigma_min_rel=0.1, chain=Chain.FULL, chain_reason="z known",
            verdict=Verdict.LEAKS_EXACTLY, basis=Basis.STRUCTURE,
            reason="Linear with bias: x = dL/dW[j] / dL/db[j] for any j with dL/db[j] != 0",
            location=_loc(file, source, "self.fc1 ="), reads_input=True,
        ),
    ]
    verdict = ModelVerdict(
        status=ModelStatus("leaks-exactly"), input_recoverable=True, deficient_layers=0, total_deficit=0, input_deficit=0,
        basis=Basis.STRUCTURE, summary="the input leaks exactly through fc1 (Linear with bias)",
        caveats=["Activation patterns are taken as known to the attacker, as in R-GAP."],
    )
    return ModelReport(
        file=file, model="BiasedMLP", input_shape=[64], batch_size=1, loss="cross-entropy", seed=0, dtype="float64",
        layers=layers, verdict=verdict, location=_loc(file, source, "class BiasedMLP", col=1),
        timings={"total": 0.12},
    )


def deficient_cnn(file: str = "models/mlp.py", source: str = MLP_SOURCE) -> ModelReport:
    """ReluCNN: head recoverable but poorly conditioned, conv2 recoverable, ReLU breaks the chain,
    conv1 deficient by 280 (the input is not recoverable in closed form)."""
    layers = [
        LayerRecord(
            index=0, node="head", op="Linear", kind="layer", module_path="head",
            input_shape=[1, 2304], output_shape=[1, 1],
            unknowns=2304, grad_rows=2304, fwd_rows=1, rank_grad=2304, rank=2304, deficit=0,
            rank_method="closed-form", sigma_min_rel=3e-7, chain=Chain.FULL, chain_reason="logistic: z known",
            verdict=Verdict.RECOVERABLE, basis=Basis.NUMERICAL, reason="rank 2304 = 2304 unknowns: closed-form solve",
            location=_loc(file, source, "self.head ="),
        ),
        LayerRecord(
            index=1, node="conv2", op="Conv2d", kind="layer", module_path="conv2",
            input_shape=[1, 20, 8, 8], output_shape=[1, 36, 8, 8],
            unknowns=1280, grad_rows=6480, fwd_rows=2304, rank_grad=1280, rank_grad_counting=1280, rank=1280, deficit=0,
            rank_method="structured-svd", sigma_min_rel=0.02, chain=Chain.FULL, chain_reason="layer above recovered",
            verdict=Verdict.RECOVERABLE, basis=Basis.NUMERICAL, reason="rank 1280 = 1280 unknowns: closed-form solve",
            location=_loc(file, source, "self.conv2 ="),
        ),
        LayerRecord(
            index=2, node="relu", op="ReLU", kind="activation", module_path="relu",
            input_shape=[1, 20, 8, 8], output_shape=[1, 20, 8, 8], verdict=Verdict.CHAIN_BROKEN,
            basis=Basis.STRUCTURE, reason="ReLU is not invertible: where the output is 0, z is only known to be <= 0",
            location=_loc(file, source, "self.relu ="),
        ),
        LayerRecord(
            index=3, node="conv1", op="Conv2d", kind="layer", module_path="conv1",
            input_shape=[1, 12, 17, 17], output_shape=[1, 20, 9, 9],
            unknowns=3468, grad_rows=2160, fwd_rows=1620, rank_grad=1968, rank_grad_counting=1968, rank=3188,
            rank_method="structured-svd", deficit=280, sigma_min_rel=0.004, chain=Chain.PARTIAL,
            chain_reason="through non-invertible ReLU",
            verdict=Verdict.DEFICIENT, basis=Basis.NUMERICAL, reason="rank 3188 of 3468 unknowns: 280 directions undetermined",
            location=_loc(file, source, "self.conv1 ="), reads_input=True,
        ),
    ]
    verdict = ModelVerdict(
        status=ModelStatus("deficient"), input_recoverable=False, deficient_layers=1, total_deficit=280, input_deficit=280,
        basis=Basis.NUMERICAL, summary="input not recoverable in closed form: 280 input directions undetermined",
        caveats=["A layer-wise deficit is not proof of safety."],
    )
    return ModelReport(
        file=file, model="ReluCNN", input_shape=[12, 17, 17], batch_size=1, loss="logistic", seed=0, dtype="float64",
        layers=layers, verdict=verdict, location=_loc(file, source, "class ReluCNN", col=1),
    )


HEAD_SOURCE = """\
import torch.nn as nn


class BiasedHeadCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.head = nn.Linear(128, 10)
"""


def biased_head(file: str = "models/head.py", source: str = HEAD_SOURCE) -> ModelReport:
    """BiasedHeadCNN: the head (Linear with bias) gives its own input, the conv features, away exactly;
    the conv below is deficient (3x16x16 input, k4 s4 to 8 channels: rank 448 of 768), so the model
    input is not recoverable in closed form."""
    layers = [
        LayerRecord(
            index=0, node="head", op="Linear", kind="layer", module_path="head",
            input_shape=[1, 128], output_shape=[1, 10],
            unknowns=128, grad_rows=1280, fwd_rows=9, rank_grad=128, rank_grad_counting=128, rank=128, deficit=0,
            rank_method="structured-svd", sigma_min_rel=0.2, chain=Chain.PARTIAL,
            chain_reason="output layer: cross-entropy reveals the logits up to a constant",
            verdict=Verdict.LEAKS_EXACTLY, basis=Basis.STRUCTURE,
            reason="Linear with bias: x = dL/dW[j] / dL/db[j] for any j with dL/db[j] != 0",
            location=_loc(file, source, "self.head ="),
        ),
        LayerRecord(
            index=1, node="flatten", op="flatten", kind="reshape", module_path=None,
            input_shape=[1, 8, 4, 4], output_shape=[1, 128], verdict=Verdict.PASSES, basis=Basis.STRUCTURE,
            reason="a permutation of entries: passes the chain unchanged",
        ),
        LayerRecord(
            index=2, node="conv", op="Conv2d", kind="layer", module_path="conv",
            input_shape=[1, 3, 16, 16], output_shape=[1, 8, 4, 4],
            unknowns=768, grad_rows=384, fwd_rows=128, rank_grad=384, rank_grad_counting=384, rank=448, deficit=320,
            rank_method="structured-svd", sigma_min_rel=0.01, chain=Chain.FULL, chain_reason="layer above (head) recovered",
            verdict=Verdict.DEFICIENT, basis=Basis.NUMERICAL, reason="rank 448 of 768 unknowns: 320 directions undetermined",
            location=_loc(file, source, "self.conv ="), reads_input=True,
        ),
    ]
    verdict = ModelVerdict(
        status=ModelStatus("deficient"), input_recoverable=False, deficient_layers=1, total_deficit=320, input_deficit=320,
        basis=Basis.NUMERICAL, summary="input not recoverable in closed form: 320 input directions undetermined",
    )
    return ModelReport(
        file=file, model="BiasedHeadCNN", input_shape=[3, 16, 16], batch_size=1, loss="cross-entropy", seed=0, dtype="float64",
        layers=layers, verdict=verdict, location=_loc(file, source, "class BiasedHeadCNN", col=1),
    )


def undecided(file: str = "models/odd.py") -> ModelReport:
    """A model with no source locations at all: a not-understood op, a layer ranked only by bounds, B=4."""
    layers = [
        LayerRecord(
            index=0, node="fc", op="Linear", kind="layer", module_path="fc",
            input_shape=[4, 100], output_shape=[4, 1], unknowns=400, grad_rows=100, fwd_rows=4,
            rank_lower=300, rank_upper=450, rank_method="bounds", verdict=Verdict.RECOVERABLE, basis=Basis.BOUNDS,
            reason="rank between 300 and 450 of 400 unknowns (system too large for an exact rank)",
            span=BatchSpan(rank=4, distance=3e-16, samples=4, count=4, dims=12, leak=True), reads_input=True,  # B = 4: the batch's span leaks
        ),
        LayerRecord(
            index=1, node="fft_1", op="fft", kind="unknown", module_path=None,
            input_shape=[4, 100], output_shape=[4, 100], verdict=Verdict.NOT_UNDERSTOOD, basis=Basis.STRUCTURE,
            reason="no registry entry for torch.fft.fft",
        ),
    ]
    verdict = ModelVerdict(
        status=ModelStatus("unknown"), input_recoverable=None, deficient_layers=0, total_deficit=0, input_deficit=None,
        basis=Basis.BOUNDS, summary="input layer fc only bounded; not understood: fft (never counted as safe)",
    )
    return ModelReport(
        file=file, model="Odd", input_shape=[100], batch_size=4, loss="logistic", seed=3, dtype="float64",
        layers=layers, verdict=verdict, location=None,
    )


def write_source(tmp: Path, name: str = "mlp.py", source: str = MLP_SOURCE) -> str:
    """Write the model source under tmp and return its path as a string."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    return str(path)


def defended(file: str = "models/mlp.py", source: str = MLP_SOURCE) -> ModelReport:
    """The leaky MLP with a --defences section: every part measured (the RGAP5xx rules fire on it)."""
    from rgap_audit.records import (
        ArchitectureDefence,
        ArchitectureEdit,
        BatchDefence,
        BatchVerdictPoint,
        CompressionDefence,
        CompressionPoint,
        Defences,
        NoiseDefence,
        NoisePoint,
        PrivacyCost,
    )

    report = leaky_mlp(file, source)
    report.model = "DefendedMLP"
    edit = ArchitectureEdit("fc1", "fc1", "out_features", [32], [16], ModelStatus.DEFICIENT, 12, 1040, 50.0, 1024, "fc1: out_features 32 -> 16")
    report.defences = Defences(
        noise=NoiseDefence(
            clip_norm=1.0, clip_norm_source="--clip-norm", threshold=0.5, seeds=2,
            points=[NoisePoint(1e-3, [0.1, 0.2], [30.0, 25.0], 0.15, 0.12, 3.0), NoisePoint(1e-2, [1.1, 1.5], [5.0, 3.0], 1.3, 1.2, 30.0)],
            sigma_stop=4e-3, sigma_stop_low=3e-3, sigma_stop_high=5e-3, sigma_stop_predicted=4.2e-3, sigma_stop_bound=1.7e-4,
            probe_sigma=1e-4, privacy=PrivacyCost(4e-3, 1e-5, 3.1e5, 100, 0.01, 2.0e6, "opacus RDPAccountant"),
            layers=[], attack_runs=5, seconds=1.0, summary="R-GAP's relative error exceeds 0.5 from sigma = 0.004",
        ),
        compression=CompressionDefence(0.5, [CompressionPoint("top-k", 0.9, None, 2.0, 1.0, True)], 0.9, None, 1, 0.1, "top-k 90 % stops it"),
        batch=BatchDefence(4, [BatchVerdictPoint(1, ModelStatus.LEAKS_EXACTLY, True, 0), BatchVerdictPoint(2, ModelStatus.DEFICIENT, False, 30)], 2,
                           "RGAP403 caveat", None, 0.5, "from batch size 2 the static verdict is deficient"),
        architecture=ArchitectureDefence(4, 0, [edit], edit, [], 2.0, "fc1: out_features 32 -> 16 makes the input not recoverable"),
    )
    return report
