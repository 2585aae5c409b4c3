"""The ops between two weighted layers: one `Link` representation for the walk and the attack.

A link starts at a weighted layer's output z (or at the model input) and follows the data up to the
input x' of the next weighted layer, or to the model output. Its steps are the ops in between, each
with its role from the op table (`OpInfo.link`) and its own call at the instance (other arguments
held at their instance values, e.g. the other branches of a concatenation). The analysis reads a link
upwards (`above`): what the attacker knows of z through the ops up to x'. The attack reads it
downwards (`below`): how to invert the ops from x' back to z. Both get the same steps, path function,
Jacobian products and known-entry masks from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from rgap_audit import ops
from rgap_audit.layergraph import LayerGraph
from rgap_audit.tolerances import ACTIVE_REL_TOL, SATURATED

ATTACK_ROLES = (ops.PASS, ops.REORDER, ops.INVERT, ops.CLIP)  # the ops the attack inverts in closed form


class _Data:
    """Marks where the path's tensor goes in a call's arguments."""


_DATA = _Data()


def _put(a: Any, t: torch.Tensor) -> Any:
    if a is _DATA:
        return t
    if isinstance(a, (list, tuple)):
        return type(a)(_put(v, t) for v in a)
    if isinstance(a, dict):
        return {k: _put(v, t) for k, v in a.items()}
    return a


def node_call(lg: LayerGraph, name: str, source: str, env: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The node's own computation as a function of the value of `source` (one of its inputs); every
    other argument is held at its instance value from `env`."""
    gn = lg.node(name)
    fxn: fx.Node = gn.fx

    def sub(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: _DATA if n.name == source else env[n.name])  # type: ignore[arg-type, return-value]

    args, kwargs = sub(fxn.args), sub(dict(fxn.kwargs))
    if fxn.op == "call_module":
        mod = gn.module
        assert mod is not None
        evaluate = gn.info.evaluate
        return lambda t: _call_module(mod, evaluate, _put(args, t), _put(kwargs, t))
    if fxn.op == "call_method":
        method = str(fxn.target)
        return lambda t: getattr(_put(args[0], t), method)(*_put(args[1:], t), **_put(kwargs, t))
    target = fxn.target
    assert callable(target)
    return lambda t: target(*_put(args, t), **_put(kwargs, t))


def _call_module(mod: torch.nn.Module, evaluate: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None, args: Any, kwargs: dict) -> Any:
    """A module's call, through its op entry's explicit expression (OpInfo.evaluate) when it has one and the
    call passes the data argument alone."""
    if evaluate is not None and len(args) == 1 and not kwargs:
        return evaluate(mod, args[0])
    return mod(*args, **kwargs)


def _call_kwargs(fxn: fx.Node) -> dict:
    """A call's keyword arguments, positional ones named when torch knows the signature (inverses read them)."""
    if fxn.op != "call_function":
        return dict(fxn.kwargs)
    from torch.fx.operator_schemas import normalize_function

    target = fxn.target
    if not callable(target):
        return dict(fxn.kwargs)
    try:
        pair = normalize_function(target, tuple(fxn.args), dict(fxn.kwargs), normalize_to_only_use_kwargs=True)
    except Exception:
        pair = None
    return dict(pair.kwargs) if pair is not None else dict(fxn.kwargs)


@dataclass
class Step:
    """One op of a link, read from the op table at its call site."""

    node: str
    info: ops.OpInfo
    source: str  # the node this step reads along the link
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    apply: Callable[[torch.Tensor], torch.Tensor]
    role: str  # info.link, or LOSSY where the call site's shapes do not fit that role
    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None  # INVERT: z = inverse(y)
    perm: torch.Tensor | None = None  # REORDER: out.flatten()[j] = in.flatten()[perm[j]]

    @property
    def name(self) -> str:
        return self.info.name

    def deriv(self, z: torch.Tensor) -> torch.Tensor | None:
        """Elementwise derivative at z (None for a reshape or permutation)."""
        if self.role in (ops.PASS, ops.REORDER):
            return None
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.apply(zz).sum(), zz)
        return g


