"""The results of an audit, as plain data: one LayerRecord per row of the walk, one ModelReport per model.

Everything downstream (rules, table, JSON, SARIF) reads these and nothing else, so the data flows
one way: load -> trace -> layer graph -> analysis -> records -> rules -> report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

SCHEMA_VERSION = "1.1"


class Verdict(str, Enum):
    """Per-row verdict of the walk."""

    LEAKS_EXACTLY = "leaks-exactly"  # a Linear with bias: x = dL/dW[j] / dL/db[j]
    RECOVERABLE = "recoverable"  # combined system has full column rank: closed-form solve
    DEFICIENT = "deficient"  # rank < unknowns: `deficit` directions undetermined
    PASSES = "passes"  # an invertible / linear op: the chain passes through it
    CHAIN_BROKEN = "chain-broken"  # a non-invertible op: forward constraints below are partial or gone
    NOT_UNDERSTOOD = "not-understood"  # the analysis has no entry for this op: never counted as safe


class Basis(str, Enum):
    """What a verdict rests on."""

    COUNTING = "counting"  # closed-form counts of constraints and unknowns
    NUMERICAL = "numerical-rank"  # exact numerical rank on a seeded random instance
    BOUNDS = "bounds"  # proven lower/upper bounds only (system too large for an exact rank)
    VERIFIED = "verified"  # a reconstruction was run and measured
    STRUCTURE = "structure"  # a fact of the operation (invertibility, bias leak)


class Chain(str, Enum):
    """How much of a layer's output z the attacker knows when it reaches this layer."""

    FULL = "full"  # z known exactly (layer above recovered, invertible ops between)
    PARTIAL = "partial"  # z known on a subspace (ReLU, pooling, deficient layer above)
    NONE = "none"  # nothing known about z


@dataclass
class Location:
    file: str
    line: int
    col: int = 1


@dataclass
class LayerRecord:
    """One row of the walk (output first). Rank fields are None for rows that are not layers."""

    index: int  # position in the walk, 0 = closest to the output
    node: str  # torch.fx node name: unique even when a module object is reused
    op: str  # registry key, e.g. "Conv2d", "LeakyReLU", "flatten"
    kind: str  # registry kind: "layer", "activation", "reshape", "pool", "norm", "merge", "unknown", ...
    module_path: str | None  # dotted path of the module, None for functional calls
    input_shape: list[int]  # whole batch
    output_shape: list[int]
    unknowns: int | None = None  # entries of the layer input, all samples, padding excluded
    grad_rows: int | None = None  # rows of the gradient constraints (entries of dL/dW)
    fwd_rows: int | None = None  # rows of forward constraints available (known directions of z)
    rank_grad: int | None = None  # numerical rank of the gradient constraints K
    rank_grad_counting: int | None = None  # closed-form rank of K (rgap-notes section 3)
    rank: int | None = None  # numerical rank of [K; F]
    rank_lower: int | None = None  # bounds when the exact rank was not computed
    rank_upper: int | None = None
    rank_method: str | None = None  # "structured-svd", "dense-svd", "closed-form", "bounds"
    deficit: int | None = None  # unknowns - rank
    sigma_min_rel: float | None = None  # smallest kept singular value / largest, of the solved blocks
    chain: Chain | None = None  # what is known of this layer's output z
    chain_reason: str | None = None
    verdict: Verdict = Verdict.PASSES
    basis: Basis = Basis.STRUCTURE
    reason: str = ""
    location: Location | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_layer(self) -> bool:
        return self.unknowns is not None


@dataclass
class ModelVerdict:
    status: str  # "recoverable-layerwise", "recoverable-joint", "leaks-exactly", "deficient", "unknown"
    input_recoverable: bool | None  # None when the analysis could not decide (not-understood ops)
    deficient_layers: int
    total_deficit: int
    input_deficit: int | None  # directions of the model input left undetermined (carried deficit)
    basis: Basis
    summary: str
    caveats: list[str] = field(default_factory=list)


@dataclass
class ModelReport:
    file: str
    model: str
    input_shape: list[int]  # one sample
    batch_size: int
    loss: str
    seed: int
    dtype: str
    layers: list[LayerRecord]
    verdict: ModelVerdict
    location: Location | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (enums as their values)."""
        return _plain(asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


SEVERITIES = ("info", "warning", "error")  # ascending


@dataclass
class Finding:
    """One lint finding: a rule that fired on a model or a layer, at a source location."""

    code: str  # stable rule code, e.g. "RGAP101"
    name: str  # rule name, e.g. "input-recoverable"
    severity: str  # one of SEVERITIES
    message: str
    file: str
    line: int
    col: int
    model: str
    node: str | None = None  # fx node name of the layer, None for a model-level finding
    suppressed: bool = False
