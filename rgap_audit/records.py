"""The results of an audit, as plain data: one LayerRecord per row of the walk, one ModelReport per model.

Everything downstream (rules, table, JSON, SARIF) reads these and nothing else, so the data flows
one way: load -> instance -> layer graph -> analysis -> attack -> records -> rules -> report. Every
field is declared here with its type: rules are checked against these hints when they are loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from typing import Any

SCHEMA_VERSION = "2.4"


class Verdict(StrEnum):
    """Per-row verdict of the walk."""

    LEAKS_EXACTLY = "leaks-exactly"  # a Linear with bias: x = dL/dW[j] / dL/db[j]
    RECOVERABLE = "recoverable"  # combined system has full column rank: closed-form solve
    DEFICIENT = "deficient"  # rank < unknowns: `deficit` directions undetermined
    PASSES = "passes"  # an invertible / linear op: the chain passes through it
    CHAIN_BROKEN = "chain-broken"  # a non-invertible op: forward constraints below are partial or gone
    NOT_UNDERSTOOD = "not-understood"  # the analysis has no entry for this op: never counted as safe


class Basis(StrEnum):
    """What a verdict rests on."""

    COUNTING = "counting"  # closed-form counts of constraints and unknowns
    NUMERICAL = "numerical-rank"  # exact numerical rank on a seeded random instance
    BOUNDS = "bounds"  # proven lower/upper bounds only (system too large for an exact rank)
    VERIFIED = "verified"  # a reconstruction was run and measured
    STRUCTURE = "structure"  # a fact of the operation (invertibility, bias leak)


class Chain(StrEnum):
    """How much of a layer's output z the attacker knows when it reaches this layer."""

    FULL = "full"  # z known exactly (layer above recovered, invertible ops between)
    PARTIAL = "partial"  # z known on a subspace (ReLU, pooling, deficient layer above)
    NONE = "none"  # nothing known about z


class ModelStatus(StrEnum):
    """The model verdict: can the client's input be recovered in closed form?"""

    LEAKS_EXACTLY = "leaks-exactly"  # the first layer gives its input away with no solve
    RECOVERABLE_LAYERWISE = "recoverable-layerwise"  # plain R-GAP, layer by layer
    RECOVERABLE_JOINT = "recoverable-joint"  # deficient layers, resolved by the layers below
    RECOVERABLE_VERIFIED = "recoverable-verified"  # --verify recovered what the analysis did not predict
    RECOVERABLE_GIVEN_PATTERN = "recoverable-given-pattern"  # determined if the attacker knew activation patterns
    DEFICIENT = "deficient"  # some input directions are undetermined in closed form
    UNKNOWN = "unknown"  # not decided (not-understood ops, bounds only, no weighted layer)

    @property
    def input_recoverable(self) -> bool | None:
        """True: recoverable; False: not in closed form; None: undecided."""
        return _RECOVERABLE[self]


_RECOVERABLE: dict[ModelStatus, bool | None] = {
    ModelStatus.LEAKS_EXACTLY: True,
    ModelStatus.RECOVERABLE_LAYERWISE: True,
    ModelStatus.RECOVERABLE_JOINT: True,
    ModelStatus.RECOVERABLE_VERIFIED: True,
    ModelStatus.RECOVERABLE_GIVEN_PATTERN: None,
    ModelStatus.DEFICIENT: False,
    ModelStatus.UNKNOWN: None,
}


@dataclass
class Location:
    file: str
    line: int
    col: int = 1


# ----------------------------------------------------------------------------- what a layer row may carry
@dataclass
class Undetermined:
    """Bounds on the directions of a layer's input left undetermined, carried down when no basis is kept."""

    lower: int
    upper: int


@dataclass
class Probe:
    """The forward probe of a layer too large for an exact rank (rgap_audit.fourier)."""

    error: float | None = None  # relative error of the random probe solved back from W v
    iterations: int | None = None  # preconditioned CGLS iterations
    skipped: str | None = None  # why the probe did not run


