"""The R-GAP walk on the layer graph: head, then one weighted layer at a time down to the input.

Between two weighted layers sits a *link*: the ops that turn layer i's output z_i into layer i+1's
input x_{i+1} (activations, reshapes, identities). The walk inverts the link (op-table inverses;
ReLU keeps only its active entries), linearises it at the recovered z to carry dL/dz down
(k_i = J^T W_{i+1}^T k_{i+1}) and, in the projected variant, to carry the undetermined directions of
x_{i+1} down as directions of z_i that the forward rows must not use (docs/DESIGN.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from rgap_audit import links, ops, progress
from rgap_audit.attack.heads import (
    HeadCandidate,
    HeadResult,
    ce_bias_head,
    ce_nobias_head,
    logistic_head,
)
from rgap_audit.attack.segment import DENSE_LIMIT, SegmentProblem, solve_estimated, solve_given
from rgap_audit.attack.solve import solve_layer
from rgap_audit.choices import LOSSES
from rgap_audit.convspec import ConvSpec
from rgap_audit.errors import AttackUnsupported, AuditError
from rgap_audit.instance import bare_instance, record
from rgap_audit.layergraph import LayerGraph
from rgap_audit.links import Link
from rgap_audit.losses import loss_value
from rgap_audit.ops import IDENTITY, LAYER, RESHAPE
from rgap_audit.rank import _tol_rank as rank_rule
from rgap_audit.segments import Segment, common_module_path, joint_segments
from rgap_audit.threads import single_thread
from rgap_audit.tolerances import PRUNE_FACTOR

MAX_PROJECTED_ITERS = 20


# ----------------------------------------------------------------------------- results
@dataclass
class LayerStep:
    """One weighted layer of the walk (output first): how its input was recovered and how well."""

    node: str
    module_path: str | None
    op: str
    method: str
    unknowns: int
    grad_rank: int | None = None
    nullity: int | None = None  # undetermined directions of this layer's input in the attack's system (rank code)
    nullity_given_pattern: int | None = None  # the same once entries a clip below sets to its bound are known
    carried_in: int = 0  # directions of z left undetermined above and projected out (projected variant)
    fwd_rows: int = 0  # forward rows used (known entries of z)
    rows_lost: int = 0  # entries of z not known (ReLU off, saturated units)
    residual_grad: float | None = None
    residual_fwd: float | None = None
    residual_bias: float | None = None  # |sum k - dL/db| / |dL/db|: the bias as a check of k
    sigma_min_rel: float | None = None
    # error growth (first order, worst case; read by verify's conditioning criterion): a relative error r in the layer
    # above's input reaches this layer's right-hand side as at most link_gain * r (0: the solve does not read the
    # layer above), and a relative error r there reaches this layer's input as at most solve_gain * r
    link_gain: float | None = None  # max |dz/dx'| |x'| / |z - b| over the units the inverted link keeps
    solve_gain: float | None = None  # 1 / sigma_min_rel of the solved system; the head: its closed form's own
    rel_error: float | None = None  # |x - x_true| / |x_true| of this layer's input, when the truth is given
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    pattern: str | None = None  # a joint segment's activation patterns: "given" (the true input's) or "estimated"


@dataclass
class Reconstruction:
    """What R-GAP recovered from one gradient.

    input: the recovered client input, shape (1, *input_shape), or None when the chain is cut.
    layers: per weighted layer, output first. projected: the projected variant, run when some layer was
    deficient (None otherwise). rel_error: against the true input, when the caller supplied it.
    """

    input: torch.Tensor | None
    label: float | int | None
    label_status: str
    variant: str
    layers: list[LayerStep]
    warnings: list[str]
    seconds: float
    complete: bool
    gradient_residual: float | None
    head: dict[str, Any]
    rel_error: float | None = None
    projected: Reconstruction | None = None
    alternatives: list[torch.Tensor] = field(default_factory=list)  # other inputs that fit the gradient as well
    input_gain: float | None = None  # link_gain of the ops between the lowest weighted layer and the model input

    def patterns_given(self) -> list[str]:
        """The joint segments solved at the true input's activation patterns (the audit's assumption)."""
        return [s.node for s in self.layers if s.pattern == "given"]

    def best(self) -> Reconstruction:
        """The variant whose re-computed gradient matches best (decidable without the true input)."""
        if self.projected is None or self.projected.gradient_residual is None:
            return self
        if self.gradient_residual is None or self.projected.gradient_residual < self.gradient_residual:
            return self.projected
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        return {
            "variant": self.variant,
            "complete": self.complete,
            "label": self.label,
            "label_status": self.label_status,
            "rel_error": self.rel_error,
            "gradient_residual": self.gradient_residual,
            "seconds": self.seconds,
            "head": _plain(self.head),
            "layers": [_plain(asdict(s)) for s in self.layers],
            "warnings": list(self.warnings),
            "alternatives": len(self.alternatives),
            "projected": None if self.projected is None else self.projected.to_dict(),
        }


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


INTEGER_INPUT = (
    "the input is integer token ids: closed-form R-GAP solves for real-valued inputs; what the gradient gives away "
    "about the tokens (the set used, through the embedding's gradient) is in the static report"
)


# ----------------------------------------------------------------------------- the model, traced once
class _Context:
    """The traced model (a layer graph with the constants of one run), the gradients per weighted node
    and the loss. Nothing here traces: the graph comes from an Instance."""

    def __init__(self, graph: LayerGraph, env: dict[str, Any], gradients: dict[str, torch.Tensor], input_shape, loss: str):
        if loss not in LOSSES:
            raise AuditError(f"unsupported loss {loss!r} for reconstruction; supported: {', '.join(LOSSES)}")
        self.loss = loss
        self.input_shape = tuple(int(s) for s in input_shape)
        self.lg = graph
        self.gm = graph.gm
        self.env = env
        self.cache: dict = {}  # factorisations of a layer's forward rows, reused between solves of that layer
        self.specs: dict[str, ConvSpec] = {}
        self.params: dict[str, tuple[str, str | None]] = {}
        self.grads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.raw_grads: dict[str, torch.Tensor] = {}  # as given, per parameter name
        self.segments: dict[str, Segment] = {sg.name: sg for sg in joint_segments(graph)}
        self.ends = {sg.end: sg.name for sg in self.segments.values()}
        self.true_values: dict[str, torch.Tensor] | None = None  # the true input's run, when verifying
        for name in self.lg.weighted():
            try:
                spec = self.lg.conv_spec(name)
            except (ValueError, TypeError) as exc:
                raise AuditError(f"layer {name}: {exc}") from exc
            if not isinstance(spec, ConvSpec):
                raise AttackUnsupported(
                    f"layer {name} ({self.lg.node(name).info.name}): the closed-form attack does not handle "
                    "transposed convolutions yet (the static analysis does, through the equivalent convolution)"
                )
            self.specs[name] = spec
            self.params[name] = self._param_names(name)
            self.grads[name] = self._gradient(name, gradients)

    def _param_names(self, name: str) -> tuple[str, str | None]:
        wn, bn = self.lg.param_names(name)
        if wn is None:
            raise AuditError(f"layer {name}: its weight is not a parameter of the model; cannot match its gradient")
        return wn, bn

    def _gradient(self, name: str, gradients: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        spec = self.specs[name]
        wn, bn = self.params[name]
        transposed = self.lg.node(name).info.param_transposed  # x @ W: the layer's weight is W^T
        out: list[torch.Tensor | None] = []
        for pname, ref in ((wn, spec.weight), (bn, spec.bias)):
            if pname is None or ref is None:
                out.append(None)
                continue
            if pname not in gradients:
                raise AuditError(f"no gradient given for parameter {pname!r} (layer {name})")
            g = torch.as_tensor(gradients[pname]).detach().to(torch.float64)
            self.raw_grads[pname] = g
            if transposed and pname == wn and g.dim() == 2:
                g = g.T
            if pname == wn and g.dim() == 1 and ref.dim() == 2 and g.numel() == ref.numel():
                g = g.reshape(ref.shape)  # x @ w with a 1-d w: one output
            if tuple(g.shape) != tuple(ref.shape):
                raise AuditError(f"gradient of {pname!r} has shape {tuple(g.shape)}, the parameter {tuple(ref.shape)}")
            if not torch.isfinite(g).all():
                raise AuditError(f"gradient of {pname!r} contains NaN or Inf")
            out.append(g)
        assert out[0] is not None
        return out[0], out[1]

    # ------------------------------------------------------------------ graph helpers
    def x_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.lg.node(name).in_shape or ())

    def out_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.lg.node(name).out_shape or ())

    def link_below(self, layer: str) -> Link:
        """Ops from the unit below's output up to `layer`'s input (rgap_audit.links; `layer` a weighted layer
        or a joint segment, whose input is its start cut), cut at the first op the closed-form attack does
        not invert. A joint segment below reads the link as a function (its solve needs no inverse)."""
        return self.cut_for_attack(self.raw_link_below(layer))

    def cut_for_attack(self, link: Link) -> Link:
        """`link` cut at the first op the closed-form attack does not invert (unless a joint segment reads it)."""
        if link.cut is None and link.lower not in self.segments:
            stop = link.attack_cut()
            if stop is not None:
                return Link(None, link.upper, link.steps, f"{stop.node} ({stop.name}): {stop.info.why}")
        return link

    def raw_link_below(self, layer: str) -> Link:
        """links.below for a weighted layer or a joint segment, not cut where the attack cannot invert."""
        seg = self.segments.get(layer)
        return links.below(self.lg, layer, self.env, self.ends, start=None if seg is None else seg.start)

    def read_through(self, link: Link) -> Segment | None:
        """The layer at the lower end of `link` (raw_link_below) when its output reaches the layer above only
        through ops the attack does not invert but can replay (pooling, a linear map): solved as a one-layer
        segment over its own input, the link read as a function of its output (the same least-squares solve
        as a joint segment)."""
        if link.cut is not None or link.lower is None or link.lower in self.segments or link.lower == self.lg.input_node:
            return None
        if link.attack_cut() is None or not link.steps:
            return None
        lower = link.lower
        return Segment(lower, self.lg.data_args(lower)[0], link.steps[-1].node, (lower, *link.nodes), (lower,))

    def positively_homogeneous_below(self, head: str) -> bool:
        """True when every layer below the head is bias-free and every link op commutes with c > 0."""
        layer = head
        while True:
            link = self.link_below(layer)
            if link.lower is None or link.cut is not None or link.lower in self.segments:
                return False
            for s in link.steps:
                if s.role != ops.PASS and not s.info.homogeneous:
                    return False
            if link.lower == self.lg.input_node:
                return True
            if self.specs[link.lower].bias is not None:
                return False
            layer = link.lower

    def head_node(self) -> tuple[str, list[str]]:
        """The weighted layer producing the output, through reshapes/identities only."""
        srcs = self.lg.data_args(self.lg.output_node)
        if len(srcs) != 1:
            raise AttackUnsupported("the model returns several tensors; R-GAP needs one output")
        node, passed = srcs[0], list[str]()
        while True:
            info = self.lg.node(node).info
            if info.kind == LAYER:
                return node, passed
            if info.kind in (RESHAPE, IDENTITY) and len(self.lg.data_args(node)) == 1:
                passed.append(node)
                node = self.lg.data_args(node)[0]
                continue
            raise AttackUnsupported(  # a limit of the attack (softmax heads, pooling heads), not bad input
                f"unsupported head: the output comes from {node} ({info.name}); the closed-form heads need the "
                "output to be a Linear layer's (optionally reshaped; a log-softmax before cross-entropy is folded into the loss)"
            )


# ----------------------------------------------------------------------------- the walk
@dataclass
class _State:
    """Where the walk stands after a layer: its node, recovered input x, output gradient k, null basis."""

    layer: str
    x: torch.Tensor
    k: torch.Tensor | None
    null: torch.Tensor | None
    g: torch.Tensor | None = None  # dL/dx, where x is a joint segment's input (a layer's: W^T k)


@dataclass
class _Descent:
    input: torch.Tensor | None
    layers: list[LayerStep]
    states: list[_State]
    warnings: list[str]
    complete: bool
    input_gain: float | None = None


def _link_gain(link: Link, x_top: torch.Tensor, spec: ConvSpec | None) -> float | None:
    """How much a relative error of x' (the link's end) can grow into z - b (spec's bias; None: no layer, the model
    input) through the inverted link: max |dz/dx'| over the units it keeps, times |x'| / |z - b|. Elementwise ops
    and permutations only (the attack's links), so the inverse Jacobian is the diagonal that `pull` divides by."""
    z = link.invert(x_top)
    _, derivs = link.forward(z)
    inv = link.pull(derivs, torch.ones_like(x_top), "inv").reshape(-1).abs()
    kept = inv > 0
    if not bool(kept.any()):
        return None
    zb = z.reshape(-1)
    if spec is not None and spec.bias is not None:
        n = z.numel() // spec.n_out
        zb = (z.reshape(n, spec.out_channels, -1) - spec.bias.reshape(1, -1, 1)).reshape(-1)
    ref = float(zb[kept].norm())
    return math.inf if ref == 0 else float(inv[kept].max()) * float(x_top.norm()) / ref


def _count_given_pattern(ctx: _Context, steps: list[LayerStep], states: list[_State], x: torch.Tensor | None) -> None:
    """Nullity as the audit counts it: entries that a clip below sets to its bound (a ReLU's zeros) are
    known given the activation pattern, so directions along them are not undetermined. The pattern is
    the one the attacker ends with: the forward pass of its recovered input."""
    if x is None:
        return
    values = record(ctx.lg, x.reshape(1, *ctx.input_shape), None).values
    nulls = {st.layer: st.null for st in states}
    for step in steps:
        if step.node in ctx.segments:
            continue
        null = nulls.get(step.node)
        if null is None or not null.shape[1] or step.nullity is None:
            continue
        clipped = ctx.link_below(step.node).clipped_entries(values[ctx.lg.data_args(step.node)[0]])
        if clipped is not None and bool(clipped.any()):
            step.nullity_given_pattern = step.nullity - _rank_of(null[clipped.reshape(-1)])


def _rank_of(a: torch.Tensor) -> int:
    """Numerical rank by the rank code's rule (rgap_audit.rank)."""
    if a.numel() == 0:
        return 0
    sv = torch.linalg.svdvals(a).numpy()
    return rank_rule(sv, (int(a.shape[0]), int(a.shape[1])))[0]


def _vjp_input(spec: ConvSpec, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """W^T k: dL/dx of a layer from its output gradient."""
    xx = x.detach().requires_grad_(True)
    z = spec.forward(xx, with_bias=False)
    (g,) = torch.autograd.grad((z * k.reshape(z.shape)).sum(), xx)
    return g


def _bias_check(spec: ConvSpec, k: torch.Tensor, db: torch.Tensor | None) -> float | None:
    if db is None:
        return None
    s = k.reshape(-1, spec.out_channels, max(1, spec.n_out // spec.out_channels)).sum(dim=(0, 2))
    return float((s - db).norm() / db.norm().clamp_min(1e-300))


def _descend(
    ctx: _Context, start: _State, projected: bool, truth: dict | None
) -> Generator[LayerStep, None, _Descent]:
    """Walk from `start` (a solved layer) down; yields a LayerStep per layer, returns a _Descent."""
    warnings: list[str] = []
    layers: list[LayerStep] = []
    states: list[_State] = []
    layer, x, k, g_top = start.layer, start.x, start.k, start.g
    S = start.null if projected else None
    if S is not None and S.shape[1] == 0:
        S = None
    while True:
        if g_top is None:
            assert k is not None
            g_top = _vjp_input(ctx.specs[layer], x, k)
        raw = ctx.raw_link_below(layer)
        link = ctx.cut_for_attack(raw)
        through = ctx.read_through(raw)
        if through is not None:
            link = Link(through.name, layer, [])
        if link.lower is None or link.cut is not None:
            warnings.append(f"the walk stops below {layer}: {link.cut}")
            return _Descent(None, layers, states, warnings, False)
        if link.lower in ctx.segments or through is not None:
            seg = through if through is not None else ctx.segments[link.lower]
            seg_step, seg_state = _segment_step(ctx, seg, link, x, g_top, warnings, one_layer=through is not None, unknown=S)
            layers.append(seg_step)
            if seg_state is None:
                return _Descent(None, layers, states, warnings, False)
            states.append(seg_state)
            progress.step("attack", f"{'projected' if projected else 'plain'}: {seg_step.module_path or seg_step.node} solved")
            yield seg_step
            layer, x, k, g_top = seg_state.layer, seg_state.x, seg_state.k, seg_state.g
            S = seg_state.null if (projected and seg_state.null is not None and seg_state.null.shape[1] > 0) else None
            continue
        if link.lower == ctx.lg.input_node:
            z = link.invert(x)
            if link.clips:
                mask = link.known_mask(link.forward(z)[1])
                lost = 0 if mask is None else int((~mask).sum())
                if lost:
                    warnings.append(f"{lost} input entries sit behind an inactive ReLU and are not recovered")
            gain = _link_gain(link, x, None) if link.steps else 1.0
            return _Descent(z.reshape(1, *ctx.input_shape), layers, states, warnings, True, gain)
        below = link.lower
        t0 = time.perf_counter()
        bspec = ctx.specs[below]
        dw, db = ctx.grads[below]
        xs = ctx.x_shape(below)
        zshape = ctx.out_shape(below)
        attrs = ctx.lg.node(below)
        step = LayerStep(below, attrs.module_path, attrs.info.name, "", math.prod(xs))
        n_samples = math.prod(xs) // bspec.n_in
        null = None
        leak = attrs.info.leak
        if db is not None and leak is not None and leak(ops.LeakContext(attrs.module, bspec, x, db.reshape(1, -1), n_samples)):
            # a Linear with bias leaks its input exactly: x = dW^T db / |db|^2, and k = db
            xi = (dw.T @ db / db.norm() ** 2).reshape(xs)
            _, derivs = link.forward(link.invert(x))
            k_chain = link.pull(derivs, g_top, "vjp")
            ki = db.reshape(zshape).clone()
            step.method = "bias leak: x = dW^T db / |db|^2 (exact)"
            step.grad_rank, step.nullity, step.fwd_rows = bspec.n_in, 0, 0
            step.residual_bias = float((k_chain.reshape(-1) - db).norm() / db.norm())
            step.residual_grad = float((torch.outer(db, xi.reshape(-1)) - dw).norm() / dw.norm().clamp_min(1e-300))
            step.link_gain, step.solve_gain = 0.0, 1.0  # dL/dW and dL/db alone; the system db (x) I has condition 1
            null = torch.zeros(xi.numel(), 0, dtype=torch.float64)
            S = None
        else:
            z_hat = link.invert(x)
            # with carried directions the activation pattern below them is uncertain, and k (hence the
            # gradient rows) depends on it: estimate the pattern with the forward rows, gradient rows as check
            rows = "check" if (S is not None and not link.only_reshapes) else "use"
            sol, ki, mask = _solve_linearised(ctx, below, link, bspec, xs, dw, x, g_top, z_hat, S, rows)
            if S is not None:
                # the pattern of a deficient layer's recovered input may be wrong where it is undetermined:
                # re-linearise at the solved z until the activation pattern settles
                pat, iters, settled = link.pattern(z_hat), 0, False
                best = (sol.residual_fwd if sol.residual_fwd is not None else math.inf, sol, ki, mask)
                max_passes = MAX_PROJECTED_ITERS if sol.nullity == 0 else (3 if sol.nullity is None else 1)
                for iters in range(1, max_passes + 1):
                    z_new = bspec.forward(sol.x).reshape(zshape)
                    new_pat = link.pattern(z_new)
                    if new_pat == pat and iters > 1:
                        settled = True
                        break
                    sol2, ki2, mask2 = _solve_linearised(ctx, below, link, bspec, xs, dw, x, g_top, z_new, S, rows)
                    change = float((sol2.x - sol.x).norm() / sol.x.norm().clamp_min(1e-300))
                    sol, ki, mask, pat = sol2, ki2, mask2, new_pat
                    rf = sol.residual_fwd if sol.residual_fwd is not None else math.inf
                    if rf <= best[0]:
                        best = (rf, sol, ki, mask)
                    if change < 1e-13:
                        settled = True
                        break
                if settled:
                    step.notes.append(f"re-linearised the link at the solved z: the activation pattern settled after {iters} pass(es)")
                    if rows == "check":  # the pattern is fixed now: one solve with the gradient rows too
                        sol, ki, mask = _solve_linearised(ctx, below, link, bspec, xs, dw, x, g_top, bspec.forward(sol.x).reshape(zshape), S)
                elif sol.nullity:
                    step.notes.append(
                        "this layer is itself undetermined given the carried directions: the activation pattern of its "
                        "output was not re-estimated"
                    )
                else:
                    _, sol, ki, mask = best
                    step.notes.append(
                        f"the activation pattern did not settle in {max_passes} passes; kept the pass with the "
                        "smallest forward residual (the projected solve needs the pattern of the undetermined layer's input)"
                    )
                    warnings.append(f"{below}: activation pattern did not settle; the projected recovery is approximate")
            step.method = sol.method
            step.grad_rank, step.nullity = sol.grad_rank, sol.nullity
            step.nullity_given_pattern = sol.nullity
            step.fwd_rows, step.rows_lost = sol.fwd_rows, int(mask.numel() - mask.sum())
            step.residual_grad, step.residual_fwd = sol.residual_grad, sol.residual_fwd
            step.sigma_min_rel = sol.sigma_min_rel
            step.solve_gain = None if not sol.sigma_min_rel else 1.0 / sol.sigma_min_rel
            step.link_gain = _link_gain(link, x, bspec)
            step.residual_bias = _bias_check(bspec, ki, db)
            step.carried_in = 0 if S is None else int(S.shape[1])
            step.notes.extend(sol.notes)
            if step.rows_lost and link.clips:
                step.notes.append(f"{step.rows_lost} of {mask.numel()} output units are off (ReLU): their forward rows are lost")
            xi, null = sol.x, sol.null_basis
            S = null if (projected and null is not None and null.shape[1] > 0) else None
        step.seconds = time.perf_counter() - t0
        if truth is not None and truth.get(below) is not None:
            tx = truth[below]
            step.rel_error = float((xi - tx).norm() / tx.norm().clamp_min(1e-300))
        layers.append(step)
        states.append(_State(below, xi, ki, null))
        progress.step("attack", f"{'projected' if projected else 'plain'}: {step.module_path or below} solved")
        yield step
        layer, x, k, g_top = below, xi, ki, None


def _segment_step(
    ctx: _Context,
    seg: Segment,
    link: Link,
    x_top: torch.Tensor,
    g_top: torch.Tensor,
    warnings: list[str],
    one_layer: bool = False,
    unknown: torch.Tensor | None = None,
) -> tuple[LayerStep, _State | None]:
    """Solve a joint segment for the value of its input cut (rgap_audit.attack.segment).

    With the true input known (verification) the system is solved at the true activation patterns, the
    audit's assumption, and also with the patterns estimated from the gradient alone; the walk goes on
    from the first. Without it, only the estimate exists."""
    t0 = time.perf_counter()
    op = ctx.lg.node(seg.name).info.name if one_layer else "segment"
    step = LayerStep(seg.name, common_module_path(ctx.lg, seg) or None, op, "", math.prod(ctx.lg.node(seg.start).out_shape or ()))
    try:
        below = ctx.link_below(seg.name)
        dws = {n: ctx.grads[n][0] for n in seg.layers}
        prob = SegmentProblem(ctx.lg, seg, link, below, ctx.env, ctx.specs, dws, x_top, g_top, unknown)
        size = prob.target.numel() * math.prod(prob.u_shape)
        truth = None if ctx.true_values is None else ctx.true_values[seg.start].reshape(prob.u_shape)
        est = solve_estimated(prob) if (truth is None or size <= DENSE_LIMIT) else None
        sol = solve_given(prob, truth) if truth is not None else est
    except Exception as exc:  # an op without forward-mode AD, a shape the segment function cannot replay
        step.method = "not solved"
        step.notes.append(f"{type(exc).__name__}: {exc}")
        step.seconds = time.perf_counter() - t0
        warnings.append(f"the walk stops at joint segment {seg.name}: {type(exc).__name__}: {exc}")
        return step, None
    assert sol is not None
    step.method, step.unknowns, step.nullity = sol.method, sol.unknowns, sol.nullity
    step.pattern = "given" if truth is not None else "estimated"
    step.nullity_given_pattern = sol.nullity
    step.fwd_rows = sol.fwd_rows
    step.residual_grad, step.residual_fwd = sol.residual_grad, sol.residual_fwd
    step.sigma_min_rel = sol.sigma_min_rel
    step.solve_gain = None if not sol.sigma_min_rel else 1.0 / sol.sigma_min_rel
    step.link_gain = 1.0  # the forward rows read x' itself, scaled by |x'|
    step.carried_in = 0 if unknown is None else int(unknown.shape[1])
    step.notes.extend(sol.notes)
    if truth is not None:
        step.rel_error = _rel(sol.u, truth)
        if est is not None:
            e = _rel(est.u, truth)
            state = "settled" if est.settled else "did not settle"
            step.notes.append(
                f"with the activation patterns estimated from the gradient alone ({est.passes} fixed-point pass(es) "
                f"from u = 1, {state}) the segment input comes back to relative error {e:.1e}"
            )
            warnings.append(
                f"{'layer' if one_layer else 'joint segment'} {seg.name} solved at the true input's activation patterns (the audit's 'given pattern' "
                f"assumption); estimated from the gradient alone they give relative error {e:.1e} there"
            )
        else:
            step.notes.append("the pattern estimate was not attempted: the segment's system is too large for repeated solves")
    step.seconds = time.perf_counter() - t0
    if one_layer:
        step.method = step.method.replace("over the segment input", f"over the layer input, read through {_names(link_steps_of(ctx, seg))}")
    return step, _State(seg.name, sol.u, sol.k_of(seg.name), sol.null_basis, sol.g)


def link_steps_of(ctx: _Context, seg: Segment) -> list[str]:
    """The ops a one-layer segment reads its output through (all of its nodes after the layer)."""
    return [ctx.lg.node(n).info.name for n in seg.nodes[1:]]


def _names(ops_: list[str]) -> str:
    return ", ".join(dict.fromkeys(ops_))


def _solve_linearised(ctx, node, link, spec, xs, dw, x_top, g_top, z_hat, S, gradient_rows="use"):
    """Linearise the link at z_hat, then solve the layer below for its input."""
    vals, derivs = link.forward(z_hat)
    e = link.pull(derivs, x_top - vals[-1], "inv")
    z_t = z_hat + e.reshape(z_hat.shape)
    mask = link.known_mask(derivs)
    if mask is None:
        mask = torch.ones(z_hat.shape, dtype=torch.bool)
    ki = link.pull(derivs, g_top, "vjp").reshape(z_hat.shape)
    T = a_rows = None
    if S is not None and S.shape[1] > 0:
        Sd = S.T.reshape((S.shape[1],) + tuple(x_top.shape))
        T, a_rows = link.pull_directions(derivs, Sd, x_top - vals[-1])
    sol = solve_layer(spec, xs, ki, dw, z_t, mask, T, a_rows=a_rows, gradient_rows=gradient_rows, cache=ctx.cache)
    return sol, ki, mask.reshape(-1)


def _run(ctx, start: _State, projected: bool, truth) -> _Descent:
    gen = _descend(ctx, start, projected, truth)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ----------------------------------------------------------------------------- public entry point
def _head(ctx: _Context, head: str, label) -> HeadResult:
    spec = ctx.specs[head]
    dw, db = ctx.grads[head]
    xs, zs = ctx.x_shape(head), ctx.out_shape(head)
    if spec.ndim != 0 or math.prod(xs) != spec.n_in:
        raise AttackUnsupported(f"unsupported head {head}: the closed-form heads need a Linear layer on one sample")
    try:
        if ctx.loss == "logistic":
            if spec.out_channels != 1:
                raise AuditError(f"logistic loss needs one output, the head {head} has {spec.out_channels}")
            return logistic_head(spec.weight, dw, db, xs, zs, label)
        if spec.out_channels < 2:
            raise AuditError(f"cross-entropy needs at least two outputs, the head {head} has {spec.out_channels}")
        if db is not None:
            return ce_bias_head(dw, db, xs, zs, label)
        return ce_nobias_head(spec.weight, dw, xs, zs, label)
    except ValueError as exc:
        raise AuditError(f"head {head}: {exc}") from exc


def _gradient_residual(ctx: _Context, x: torch.Tensor, label) -> float:
    """|g(x, label) - g| / |g| over the weighted layers' parameters: the attacker's own check.

    A label the head could not recover (None) is tried over every value (+-1, or each class) and
    the best residual is returned: the attacker would do the same."""
    if label is None:
        with torch.no_grad():
            n_out = int(ctx.gm(x.to(torch.float64)).reshape(-1).numel())
        labels = (-1.0, 1.0) if ctx.loss == "logistic" else range(min(n_out, 1000))
        return min(_gradient_residual(ctx, x, lab) for lab in labels)
    params = dict(ctx.gm.named_parameters())
    names = [n for pair in ctx.params.values() for n in pair if n is not None]
    ps = [params[n] for n in names]
    with torch.enable_grad():
        out = ctx.gm(x.to(torch.float64))
        lab = torch.tensor([label], dtype=torch.float64 if ctx.loss == "logistic" else torch.long)
        gs = torch.autograd.grad(loss_value(ctx.loss, out, lab), ps, allow_unused=True)
    given = ctx.raw_grads
    num = den = 0.0
    for n, g in zip(names, gs):
        g = torch.zeros_like(params[n]) if g is None else g
        num += float((g - given[n]).pow(2).sum())
        den += float(given[n].pow(2).sum())
    return math.sqrt(num / max(den, 1e-300))


def _twin_scale(a: HeadCandidate, b: HeadCandidate) -> float | None:
    """c > 0 with x_b = c x_a and k_b = k_a / c (same label), else None."""
    if a.label != b.label:
        return None
    c = float(b.x.reshape(-1) @ a.x.reshape(-1) / (a.x.reshape(-1) @ a.x.reshape(-1)).clamp_min(1e-300))
    if c <= 0:
        return None
    ok_x = float((b.x - c * a.x).norm()) <= 1e-10 * float(b.x.norm())
    ok_k = float((b.k - a.k / c).norm()) <= 1e-10 * float(b.k.norm())
    return c if ok_x and ok_k else None


def reconstruct(
    model: torch.nn.Module,
    gradients: dict[str, torch.Tensor],
    input_shape: tuple[int, ...],
    loss: str,
    *,
    label: float | None = None,
    true_input: torch.Tensor | None = None,
    variant: str = "auto",
) -> Reconstruction:
    """Recover a client's input from its gradient with closed-form R-GAP (Python API).

    gradients: parameter name (as in model.named_parameters()) -> dL/dparam, summed over the batch (one
    sample). input_shape: one sample's shape. loss: "logistic" or "cross-entropy". label: optional; when
    None it is recovered from the gradient. true_input: optional; only used to report errors.
    variant: "auto" runs plain layer-wise R-GAP and, when some layer is deficient, also the projected
    variant (only the known directions of z feed the forward rows); "plain" runs R-GAP alone.
    Raises AuditError (one line) on bad input: unsupported loss or head, missing, misshapen or non-finite
    gradients, a true input of the wrong shape.
    """
    if loss not in LOSSES:  # before the model is traced
        raise AuditError(f"unsupported loss {loss!r} for reconstruction; supported: {', '.join(LOSSES)}")
    with single_thread():
        inst = bare_instance(model, tuple(input_shape))
        return attack_graph(inst.graph, inst.env, gradients, input_shape, loss, label=label, true_input=true_input, variant=variant)


def attack_graph(
    graph: LayerGraph,
    env: dict[str, Any],
    gradients: dict[str, torch.Tensor],
    input_shape: tuple[int, ...],
    loss: str,
    *,
    label: float | None = None,
    true_input: torch.Tensor | None = None,
    variant: str = "auto",
) -> Reconstruction:
    """reconstruct() on a layer graph already traced (an Instance's, at batch 1) with its run's constants."""
    if variant not in ("auto", "plain"):
        raise AuditError(f"unknown variant {variant!r}: 'auto' or 'plain'")
    t0 = time.perf_counter()
    with single_thread():
        ctx = _Context(graph, env, gradients, input_shape, loss)
        truth = None
        meta = ctx.lg.node(ctx.lg.input_node).fx.meta.get("tensor_meta")
        if getattr(meta, "dtype", torch.float64).is_floating_point is False:
            raise AttackUnsupported(INTEGER_INPUT)
        if true_input is not None:
            tx = torch.as_tensor(true_input).detach().to(torch.float64)
            if tx.numel() != math.prod(ctx.input_shape):
                raise AuditError(f"true input has shape {tuple(tx.shape)}, the model takes {ctx.input_shape}")
            tx = tx.reshape(1, *ctx.input_shape)
            values = record(ctx.lg, tx, None).values
            truth = {n: values[ctx.lg.data_args(n)[0]] for n in ctx.lg.weighted()}
            truth["__input__"] = tx
            ctx.true_values = values
        head, _ = ctx.head_node()
        hres = _head(ctx, head, label)
        attrs = ctx.lg.node(head)
        head_step = LayerStep(head, attrs.module_path, attrs.info.name, hres.method, ctx.specs[head].n_in, nullity=0)
        warnings = list(hres.warnings)

        # scaled twins: in a positively homogeneous network (bias-free, ReLU/LeakyReLU) a candidate
        # (c x, k / c) produces exactly c x below: it is not walked again, and its gradient is identical
        cands = list(hres.candidates)
        twins: list[tuple[int, int, float]] = []  # (twin index, source index, c)
        if ctx.positively_homogeneous_below(head):
            for j in range(len(cands)):
                for i in range(j):
                    if all(t[0] != i for t in twins):
                        c = _twin_scale(cands[i], cands[j])
                        if c is not None:
                            twins.append((j, i, c))
                            break
        twin_of = {j: (i, c) for j, i, c in twins}

        # lockstep over the other candidates: drop those whose layers stop being consistent
        gens = [(i, _descend(ctx, _State(head, c.x, c.k, None), False, truth)) for i, c in enumerate(cands) if i not in twin_of]
        done: dict[int, _Descent] = {}
        pruned = 0
        while gens:
            stepped = []
            for i, g in gens:
                try:
                    s = next(g)
                    stepped.append((i, g, max(s.residual_grad or 0.0, s.residual_fwd or 0.0)))
                except StopIteration as stop:
                    done[i] = stop.value
            if not stepped:
                break
            best = min(r for _, _, r in stepped)
            keep = [(i, g) for i, g, r in stepped if r <= max(PRUNE_FACTOR * best, 1e-8)]
            pruned += len(stepped) - len(keep)
            gens = keep

        scored = []
        for i, dsc in done.items():
            gr = _gradient_residual(ctx, dsc.input, cands[i].label) if dsc.complete and dsc.input is not None else math.inf
            scored.append((gr, i, dsc.input))
        scored.sort(key=lambda t: (t[0], t[1]))  # (gradient residual, candidate, input or None)
        gres, ci, _ = scored[0]
        cand, dsc = cands[ci], done[ci]
        head_step.solve_gain = cand.gain
        label_status = "given" if label is not None else "recovered"
        if cand.label is None:
            label_status = "not recoverable"
        # other readings that reproduce the gradient as well: scaled twins (exactly), or ties
        alt_scales = [c for j, i, c in twins if i == ci]
        alt_notes = [cands[j].note for j, i, c in twins if i == ci]
        alt_inputs = [] if dsc.input is None else [c * dsc.input for c in alt_scales]
        for gr, j, inp in scored[1:]:
            tie = inp is not None and dsc.input is not None and gr <= max(10 * gres, 1e-9) and gres < 1e-6
            if tie and inp is not None and dsc.input is not None and _rel(inp, dsc.input) > 1e-6:
                alt_inputs.append(inp)
                alt_notes.append(cands[j].note)
                if label is None and cands[j].label != cand.label:
                    label_status = "ambiguous"
        if alt_notes:
            warnings.append(
                f"{len(alt_notes) + 1} different inputs reproduce the gradient (chosen: {cand.note}; also: "
                f"{'; '.join(alt_notes)}); the gradient alone cannot decide between them"
                + (
                    ": the network is positively homogeneous, so x and c*x (both margins of the logistic head) give "
                    "identical gradients"
                    if alt_scales
                    else ""
                )
            )
        head_info = dict(hres.info)
        head_info.update(
            {"node": head, "candidates": len(cands), "pruned": pruned, "scaled_twins": len(twins), "chosen": cand.note}
        )
        th = None if truth is None else truth.get(head)
        if th is not None:
            head_step.rel_error = float((cand.x - th).norm() / th.norm().clamp_min(1e-300))
        rec = Reconstruction(
            input=dsc.input,
            label=cand.label,
            label_status=label_status,
            variant="plain",
            layers=[head_step] + dsc.layers,
            warnings=warnings + dsc.warnings,
            seconds=0.0,
            complete=dsc.complete,
            gradient_residual=None if gres == math.inf else gres,
            head=head_info,
            alternatives=alt_inputs,
            input_gain=dsc.input_gain,
        )
        if truth is not None and dsc.input is not None:
            rec.rel_error = _rel(dsc.input, truth["__input__"])
        deficient = [j for j, s in enumerate(dsc.layers) if s.nullity]
        if variant == "auto" and deficient:
            tp = time.perf_counter()
            j0 = deficient[0]
            pd = _run(ctx, dsc.states[j0], True, truth)
            pr = Reconstruction(
                input=pd.input,
                label=cand.label,
                label_status=label_status,
                variant="projected",
                layers=[head_step] + [replace(st) for st in dsc.layers[: j0 + 1]] + pd.layers,
                warnings=pd.warnings,
                seconds=time.perf_counter() - tp,
                complete=pd.complete,
                gradient_residual=_gradient_residual(ctx, pd.input, cand.label) if pd.complete and pd.input is not None else None,
                head=head_info,
                alternatives=[] if pd.input is None else [c * pd.input for c in alt_scales],
                input_gain=pd.input_gain,
            )
            if truth is not None and pd.input is not None:
                pr.rel_error = _rel(pd.input, truth["__input__"])
            rec.projected = pr
            rec.warnings.append(
                f"layer(s) {', '.join(dsc.layers[j].node for j in deficient)} deficient (nullity "
                f"{', '.join(str(dsc.layers[j].nullity) for j in deficient)}): plain R-GAP keeps the minimum-norm "
                "guess there; the projected variant uses only the known directions of z below"
            )
            _count_given_pattern(ctx, pr.layers, dsc.states[: j0 + 1] + pd.states, pd.input)
        _count_given_pattern(ctx, rec.layers, dsc.states, dsc.input)
        rec.seconds = time.perf_counter() - t0
    return rec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