def _affine_inverse(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x + c, c * x (c constant): y = a x + b elementwise, so x = (y - b) / a."""
    z = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    y0 = fn(z)
    (a,) = torch.autograd.grad(y0.sum(), z)
    b = y0.detach()
    return lambda y: (y - b) / a


def make_step(lg: LayerGraph, name: str, source: str, env: dict[str, Any]) -> Step:
    """The step of node `name` reading `source`, with its role checked against its shapes."""
    gn = lg.node(name)
    info = gn.info
    shp_in = tuple(lg.node(source).out_shape or ())
    shp_out = tuple(gn.out_shape or ())
    apply = node_call(lg, name, source, env)
    role = info.link
    same_numel = math.prod(shp_in) == math.prod(shp_out)
    if role in (ops.PASS, ops.REORDER) and not same_numel:
        role = ops.LOSSY
    if role in (ops.INVERT, ops.CLIP) and shp_in != shp_out:
        role = ops.LOSSY
    step = Step(name, info, source, shp_in, shp_out, apply, role)
    if role == ops.REORDER:
        with torch.no_grad():
            idx = torch.arange(math.prod(shp_in), dtype=torch.float64).reshape(shp_in)
            step.perm = apply(idx).reshape(-1).round().long()
    elif role == ops.INVERT:
        if info.inverse is not None:
            mod, kw, inv = gn.module, _call_kwargs(gn.fx), info.inverse
            step.inverse = lambda y, m=mod, k=kw, f=inv: f(m, k, y)
        else:  # an affine map (x + c, c * x): inverted from its own map
            step.inverse = _affine_inverse(apply, shp_in)
    return step


@dataclass
class Link:
    """The ops from `lower`'s output up to `upper`'s input (data-flow order).

    lower: a weighted layer or the input placeholder (None where the walk down found none); upper: the
    weighted layer above, the output node, or None when the path is cut (`cut` says why).
    """

    lower: str | None
    upper: str | None
    steps: list[Step] = field(default_factory=list)
    cut: str | None = None

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.steps]

    @property
    def joins(self) -> bool:
        """Some step is a join whose other inputs are held fixed (a slice of a concatenation)."""
        return any(s.role == ops.SLICE for s in self.steps)

    def attack_cut(self) -> Step | None:
        """The first step the closed-form attack cannot invert, if any."""
        return next((s for s in self.steps if s.role not in ATTACK_ROLES), None)

    # ------------------------------------------------------------------ the path as a function
    def fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """z -> the value at the end of the link (every other argument at its instance value)."""
        applies = [s.apply for s in self.steps]

        def run(t: torch.Tensor) -> torch.Tensor:
            for a in applies:
                t = a(t)
            return t

        return run

    def _entrywise(self) -> bool:
        """Every step moves each entry alone: elementwise ops of unchanged shape, reshapes, permutations."""
        return all(
            s.role in (ops.PASS, ops.REORDER) or (s.info.elementwise and s.role != ops.SLICE and s.in_shape == s.out_shape)
            for s in self.steps
        )

    def _push(self, z0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """J t for an entrywise link: each elementwise step scales by its derivative at the instance
        (Step.deriv, the diagonal of its Jacobian), reshapes and permutations move the entries. The same
        products forward-mode AD computes, without torch's forward-AD machinery, whose first use in a
        process loads and compiles TorchScript decompositions (about half a second)."""
        with torch.enable_grad():
            _vals, derivs = self.forward(z0)

        def push(ts: torch.Tensor) -> torch.Tensor:
            d = ts.shape[0]
            for s, dv in zip(self.steps, derivs):
                if s.role == ops.REORDER:
                    assert s.perm is not None
                    ts = ts.reshape(d, -1)[:, s.perm]
                elif dv is not None:
                    ts = ts.reshape(d, *dv.shape) * dv
                ts = ts.reshape(d, *s.out_shape)
            return ts

        return push

    def jvp_batch(self, z0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Batched Jacobian-vector products at z0: tangents (d, *z0.shape) -> (d, *fn(z0).shape)."""
        if self._entrywise():
            push = self._push(z0)
            return lambda ts: push(ts.reshape(ts.shape[0], *z0.shape))
        fn = self.fn()

        def one(t: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(fn, (z0,), (t,))[1]

        def apply(ts: torch.Tensor) -> torch.Tensor:
            ts = ts.reshape(ts.shape[0], *z0.shape)  # the rank code's (d, N, *out) may split the batch differently
            out = [torch.func.vmap(one)(chunk) for chunk in torch.split(ts, 256)]
            return torch.cat(out) if out else ts.new_zeros((0, *fn(z0).shape))

        return apply

    def vjp(self, z0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """v^T J at z0: a row on the end of the link pulled back to z."""
        return self.vjp_batch(z0, v.unsqueeze(0))[0]

    def vjp_batch(self, z0: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        """Rows vs (d, *end shape) pulled back to z: (d, *z0.shape), by one reverse pass.

        Plain torch.autograd of the scalar <v, end> rather than torch.func.vjp, which imports
        torch._dynamo on its first call, or autograd.grad with grad_outputs, which imports sympy (each
        about a second, more than the whole audit of a small model). The numbers are the same: the
        backward of the sum and the product hands v itself to the link's backward.
        """
        z = z0.detach().requires_grad_(True)
        with torch.enable_grad():
            end = self.fn()(z)
        out = torch.zeros((vs.shape[0], *z0.shape), dtype=z0.dtype)
        if not end.requires_grad or vs.shape[0] == 0:
            return out  # the end does not depend on z
        for i in range(vs.shape[0]):  # one backward per row, the graph kept between them
            with torch.enable_grad():
                inner = (end * vs[i].reshape(end.shape).to(end.dtype)).sum()
            (back,) = torch.autograd.grad(inner, z, retain_graph=i + 1 < vs.shape[0], allow_unused=True)
            if back is not None:
                out[i] = back
        return out

    def reach(self, z0: torch.Tensor, gen: torch.Generator) -> int:
        """Entries of z that reach the end of the link with a non-zero derivative (a random row pulled back)."""
        fn = self.fn()
        r = torch.randn(fn(z0).shape, generator=gen, dtype=z0.dtype)
        return int((self.vjp(z0, r) != 0).sum())

    def constant_entries(self, z0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Entries of the link's end that do not move with z (a ReLU's zeros): True where constant."""
        t = torch.randn(z0.shape, generator=gen, dtype=z0.dtype)
        if self._entrywise():
            moved = self._push(z0)(t.unsqueeze(0))[0]
        else:
            moved = torch.func.jvp(self.fn(), (z0,), (t,))[1]
        return moved == 0

    # ------------------------------------------------------------------ the attack's view (closed-form inverse)
    def forward(self, z: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Values at every step from z, and each step's elementwise derivative at its input."""
        vals: list[torch.Tensor] = [z]
        derivs: list[torch.Tensor | None] = []
        for s in self.steps:
            derivs.append(s.deriv(vals[-1]))
            if s.role == ops.PASS:
                vals.append(vals[-1].reshape(s.out_shape))
            elif s.role == ops.REORDER:
                assert s.perm is not None
                vals.append(vals[-1].reshape(-1)[s.perm].reshape(s.out_shape))
            else:
                vals.append(s.apply(vals[-1]).detach())
        return vals, derivs

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """A first estimate of z from the end of the link: op-table inverses, clipped units at their bound."""
        v = x
        for s in reversed(self.steps):
            if s.role == ops.PASS:
                v = v.reshape(s.in_shape)
            elif s.role == ops.REORDER:
                v = unpermute(s, v, 0)
            elif s.role == ops.INVERT:
                assert s.inverse is not None
                v = s.inverse(v)
            else:
                assert s.info.clip is not None
                lo, hi = s.info.clip
                tol = ACTIVE_REL_TOL * float(v.abs().max().clamp_min(1e-300))
                active = (v > lo + tol) & (v < hi - tol)
                v = torch.where(active, v, torch.where(v >= hi - tol, torch.full_like(v, hi), torch.full_like(v, lo)))
        return v

    def pull(self, derivs: list[torch.Tensor | None], v: torch.Tensor, mode: str, lead: int = 0) -> torch.Tensor:
        """Carry a tensor from the end of the link to z: 'vjp' multiplies by sigma', 'inv' divides (0 where unknown)."""
        for s, d in zip(reversed(self.steps), reversed(derivs)):
            if s.role == ops.REORDER:
                v = unpermute(s, v, lead)
            else:
                v = v.reshape(v.shape[:lead] + tuple(s.in_shape))
            if d is not None:
                if mode == "vjp":
                    v = v * d
                else:
                    ok = d.abs() > SATURATED
                    v = torch.where(ok, v / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(v))
        return v

    def pull_directions(
        self, derivs: list[torch.Tensor | None], Sd: torch.Tensor, e: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Carry undetermined directions S (d, *end) down to z: T = J^-1 S on the units J keeps.

        Where a unit is off (sigma' = 0, ReLU) the linearised constraint sigma(z) = x' + S a has no z in it:
        it becomes a row on the carried coordinates alone, S_i a = -e_i (e = x' - sigma(z_hat) carried down).
        Returns (T (d, n_z), (E, f) or None).
        """
        d = Sd.shape[0]
        E_rows, f_rows = [], []
        for s, dv in zip(reversed(self.steps), reversed(derivs)):
            if s.role == ops.REORDER:
                Sd, e = unpermute(s, Sd, 1), unpermute(s, e, 0)
            Sd = Sd.reshape((d,) + tuple(s.in_shape))
            e = e.reshape(s.in_shape)
            if dv is None:
                continue
            off = dv.abs() <= SATURATED
            if bool(off.any()):
                E_rows.append(Sd[:, off].T)
                f_rows.append(-e[off])
            safe = torch.where(off, torch.ones_like(dv), dv)
            Sd = torch.where(off, torch.zeros_like(Sd), Sd / safe)
            e = torch.where(off, torch.zeros_like(e), e / safe)
        rows = (torch.cat(E_rows), torch.cat(f_rows)) if E_rows else None
        return Sd.reshape(d, -1), rows

    def known_mask(self, derivs: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Entries of z that the end of the link determines (a unit off or saturated is not), None without steps."""
        if not self.steps:
            return None
        m = torch.ones(self.steps[-1].out_shape, dtype=torch.bool)
        for s, d in zip(reversed(self.steps), reversed(derivs)):
            m = unpermute(s, m, 0) if s.role == ops.REORDER else m.reshape(s.in_shape)
            if d is not None:
                m = m & (d.abs() > SATURATED)
        return m

    def clipped_entries(self, x: torch.Tensor) -> torch.Tensor | None:
        """Entries of the link's end at a bound of its last clip (a ReLU's zeros), read off the value x
        itself; only when nothing but reshapes and permutations follows the clip. None otherwise."""
        steps = list(self.steps)
        while steps and steps[-1].role in (ops.PASS, ops.REORDER):
            steps.pop()
        if not steps or steps[-1].role != ops.CLIP or steps[-1].info.clip is None:
            return None
        lo, hi = steps[-1].info.clip
        tol = ACTIVE_REL_TOL * float(x.abs().max().clamp_min(1e-300))
        return (x - lo).abs().le(tol) | (x - hi).abs().le(tol)

    def pattern(self, z: torch.Tensor) -> bytes:
        """The activation pattern of the link at z (which piece of each piecewise-linear unit is active)."""
        _, derivs = self.forward(z)
        return b"".join(d.contiguous().numpy().tobytes() for d in derivs if d is not None)

    @property
    def clips(self) -> bool:
        return any(s.role == ops.CLIP for s in self.steps)

    @property
    def only_reshapes(self) -> bool:
        return all(s.role == ops.PASS for s in self.steps)


def unpermute(s: Step, v: torch.Tensor, lead: int) -> torch.Tensor:
    """From a permutation's output back to its input (also for a leading batch of directions)."""
    assert s.perm is not None
    flat = v.reshape(v.shape[:lead] + (-1,))
    out = torch.empty_like(flat)
    out[..., s.perm] = flat
    return out.reshape(v.shape[:lead] + tuple(s.in_shape))


# ----------------------------------------------------------------------------- the two walks
def above(lg: LayerGraph, lower: str, env: dict[str, Any], stops: dict[str, str] | None = None) -> Link:
    """From `lower`'s output up to the next weighted layer or the output (the analysis' direction).

    Passes every op with one data input, and joins whose output holds this input as a slice (cat,
    stack; the other branches held at their instance values); stops where the output feeds several
    consumers or joins other branches in a sum or product. `stops` maps the input cut of each joint
    segment (rgap_audit.segments) to the segment's name: a link that reaches such a node ends there,
    with the segment as its upper end.
    """
    link = Link(lower, None)
    cur = lower
    while True:
        if stops is not None and cur in stops:
            link.upper = stops[cur]
            return link
        succ = lg.consumers(cur)
        if len(succ) != 1:
            link.cut = "its output feeds several consumers" if succ else "its output is not used"
            return link
        nxt = succ[0]
        gn = lg.node(nxt)
        if nxt == lg.output_node:
            link.upper = nxt
            return link
        if gn.info.kind == ops.LAYER:
            link.upper = nxt
            return link
        step = make_step(lg, nxt, cur, env)
        if gn.info.link == ops.SLICE:  # cat / stack: this branch is a slice of the output
            link.steps.append(step)
            cur = nxt
            continue
        if gn.info.link == ops.CUT or lg.graph.in_degree(nxt) > 1:
            link.steps.append(step)
            link.cut = f"its output joins other branches at {nxt} ({gn.info.name})"
            return link
        link.steps.append(step)
        cur = nxt


def below(lg: LayerGraph, upper: str, env: dict[str, Any], ends: dict[str, str] | None = None, start: str | None = None) -> Link:
    """From `upper`'s input down to the weighted layer (or model input) below (the attack's direction).

    Follows single-input, single-consumer ops only; stops with the reason at a join, a branch or a
    weighted layer whose output also feeds other ops. `ends` maps the output cut of each joint segment
    (rgap_audit.segments) to the segment's name: a link that reaches such a node ends there, with the
    segment as its lower end. `start`: the node whose value is the link's end when `upper` is a joint
    segment (its input cut, which feeds several of the segment's ops).
    """
    if start is None:
        ins = lg.data_args(upper)
        if len(ins) != 1:
            return Link(None, upper, cut=f"{upper} has {len(ins)} data inputs")
        node = ins[0]
    else:
        node = start
    steps: list[Step] = []
    while True:
        gn = lg.node(node)
        if ends is not None and node in ends:
            return Link(ends[node], upper, steps[::-1])
        branching = lg.graph.out_degree(node) > 1 and not (node == start and not steps)
        if node == lg.input_node or gn.info.kind == ops.LAYER:
            if branching:
                return Link(node, upper, steps[::-1], f"{node} feeds {lg.graph.out_degree(node)} consumers (not a chain)")
            return Link(node, upper, steps[::-1])
        if lg.graph.in_degree(node) != 1 or branching:
            return Link(None, upper, steps[::-1], f"{node} ({gn.info.name}) joins or splits branches: not a chain")
        source = lg.data_args(node)[0]
        steps.append(make_step(lg, node, source, env))
        node = source


def input_chain(lg: LayerGraph, env: dict[str, Any], stops: dict[str, str] | None = None) -> tuple[str | None, list[Step], str]:
    """From the model input down the data flow to the first weighted layer or joint segment (`stops`,
    as for `above`): (its name, steps, why not).

    The name is None when the input feeds several branches, joins another branch, or reaches the
    output without a weighted layer.
    """
    cur = lg.input_node
    steps: list[Step] = []
    while True:
        if stops is not None and cur in stops:
            return stops[cur], steps, ""
        info = lg.node(cur).info
        if info.kind == ops.UNKNOWN:  # an RNN, an attention block: whatever follows, the chain stops being understood here
            return None, steps, f"the input reaches {cur} ({info.name}), which the analysis does not understand: {info.why}"
        succ = lg.consumers(cur)
        if len(succ) != 1:
            return None, steps, "the input feeds several branches"
        nxt = succ[0]
        gn = lg.node(nxt)
        if gn.info.kind == ops.LAYER:
            return nxt, steps, ""
        if nxt == lg.output_node:
            return None, steps, "no weighted layer reads the input"
        if gn.info.kind == ops.MERGE:
            return None, steps, f"the input joins another branch at {nxt}"
        steps.append(make_step(lg, nxt, cur, env))
        cur = nxt


def region_function(lg: LayerGraph, start: str, nodes: tuple[str, ...], env: dict[str, Any]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The value of `start` -> the values of `nodes` (data-flow order), every other argument at its
    instance value: a joint segment's own computation, weighted layers included (their weights fixed)."""
    calls = []
    for name in nodes:
        gn = lg.node(name)
        calls.append((name, gn.fx, gn.module, gn.info.evaluate))

    def run(u: torch.Tensor) -> dict[str, torch.Tensor]:
        local: dict[str, Any] = {start: u}

        def sub(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: local[n.name] if n.name in local else env[n.name])

        for name, fxn, mod, evaluate in calls:
            args, kwargs = sub(fxn.args), sub(dict(fxn.kwargs))
            if fxn.op == "call_module":
                assert mod is not None
                local[name] = _call_module(mod, evaluate, args, kwargs)
            elif fxn.op == "call_method":
                local[name] = getattr(args[0], str(fxn.target))(*args[1:], **kwargs)
            else:
                target = fxn.target
                assert callable(target)
                local[name] = target(*args, **kwargs)
        return {n: local[n] for n in nodes}

    return run