@dataclass
class ParamRowsRecord:
    """Rows an op's own parameter gradient gives on its input (BatchNorm: dL/dgamma, one per channel)."""

    parameter: str  # "gamma"
    rows: int
    redundant: bool | None = None  # measured: combinations of the weighted layer's rows below (no new rank)
    residual: float | None = None  # of the proportionality test per channel


@dataclass
class BatchSpan:
    """B > 1: the subspace the weight gradient of the layer reading the input reveals (span.py). A Linear's
    gradient rows are combinations of the samples; a convolution's (C_out x C_in k) are combinations of
    the samples' input patches (added in 2.4)."""

    rank: int  # numerical rank of dL/dW
    distance: float  # largest relative distance of a tested vector (sample, or input patch) to its row space
    samples: int  # batch size
    vectors: str = "sample"  # what the row space was tested against: "sample" (Linear) or "input patch" (convolution)
    count: int = 0  # vectors tested: B samples, or B x output positions patches
    dims: int = 0  # the dimension of the space they live in (in_features, or C_in x kernel entries)
    leak: bool = False  # RGAP404: the row space holds every tested vector and is a proper subspace of that space


@dataclass
class TokenLeak:
    """An embedding's table gradient against the tokens of the instance."""

    tokens_used: int | None  # distinct token ids in the input
    rows_nonzero: int | None  # rows of dL/dW that are non-zero


@dataclass
class SegmentRecord:
    """A joint segment's row: the cut it is ranked over, the cut it ends at, its weighted layers."""

    start: str  # fx node whose value is the segment's unknown
    end: str  # fx node whose value leaves the segment
    layers: list[str]  # its weighted layers (fx node names), output first


@dataclass
class LayerRecord:
    """One row of the walk (output first). Rank fields are None for rows that are not layers."""

    index: int  # position in the walk, 0 = closest to the output
    node: str  # torch.fx node name: unique even when a module object is reused
    op: str  # op-table name, e.g. "Conv2d", "LeakyReLU", "flatten"
    kind: str  # op-table kind: "layer", "activation", "reshape", "pool", "norm", "merge", "unknown", ...
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
    rank_method: str | None = None  # "structured-svd", "fourier-probe", "bounds"
    deficit: int | None = None  # unknowns - rank
    sigma_min_rel: float | None = None  # smallest kept singular value / largest, of the solved blocks
    chain: Chain | None = None  # what is known of this layer's output z
    chain_reason: str | None = None
    verdict: Verdict = Verdict.PASSES
    basis: Basis = Basis.STRUCTURE
    reason: str = ""
    location: Location | None = None
    seconds: float = 0.0
    samples: int | None = None  # rows the layer treats as separate samples (batch x leading dims)
    reads_input: bool = False  # the weighted layer (or embedding) that reads the model input: its input is the private one
    known_inputs: int | None = None  # input entries known to the attacker (a ReLU's zeros), not unknowns
    frozen: bool = False  # requires_grad=False: its gradient is not shared
    k_derivable: bool | None = None  # can the attacker compute dL/dz in closed form?
    undetermined: Undetermined | None = None  # carried bounds when no basis of the undetermined directions is kept
    probe: Probe | None = None
    param_rows: ParamRowsRecord | None = None
    span: BatchSpan | None = None
    tokens: TokenLeak | None = None
    segment: SegmentRecord | None = None  # set on a joint segment's row (kind "segment")
    in_segment: str | None = None  # a weighted layer inside a joint segment: the segment's name (its row decides)

    @property
    def is_layer(self) -> bool:
        return self.unknowns is not None


@dataclass
class ModelVerdict:
    status: ModelStatus
    input_recoverable: bool | None  # None when the analysis could not decide (not-understood ops)
    deficient_layers: int
    total_deficit: int
    input_deficit: int | None  # directions of the model input left undetermined (carried deficit)
    basis: Basis
    summary: str
    caveats: list[str] = field(default_factory=list)
    attacker: str | None = None  # B > 1: which attacker the verdict describes (each sample's dL/dz known, RGAP403)


@dataclass
class BatchPoint:
    """--batch-sizes: the audit at one batch size, both attackers side by side.

    (a) given each sample's dL/dz (the static verdict, RGAP403's upper bound); (b) from the summed
    gradient alone: what the first layer's weight gradient span reveals (RGAP404, a Linear reading the
    input), and with --verify what R-GAP on the summed gradient recovered."""

    batch_size: int
    status: ModelStatus  # attacker (a)
    basis: Basis
    input_deficit: int | None  # input directions undetermined for attacker (a); None when only bounded
    input_deficit_lower: int | None  # proven bounds on it (equal to it when exact); None when no input layer was ranked
    input_deficit_upper: int | None
    summary: str  # attacker (a): the verdict's summary
    span_rank: int | None  # attacker (b): rank of the first layer's weight gradient (None: no Linear or convolution reads the input, or B = 1)
    span_leak: bool | None  # attacker (b): that span holds every sample or input patch (RGAP404); None when not measured
    summed: str  # attacker (b) in one sentence (the span, and --verify's outcome on the summed gradient when run)
    seconds: float  # the audit at this batch size (instance and analysis)


# ----------------------------------------------------------------------------- --verify
@dataclass
class Metrics:
    """A reconstruction against the truth: relative error, and MSE / PSNR / SSIM on the original's [min, max] -> [0, 1]."""

    rel_error: float
    mse: float
    psnr_db: float | None  # peak 1.0; None when the MSE is 0
    ssim: float | None = None  # mean SSIM (Wang et al. 2004, 11x11 Gaussian window); None when not an image


@dataclass
class Criterion:
    """What --verify counts as recovered, stated in every verification (rgap_audit.verify.criterion)."""

    eps: float  # float64 unit roundoff: the rounding each solve is taken to add
    factor: float  # a measured error up to factor x the predicted one is within what the conditioning allows
    leak_psnr_db: float  # a reconstruction is a privacy leak at PSNR >= this (peak 1, input mapped to [0, 1]) ...
    leak_ssim: float  # ... or at SSIM >= this
    rule: str  # the definition in words


@dataclass
class VerifyRun:
    """--verify on one input (one of --verify-seeds): its outcome in one record."""

    seed: int | None  # the input's seed; None for --input
    confirmed: bool | None
    rel_error: float | None
    psnr_db: float | None
    ssim: float | None
    leak: bool | None  # PSNR or SSIM at or above the criterion's thresholds
    within_conditioning: bool | None  # every compared layer's error within what the conditioning allows
    predicted_error: float | None  # at the model input, of the variant measured
    error_entered_at: str | None  # node where the error first exceeded what the conditioning allows
    variant: str | None
    summary: str


@dataclass
class VerifiedLayer:
    """One weighted layer of the attack next to the static row."""

    node: str
    module_path: str | None
    op: str
    static_verdict: str | None
    static_deficit: int | None
    measured_nullity: int | None  # undetermined directions of the attack's own system given the pattern it ends with (rank code)
    rel_error: float | None  # of the recovered layer input
    method: str
    residual_grad: float | None
    residual_fwd: float | None
    rows_lost: int = 0
    seconds: float = 0.0
    rel_error_projected: float | None = None
    measured_nullity_projected: int | None = None
    carried_in: int | None = None
    measured_nullity_without_pattern: int | None = None  # before the entries a ReLU below zeroes are taken as known
    solve_gain: float | None = None  # relative error growth of this layer's own solve (1 / sigma_min_rel)
    link_gain: float | None = None  # relative error growth through the inverted ops above it (0: reads nothing above)
    predicted_error: float | None = None  # what float64 rounding grows to here through the measured gains (plain)
    within_conditioning: bool | None = None  # rel_error <= factor x predicted_error; None: undetermined or not predicted
    predicted_error_projected: float | None = None
    within_conditioning_projected: bool | None = None


@dataclass
class SampleError:
    """B > 1: the reconstruction against one sample of the batch."""

    sample: int
    label: float | int
    rel_error: float | None
    mse: float | None
    psnr_db: float | None
    candidate: str | None
    recovered: bool


@dataclass
class Combination:
    """B > 1: the least-squares combination of the samples closest to the reconstruction."""

    coefficients: list[float]
    residual_rel: float | None
    samples_rank: int
    fills_input_space: bool
    candidate: str | None = None
    tolerance: float | None = None
    combination: bool = False


@dataclass
class SpanLeak:
    """B > 1: the row space of the first Linear's weight gradient against the samples (measured)."""

    layer: str
    module_path: str | None
    parameter: str
    weight_gradient_shape: list[int]
    numerical_rank: int
    rank_rtol: float
    rank_rule: str
    singular_values_rel: list[float]
    distance_rel: list[float]
    in_row_space_tol: float
    all_in_row_space: bool
    summary: str


@dataclass
class Tile:
    """One picture of a reconstruction panel: an 8-bit PNG (base64) and the values its 0 and 255 stand for."""

    kind: str  # "original", "reconstruction" (original's range), "rescaled" (own range), "difference" (|x' - x|)
    png: str  # base64 of a grey (C = 1, and the difference) or RGB PNG at the input's resolution
    lo: float
    hi: float


@dataclass
class Panel:
    """One row of the reconstruction figure (--verify on an image-shaped input): what it compares and how well."""

    label: str  # "plain R-GAP", "projected variant", "sample 0", ...
    rel_error: float | None
    psnr_db: float | None
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class Verification:
    """What --verify measured: the attack on the instance, and whether it confirms the static verdict."""

    attempted: bool
    confirmed: bool | None  # None: neither confirms nor contradicts
    summary: str
    input: str | None = None
    weights: str | None = None
    loss: str | None = None
    rel_error: float | None = None
    mse: float | None = None
    psnr_db: float | None = None
    scaling: str | None = None
    seconds: float | None = None
    tolerance: float | None = None  # B > 1: relative error up to which a sample counts as recovered (B = 1: criterion)
    label: float | int | None = None
    label_recovered: float | int | None = None
    label_status: str | None = None
    variant: str | None = None
    plain: Metrics | None = None
    projected: Metrics | None = None
    ambiguous_inputs: int | None = None
    layers: list[VerifiedLayer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    image: str | None = None
    panels: list[Panel] = field(default_factory=list)  # the pictures, so that a report renders from the JSON alone
    settled: str | None = None  # the model verdict this measurement changed, and how
    given_pattern: list[str] = field(default_factory=list)  # joint segments solved at the true input's activation patterns
    # what "recovered" means, and the runs on several inputs (B = 1)
    criterion: Criterion | None = None
    ssim: float | None = None
    leak: bool | None = None  # every run's reconstruction a privacy leak by the criterion's thresholds
    within_conditioning: bool | None = None  # of the first run
    predicted_error: float | None = None  # of the first run, at the model input
    error_entered_at: str | None = None  # of the first run that was not within the conditioning
    runs: list[VerifyRun] = field(default_factory=list)
    median_rel_error: float | None = None
    worst_rel_error: float | None = None
    worst_psnr_db: float | None = None
    worst_ssim: float | None = None
    # batches (B > 1)
    batch_size: int | None = None
    attack: str | None = None
    outcome: str | None = None
    reason: str | None = None
    labels: list[float | int] | None = None
    candidates: int | None = None
    per_sample: list[SampleError] | None = None
    nearest_sample: int | None = None
    combination: Combination | None = None
    span_leak: SpanLeak | None = None
    span_leak_reason: str | None = None


@dataclass
class Identifiability:
    """--identifiability: rank and spectrum of d(gradient)/d(input) on the instance."""

    unknowns: int
    gradient_entries: int
    rank: int
    deficit: int
    locally_unique: bool
    sigma_min_rel: float | None
    singular_values: list[float]
    rank_tol: float
    method: str
    seconds: float
    summary: str
    plot: str | None = None


# ----------------------------------------------------------------------------- --defences
@dataclass
class NoisePoint:
    """The attack on clipped, noised gradients at one noise multiplier sigma: one run per noise seed."""

    sigma: float  # noise multiplier: Gaussian noise of standard deviation sigma * clip_norm on every entry
    rel_errors: list[float | None]  # per noise seed: |x' - x| / |x| of the best reconstruction (None: nothing came back)
    psnr_db: list[float | None]  # per noise seed (peak 1, the input mapped to [0, 1])
    median_rel_error: float | None
    predicted_rel_error: float | None  # first order: sigma x the per-layer probes' input errors added in quadrature
    bound_rel_error: float | None  # first-order worst case from the noiseless run's per-layer gains


@dataclass
class PrivacyCost:
    """What a noise multiplier costs in differential privacy, from a maintained accountant (never by hand)."""

    sigma: float
    delta: float
    epsilon_one_release: float | None  # one Gaussian release (sample rate 1, one step); None: not computed
    rounds: int  # T
    sample_rate: float  # q
    epsilon_rounds: float | None  # T rounds at sampling rate q
    accountant: str  # e.g. "opacus 1.6.0 RDPAccountant"
    note: str | None = None  # why a value is missing


@dataclass
class LayerNoiseGain:
    """How one weighted layer's conditioning amplifies noise in its own gradient, up to the model input."""

    node: str
    module_path: str | None
    solve_gain: float | None  # 1 / sigma_min_rel of the system the attack solved (the number behind RGAP204)
    link_gain: float | None  # error growth through the inverted ops above it
    noise_to_signal: float | None  # |noise| / |dL/dW| of this layer at sigma = 1 (clip_norm * sqrt(entries) / |dL/dW|)
    input_error_per_sigma: float | None  # measured: the input's relative error per unit sigma with noise on this layer alone
    # (0: below the noiseless run's rounding error at the probe sigma)
    amplification: float | None  # input_error_per_sigma / noise_to_signal: how much the attack amplifies this layer's noise
    bound_amplification: float | None  # the worst case of the same from the gains (solve_gain x the gains below)
    share: float | None  # this layer's part of the predicted input error variance (0..1)


@dataclass
class NoiseDefence:
    """DP-SGD-style noise: per-sample clipping to clip_norm, Gaussian noise sigma * clip_norm, the attack measured."""

    clip_norm: float
    clip_norm_source: str  # "the instance's gradient norm" or "--clip-norm"
    threshold: float  # the attack is stopped at a relative error above this
    seeds: int  # noise draws per sigma
    points: list[NoisePoint]
    sigma_stop: float | None  # median over seeds of the smallest sigma whose error exceeds the threshold (log-log interpolated)
    sigma_stop_low: float | None  # spread over seeds
    sigma_stop_high: float | None
    sigma_stop_predicted: float | None  # where the first-order prediction (per-layer probes) reaches the threshold
    sigma_stop_bound: float | None  # where the first-order worst case reaches it: below this the attack is not stopped
    probe_sigma: float  # the noise multiplier of the per-layer probes
    privacy: PrivacyCost | None
    layers: list[LayerNoiseGain]
    attack_runs: int
    seconds: float
    summary: str
    panels: list[Panel] = field(default_factory=list)  # reconstructions at three noise levels (image-shaped inputs)
    image: str | None = None  # --save-images: the PNG of error against sigma


@dataclass
class CompressionPoint:
    """The attack on a compressed gradient: top-k per tensor or per-tensor quantisation."""

    method: str  # "top-k", "fp16", "int8"
    keep_fraction: float | None  # top-k: fraction of each tensor's entries kept
    bits: int | None  # quantisation: bits per entry
    rel_error: float | None
    psnr_db: float | None
    stops: bool  # rel_error above the threshold (or nothing recovered)


@dataclass
class CompressionDefence:
    """Gradient compression as FL stacks ship it, measured on the audited input (deterministic: one run per level)."""

    threshold: float
    points: list[CompressionPoint]
    topk_stop: float | None  # the largest kept fraction of the sweep that stops the attack
    quantisation_stop: str | None  # the widest quantisation that stops it ("fp16", "int8"), None: neither
    attack_runs: int
    seconds: float
    summary: str


@dataclass
class BatchVerdictPoint:
    """The static verdict at one batch size (--defences' batch threshold)."""

    batch_size: int
    status: ModelStatus
    input_recoverable: bool | None
    input_deficit: int | None


@dataclass
class BatchDefence:
    """The smallest batch size at which the static verdict stops saying recoverable."""

    max_batch: int
    points: list[BatchVerdictPoint]
    batch_stop: int | None  # None: recoverable at every batch size tried
    caveat: str  # RGAP403: each sample's dL/dz is taken from the instance (the attacker's best case)
    verification: Verification | None  # --verify's batch attack at batch_stop, when run
    seconds: float
    summary: str


@dataclass
class ArchitectureEdit:
    """One single edit of the model (machine-readable: apply it with rgap_audit.defence.architecture.apply_edit)."""

    layer: str  # dotted module path of the edited layer
    node: str  # its torch.fx node in the original model
    attribute: str  # "out_channels" / "out_features", "stride", "kernel_size", "pool_after"
    old: list[int]  # the attribute's value before (per spatial dim for stride / kernel; [] for pool_after)
    new: list[int]  # after (pool_after: the average pool's kernel, per spatial dim)
    status: ModelStatus  # the re-audit's verdict
    input_deficit: int | None  # directions of the model input left undetermined after the edit
    params_lost: int  # parameters of the whole model lost (negative: gained)
    params_lost_layer_pct: float  # of the edited layer's own parameters, in percent
    macs_lost: int  # multiply-adds per sample lost (negative: gained)
    text: str  # "conv 0: out_channels 12 -> 8"


@dataclass
class ArchitectureDefence:
    """Single edits that make the input not recoverable, re-audited in full, cheapest first."""

    tried: int  # edited models audited
    not_tried: int  # candidate edits left when the time budget was spent
    edits: list[ArchitectureEdit]  # those that work, ranked by cost (parameters, then multiply-adds, lost)
    best: ArchitectureEdit | None
    failed: list[str]  # edits that could not be built or audited, with the reason
    seconds: float
    summary: str


@dataclass
class Defences:
    """--defences: the noise, compression, batch size and architecture change that stop the closed-form attack."""

    noise: NoiseDefence | None = None
    compression: CompressionDefence | None = None
    batch: BatchDefence | None = None
    architecture: ArchitectureDefence | None = None
    skipped: list[str] = field(default_factory=list)  # parts not run, with the reason
    seconds: float = 0.0


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
    tolerances: dict[str, float | str] = field(default_factory=dict)  # rgap_audit.tolerances.summary()
    verification: Verification | None = None
    identifiability: Identifiability | None = None
    output: str | None = None  # which of forward's outputs the loss sees, when it returns several ("[0] of the tuple ...")
    private_input: str | None = None  # which of forward's arguments is the input, when it takes several, and its batch dim
    cached: bool = False  # served from the results cache (rgap_audit.cache): the stored report of an unchanged file
    defences: Defences | None = None  # --defences (rgap_audit.defence)
    batch_sweep: list[BatchPoint] | None = None  # --batch-sizes: one audit per batch size (this report is the first)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (enums as their values)."""
        return plain(asdict(self))


def plain(obj: Any) -> Any:
    """Dataclasses, enums and containers as plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


SEVERITIES = ("info", "warning", "error")  # ascending
STAGES = ("usage", "config", "load", "trace", "analysis", "identifiability", "verify", "defences", "rules", "report")  # where an error happened


@dataclass
class ErrorRecord:
    """One error of a run (a file, model or step that failed), as every format reports it; exit code 2."""

    file: str | None  # None for usage errors that concern no file
    line: int | None
    model: str | None
    stage: str  # one of STAGES
    message: str  # the cause, one line


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
