"""The R-GAP walk: from the output down to the input, one LayerRecord per operation.

For every weighted layer the walk measures, on one seeded random instance (float64, the model's
weights as constructed, a random input, the real dL/dz from autograd and the real activation
pattern), the rank of the layer's linear system [K; F] (rgap_audit.rank), where F holds only the
forward constraints the attacker really has: those that survive the ops between this layer and the
layer above (a ReLU keeps active units only) and the directions the layer above left undetermined.
The undetermined directions of each layer are handed down to the next one, so the deficit reported
at the lowest layer is the number of input directions that no closed-form solve can pin down.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.fx as fx

from rgap_audit.errors import AuditError
from rgap_audit.layergraph import LayerGraph, build_layer_graph, record_instance
from rgap_audit.losses import choose_loss, loss_value, make_labels
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.rank import ForwardInfo, LayerRank, layer_rank
from rgap_audit.records import (
    Basis,
    Chain,
    LayerRecord,
    Location,
    ModelReport,
    ModelVerdict,
    Verdict,
)
from rgap_audit.ops import (
    ACTIVATION,
    CONSTANT,
    EMBEDDING,
    FROM_OUTPUT,
    IDENTITY,
    LAYER,
    MERGE,
    NORM,
    UNKNOWN,
    LeakContext,
    lookup,
    numel,
)
from rgap_audit.span import IN_TOL as SPAN_IN_TOL
from rgap_audit.span import row_space
from rgap_audit.threads import single_thread
from rgap_audit.tracing import trace

CAVEAT_DEFICIT = (
    "A layer-wise deficit makes the closed-form recursion fail and the recovery worse conditioned, "
    "but it is not proof of safety: attacks that use all layers jointly (gradient matching, or the "
    "Jacobian of the whole gradient map) may still recover the input."
)
CAVEAT_PATTERN = "Activation patterns (which units are active, signs) are taken as known to the attacker, as in R-GAP."
CAVEAT_BATCH = (
    "With {b} samples sharing one gradient, the per-sample dL/dz is taken from the instance: "
    "an upper bound on what an attacker knows."
)


@dataclass
class _Above:
    """How a weighted layer's output reaches what the attacker knows: ops in between and the end."""

    ops: list[str]  # op nodes from this layer's output upwards (exclusive), in data-flow order
    end: str | None  # the weighted layer above, "output", or None when the path branches or merges
    why_cut: str | None = None  # why the path could not be followed


def _path_above(lg: LayerGraph, name: str) -> _Above:
    ops: list[str] = []
    cur = name
    while True:
        succ = list(lg.graph.successors(cur))
        if len(succ) != 1:
            why = "its output feeds several consumers" if succ else "its output is not used"
            return _Above(ops, None, why)
        nxt = succ[0]
        attrs = lg.node(nxt)
        kind = attrs["info"].kind
        if nxt == lg.output_node:
            return _Above(ops, "output")
        if kind == LAYER:
            return _Above(ops, nxt)
        if kind == MERGE and attrs["info"].invertible:  # cat / stack: this branch is a slice of the output
            ops.append(nxt)
            cur = nxt
            continue
        if kind == MERGE or lg.graph.in_degree(nxt) > 1:
            return _Above(ops + [nxt], None, f"its output joins other branches at {nxt} ({attrs['info'].name})")
        ops.append(nxt)
        cur = nxt


def _make_path_fn(lg: LayerGraph, start: str, ops: list[str], env: dict[str, object]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function z -> (value after `ops`), z the output of `start` and each op fed by the one before
    it; every other argument (other branches of a cat, constants) fixed to its instance value."""
    modules = dict(lg.gm.named_modules())
    steps = []
    prev = lg.node(start)["fx"]
    for n in ops:
        node = lg.node(n)["fx"]
        steps.append((node, prev))
        prev = node

    def fn(t: torch.Tensor) -> torch.Tensor:
        cur = t
        for node, src in steps:
            args = fx.node.map_arg(node.args, lambda a: cur if a is src else env[a.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: cur if a is src else env[a.name])
            if node.op == "call_module":
                cur = modules[str(node.target)](*args, **kwargs)
            elif node.op == "call_function":
                cur = node.target(*args, **kwargs)
            else:  # call_method
                self_, *rest = args
                cur = getattr(self_, node.target)(*rest, **kwargs)
        return cur

    return fn


def _jvp_batch(fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Batched Jacobian-vector products of fn at z0: tangents (d, *z0.shape) -> (d, *fn(z0).shape)."""

    def one(t: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(fn, (z0,), (t,))[1]

    def apply(ts: torch.Tensor) -> torch.Tensor:
        ts = ts.reshape(ts.shape[0], *z0.shape)  # the rank code's (d, N, *out) may split the batch differently
        out = []
        for chunk in torch.split(ts, 256):
            out.append(torch.func.vmap(one)(chunk))
        return torch.cat(out) if out else ts.new_zeros((0, *fn(z0).shape))

    return apply


def _known_rows(fn: Callable, z0: torch.Tensor, n_out_above: int, unknown_dims: int, gen: torch.Generator) -> int:
    """Count the directions of z the attacker knows: entries that reach the next tensor, capped by its size."""
    r = torch.randn(fn(z0).shape, generator=gen, dtype=z0.dtype)
    _, vjp = torch.func.vjp(fn, z0)
    (back,) = vjp(r)
    reach = int((back != 0).sum())
    return max(0, min(reach, n_out_above) - unknown_dims)


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}..{hi}"


def _rank_given_uncertain_above(res: LayerRank, uncertain: tuple[int, int], rows_hi: int) -> LayerRank:
    """Bounds on a layer's rank when the layer above left between d_lo and d_hi directions of z's
    image undetermined but no basis of them is known. res was computed as if all of z were known,
    so it bounds the true rank from above; dropping d_hi rows lowers a rank by at most d_hi, and the
    forward block has at most rows_hi rows (the caller capped them by end_dims - d_lo):
        max(rank K, rank_full_lower - d_hi) <= rank <= min(rank_full_upper, rank K + rows_hi)."""
    _d_lo, d_hi = uncertain
    full_lo = res.rank if res.rank is not None else res.rank_lower
    full_hi = res.rank if res.rank is not None else res.rank_upper
    base = res.rank_grad if res.rank_grad is not None else res.rank_lower
    lo = max(base, full_lo - d_hi)
    hi = min(full_hi, base + rows_hi) if res.rank_grad is not None else full_hi
    exact = lo == hi
    return replace(
        res,
        rank=lo if exact else None,
        rank_lower=lo,
        rank_upper=hi,
        deficit=res.unknowns - lo if exact else None,
        method=res.method if exact else "bounds",
        null_basis=torch.zeros(res.null_basis.shape[0], 0, dtype=torch.float64) if exact and lo == res.unknowns and res.null_basis is not None else None,
    )


def _location(loaded: LoadedModel | None, module_path: str | None) -> Location | None:
    if loaded is None:
        return None
    if module_path is not None:
        # a module reused at several places, or a child of a located container
        path = module_path
        while path:
            if path in loaded.layer_locations:
                return loaded.layer_locations[path]
            path = path.rpartition(".")[0]
    return loaded.location


class Walker:
    """One audit of one model: trace, instance, and the walk from the output down."""

    def __init__(self, loaded: LoadedModel, options: AuditOptions):
        self.loaded = loaded
        self.options = options

    def run(self) -> ModelReport:
        t_start = time.perf_counter()
        loaded, opts = self.loaded, self.options
        shape = opts.input_shape or loaded.input_shape
        if shape is None:
            raise AuditError("input shape unknown: declare it in RGAP_MODELS or pass --input-shape", loaded.file, loaded.name)
        shape = tuple(int(s) for s in shape)
        batch = int(opts.batch_size or loaded.batch_size or 1)
        if batch < 1:
            raise AuditError(f"batch size must be >= 1, got {batch}", loaded.file, loaded.name)
        gen = torch.Generator().manual_seed(opts.seed)
        vocabularies = [info.tokens(m) for m in loaded.module.modules() if (info := lookup(None, m)).tokens is not None]
        if vocabularies:  # token ids into an Embedding: integer inputs below every table's size
            vocab = min(vocabularies)
            x = torch.randint(0, vocab, (batch, *shape), generator=gen)
        else:
            x = torch.rand((batch, *shape), generator=gen, dtype=torch.float64)

        gm = trace(loaded.module, x, file=loaded.file, name=loaded.name)
        t_trace = time.perf_counter()
        lg = build_layer_graph(gm)
        out_shape = lg.node(lg.output_node)["out_shape"]
        if out_shape is None:
            raise AuditError("forward must return one tensor (got a tuple or a non-tensor)", loaded.file, loaded.name)
        out_features = numel(out_shape[1:])
        try:
            loss = choose_loss(opts.loss or loaded.loss, out_features)
        except ValueError as exc:
            raise AuditError(str(exc), loaded.file, loaded.name) from exc
        labels = make_labels(loss, batch, out_features, gen)
        env: dict[str, object] = {}
        values, grads = record_instance(lg, x, lambda out: loss_value(loss, out, labels), env=env)
        t_instance = time.perf_counter()

        self.lg, self.values, self.grads, self.env, self.gen = lg, values, grads, env, gen
        self.trace_notes = list(gm.meta.get("rgap_warnings", []))
        method = gm.meta.get("rgap_trace", {}).get("method")
        if method and method != "torch.fx":
            self.trace_notes.append(f"traced with the fallback '{method}' (plain torch.fx failed)")
        self.loss, self.batch = loss, batch
        records = self._walk()
        t_walk = time.perf_counter()

        verdict = self._verdict(records)
        return ModelReport(
            file=loaded.file,
            model=loaded.name,
            input_shape=list(shape),
            batch_size=batch,
            loss=loss,
            seed=opts.seed,
            dtype="float64",
            layers=records,
            verdict=verdict,
            location=loaded.location,
            warnings=self.warnings,
            timings={
                "trace_s": t_trace - t_start,
                "instance_s": t_instance - t_trace,
                "walk_s": t_walk - t_instance,
                "total_s": time.perf_counter() - t_start,
            },
        )

    # ------------------------------------------------------------------ the walk
    def _walk(self) -> list[LayerRecord]:
        lg = self.lg
        self.warnings: list[str] = list(self.trace_notes)
        self.nulls: dict[str, torch.Tensor | None] = {}  # weighted layer -> undetermined directions of its input
        # weighted layer -> (lower, upper) bound on the number of undetermined directions of its input,
        # for layers whose undetermined directions are not available as a basis (rank only bounded,
        # or the basis too large): the layer below then gets an upper bound on its forward rows
        self.carried: dict[str, tuple[int, int]] = {}
        self.failed: set[str] = set()  # weighted layers that could not be normalised: nothing known of their input
        self.below: dict[str, tuple[str, list[str]]] = {}  # weighted layer -> (layer below, ops between)
        # what the attacker can derive, node by node: dL/d(output) (needs every activation pattern above)
        # and the output value itself (set by the layers above as they are recovered)
        self.k_known: dict[str, bool] = {lg.output_node: self.batch == 1}
        self.val_known: dict[str, bool] = {}
        for lower in lg.weighted():
            path = _path_above(lg, lower)
            if path.end is not None and path.end != "output":
                self.below[path.end] = (lower, path.ops)
        records = []
        for index, name in enumerate(lg.ops()):
            attrs = lg.node(name)
            info = attrs["info"]
            rec = LayerRecord(
                index=index,
                node=name,
                op=info.name,
                kind=info.kind,
                module_path=attrs["module_path"],
                input_shape=list(attrs["in_shape"]),
                output_shape=list(attrs["out_shape"]),
                location=_location(self.loaded, attrs["module_path"]),
            )
            t0 = time.perf_counter()
            self.k_known[name] = self._k_derivable(name)
            if info.kind == LAYER:
                self._weighted(name, rec)
            elif info.kind == EMBEDDING:
                self._embedding(name, rec)
            elif info.kind == UNKNOWN:
                rec.verdict, rec.basis = Verdict.NOT_UNDERSTOOD, Basis.STRUCTURE
                rec.reason = f"{info.name}: {info.why}; never counted as safe"
                self.warnings.append(f"{name} ({info.name}) is not understood by rgap-audit and was not analysed")
            else:
                rec.verdict = Verdict.PASSES if info.invertible else Verdict.CHAIN_BROKEN
                rec.basis = Basis.STRUCTURE
                rec.reason = info.why
                if info.param_rows is not None:
                    self._param_rows(name, rec)
                if info.invertible and self.val_known.get(name):
                    for a in lg.data_args(name):
                        self.val_known[a] = True
            rec.seconds = time.perf_counter() - t0
            records.append(rec)
        return records

    def _embedding(self, name: str, rec: LayerRecord) -> None:
        """Token ids -> rows of the table. Its weight gradient is dL/dW[t] = sum of k over the positions
        holding token t: non-zero exactly on the tokens used, so the set of tokens leaks (measured here)."""
        module = self.lg.node(name)["module"]
        tokens = self.values[self.lg.data_args(name)[0]]
        rec.verdict, rec.basis = Verdict.PASSES, Basis.STRUCTURE
        rec.reason = "injective for distinct rows: recovering its output recovers the tokens"
        if self.val_known.get(name):
            self.val_known[self.lg.data_args(name)[0]] = True
        leak = lg_info.leak(LeakContext(module, None, tokens, self.grads[name], 1)) if (lg_info := self.lg.node(name)["info"]).leak else None
        if leak is None:
            return
        rec.extra.update(tokens_used=leak.tokens_used, gradient_rows_nonzero=leak.rows_nonzero)
        if leak.exact:
            rec.verdict = Verdict.LEAKS_EXACTLY
            rec.reason = f"{leak.reason}; " + rec.reason

    def _param_rows(self, name: str, rec: LayerRecord) -> None:
        """An op's own parameter rows (BatchNorm: dL/dgamma_c = sum_p k_y[c,p] (a[c,p] - mu_c) / sigma_c, one
        linear row per channel on its input a). When a comes from a weighted layer through elementwise ops,
        the row on z is J^T (k_y / sigma) restricted to channel c, which equals k_z[c] / gamma_c, and
        sum_p k_z[c,p] z[c,p] = <dL/dW[c], W[c]> is a combination of that layer's gradient rows: the
        rows add no rank. Measured here on the instance (proportionality per channel); otherwise the
        rows are reported as constraints the analysis does not use."""
        lg = self.lg
        attrs = lg.node(name)
        info, module = attrs["info"], attrs["module"]
        got = info.param_rows(module, self.grads[name]) if module is not None else None
        if got is None:
            return
        what = got.parameter
        channels = int(got.rows.shape[1])
        rec.extra["gamma_rows"] = channels
        unused = (
            f"; its {what} gradient gives {channels} linear rows on its input that this analysis does not use "
            f"(the attacker may have up to {channels} more constraints than counted)"
        )
        ops: list[str] = []
        cur = lg.data_args(name)[0]
        while lg.node(cur)["info"].elementwise:
            if len(list(lg.graph.successors(cur))) != 1:
                break
            ops.insert(0, cur)
            cur = lg.data_args(cur)[0]
        layer = lg.node(cur)
        below_mod = layer["module"]
        frozen = below_mod is not None and getattr(below_mod, "weight", None) is not None and not below_mod.weight.requires_grad
        if layer["info"].kind != LAYER or len(list(lg.graph.successors(cur))) != 1 or frozen:
            why = "not fed by a weighted layer through elementwise ops" if not frozen else f"the layer below ({cur}) is frozen"
            rec.extra["gamma_rows_redundant"] = False
            rec.reason += unused + f" ({why})"
            self.warnings.append(f"{name} ({info.name}): {channels} {what}-gradient rows not used as constraints ({why})")
            return
        e = got.rows
        z0 = self.values[cur]
        if ops:
            _, vjp = torch.func.vjp(_make_path_fn(lg, cur, ops, self.env), z0)
            (u,) = vjp(e)
        else:
            u = e
        k_z = self.grads[cur].detach().reshape(u.shape)
        u_c = u.transpose(0, 1).reshape(u.shape[1], -1)
        k_c = k_z.transpose(0, 1).reshape(u.shape[1], -1)
        alpha = (u_c * k_c).sum(1, keepdim=True) / (k_c * k_c).sum(1, keepdim=True).clamp_min(1e-300)
        resid = float(((u_c - alpha * k_c).norm(dim=1) / u_c.norm(dim=1).clamp_min(1e-300)).max()) if u_c.numel() else 0.0
        rec.extra["gamma_rows_residual"] = resid
        if resid <= 1e-9:
            rec.extra["gamma_rows_redundant"] = True
            rec.reason += (
                f"; its {what} gradient's {channels} rows, linearised on {cur}'s output z, equal k_z[c] / gamma_c "
                f"(measured residual {resid:.1e}), combinations of {cur}'s gradient rows "
                "(sum_p k_z[c,p] z[c,p] = <dL/dW[c], W[c]>): they add no rank"
            )
        else:
            rec.extra["gamma_rows_redundant"] = False
            rec.reason += unused + f" (not proportional to {cur}'s dL/dz per channel: residual {resid:.1e})"
            self.warnings.append(f"{name} ({info.name}): {channels} {what}-gradient rows not used as constraints")

    def _k_derivable(self, name: str) -> bool:
        """Can the attacker compute dL/d(output of name)? Every consumer's k must be derivable and its
        Jacobian known: constant (weighted layer, reshape, add, BatchNorm, average pool), a function
        of the consumer's output for monotone activations (ReLU, LeakyReLU, Sigmoid ...) once that
        output is recovered, and otherwise a function of values the walk does not recover."""
        ok = True
        for c in self.lg.graph.successors(name):
            source = self.lg.node(c)["info"].jacobian
            known = source == CONSTANT or (source == FROM_OUTPUT and self.val_known.get(c, False))
            ok = ok and self.k_known.get(c, False) and known
        return ok

    def _forward_info(self, name: str, spec) -> tuple[ForwardInfo, Chain, str, tuple[int, int] | None]:
        """What the attacker knows about this layer's output z, and why; the last item is the
        (lower, upper) count of directions the layer above left undetermined when only bounds are
        known (then ForwardInfo.rows is an upper bound and the caller turns the rank into bounds)."""
        lg = self.lg
        above = _path_above(lg, name)
        z0 = self.values[name]
        n_samples_z = z0.shape[0]
        if above.end is None:
            return ForwardInfo(none=True, rows=0), Chain.NONE, f"no forward constraints: {above.why_cut}", None
        ops_info = [lg.node(o)["info"] for o in above.ops]
        lossy = [i.name for i in ops_info if not i.invertible]
        unknown_ops = [i.name for i in ops_info if i.kind == UNKNOWN]
        fn = _make_path_fn(lg, name, above.ops, self.env)
        if above.end == "output":
            if self.batch > 1 or n_samples_z != self.batch:
                return (
                    ForwardInfo(none=True, rows=0),
                    Chain.NONE,
                    f"output layer: the {self.loss} loss of a batch of {self.batch} does not reveal each sample's output",
                    None,
                )
            unknown, uncertain = None, None
            why = f"output layer: the {self.loss} loss reveals the output"
            end_dims = fn(z0).numel()
            if self.loss == "cross-entropy":
                unknown = torch.full((end_dims, 1), 1.0 / math.sqrt(end_dims), dtype=torch.float64)
                why = "output layer: cross-entropy reveals the logits up to a constant"
        elif above.end in self.failed:
            return (
                ForwardInfo(none=True, rows=0),
                Chain.NONE,
                f"no forward constraints: the layer above ({above.end}) could not be analysed",
                None,
            )
        else:
            upper = self.nulls.get(above.end)
            unknown = upper if (upper is not None and upper.shape[1] > 0) else None
            end_dims = numel(lg.node(above.end)["in_shape"])
            uncertain = self.carried.get(above.end)
            if uncertain is not None:
                unknown = None
                why = f"layer above ({above.end}) left {_span(*uncertain)} directions undetermined (bounds)"
            elif unknown is not None:
                why = f"layer above ({above.end}) left {unknown.shape[1]} directions undetermined"
            else:
                why = f"layer above ({above.end}) recovered"
        d = 0 if unknown is None else unknown.shape[1]
        if above.ops:
            rows = _known_rows(fn, z0, end_dims, d, self.gen)
        else:  # z itself is the next tensor: every entry reaches it
            rows = max(0, min(z0.numel(), end_dims) - d)
        if uncertain is not None:  # at most end_dims - (lower bound) directions of the next input are known
            rows = max(0, min(rows, end_dims - uncertain[0]))
            why += f": at most {rows} forward rows"
        info = ForwardInfo(jac=_jvp_batch(fn, z0) if above.ops else None, unknown=unknown, rows=rows)
        if lossy:
            why += f"; through non-invertible {', '.join(lossy)}: forward constraints on {rows} of {z0.numel()} entries"
        if unknown_ops:
            why += f"; through not-understood {', '.join(unknown_ops)} (treated as known to the attacker)"
        exact_above = d == 0 and (uncertain is None or uncertain[1] == 0)
        chain = Chain.FULL if not lossy and exact_above else Chain.PARTIAL
        return info, chain, why, (uncertain if uncertain is not None and uncertain[1] > 0 else None)

    def _weighted(self, name: str, rec: LayerRecord) -> None:
        lg = self.lg
        attrs = lg.node(name)
        try:
            spec = lg.conv_spec(name)
        except (ValueError, TypeError) as exc:
            rec.verdict, rec.basis = Verdict.NOT_UNDERSTOOD, Basis.STRUCTURE
            rec.reason = f"cannot normalise this layer: {exc}"
            self.warnings.append(f"{name}: {rec.reason}")
            self.failed.add(name)
            return
        k = self.grads[name]
        x_in = self.values[lg.data_args(name)[0]]
        n_samples = x_in.numel() // spec.n_in
        k = k.reshape(n_samples, *spec.out_shape)
        module = attrs["module"]
        frozen = module is not None and getattr(module, "weight", None) is not None and not module.weight.requires_grad
        if frozen:  # a frozen weight's gradient is never shared: no gradient rows
            k = torch.zeros_like(k)
            rec.extra["frozen"] = True
        fwd, chain, why, uncertain = self._forward_info(name, spec)
        known = self._known_inputs(name, n_samples, spec)
        res: LayerRank = layer_rank(
            spec, k, fwd, known=known, want_null=True, exact_limit=self.options.exact_rank_limit
        )
        if uncertain is not None:
            res = _rank_given_uncertain_above(res, uncertain, fwd.rows or 0)
        elif res.rank is None and chain == Chain.FULL and n_samples == 1:
            res = self._forward_probe(name, spec, res, rec) or res
        if known is not None:
            rec.extra["known_inputs"] = int(known.sum())
        rec.unknowns, rec.grad_rows, rec.fwd_rows = res.unknowns, res.grad_rows, res.fwd_rows
        rec.rank_grad, rec.rank_grad_counting = res.rank_grad, res.rank_grad_counting
        rec.rank, rec.rank_lower, rec.rank_upper = res.rank, res.rank_lower, res.rank_upper
        rec.rank_method, rec.deficit, rec.sigma_min_rel = res.method, res.deficit, res.sigma_min_rel
        rec.chain, rec.chain_reason = chain, why
        rec.extra["samples"] = n_samples
        self.nulls[name] = res.null_basis
        if res.null_basis is None and res.deficit != 0:  # the layer below learns only how many directions are lost
            self.carried[name] = (res.unknowns - res.rank_upper, res.unknowns - res.rank_lower)
            rec.extra["undetermined_lower"], rec.extra["undetermined_upper"] = self.carried[name]
        info = attrs["info"]
        leak = info.leak(LeakContext(module, spec, x_in, k, n_samples)) if info.leak is not None else None
        if leak is not None and leak.exact:
            rec.verdict, rec.basis = Verdict.LEAKS_EXACTLY, Basis.STRUCTURE
            rec.reason = leak.reason
            self.nulls[name] = None
            self.carried.pop(name, None)
            rec.extra.pop("undetermined_lower", None)
            rec.extra.pop("undetermined_upper", None)
        elif res.rank is None:
            rec.verdict = Verdict.DEFICIENT if res.rank_upper < res.unknowns else Verdict.RECOVERABLE
            rec.basis = Basis.BOUNDS
            cause = "the layer above is only bounded" if uncertain is not None else "system too large for an exact rank"
            rec.reason = f"rank between {res.rank_lower} and {res.rank_upper} of {res.unknowns} unknowns ({cause})"
            if res.rank_upper < res.unknowns:
                rec.reason += f": at least {res.unknowns - res.rank_upper} directions undetermined"
            elif res.rank_lower < res.unknowns:
                rec.reason += ": undecided, counted as recoverable (the attacker's side)"
        elif res.deficit == 0:
            rec.verdict, rec.basis = Verdict.RECOVERABLE, Basis.NUMERICAL
            rec.reason = f"rank {res.rank} = {res.unknowns} unknowns: closed-form solve"
            if res.method == "fourier-probe":
                rec.reason += (
                    f" (the forward rows alone determine x: a random probe came back to {rec.extra['probe_error']:.1e} "
                    f"after {rec.extra['probe_iterations']} preconditioned CGLS iterations)"
                )
        else:
            rec.verdict, rec.basis = Verdict.DEFICIENT, Basis.NUMERICAL
            rec.reason = f"rank {res.rank} of {res.unknowns} unknowns: {res.deficit} directions undetermined"
        if chain != Chain.FULL:
            rec.reason += f" ({why})"
        if frozen:
            rec.grad_rows = 0
            rec.reason += "; weight frozen (requires_grad=False): its gradient is not shared"
        k_ok = self.k_known.get(name, False)
        rec.extra["k_derivable"] = k_ok
        leaked = rec.verdict == Verdict.LEAKS_EXACTLY
        if (res.deficit == 0 and k_ok) or leaked:
            self.val_known[lg.data_args(name)[0]] = True
        if rec.verdict == Verdict.RECOVERABLE and not k_ok:
            rec.reason += (
                "; needs dL/dz, which rests on activation patterns above that the attacker cannot derive "
                "in closed form (taken from the instance)"
            )

    def _forward_probe(self, name: str, spec, res: LayerRank, rec: LayerRecord) -> LayerRank | None:
        """A layer too large for an exact rank whose output z is fully known through invertible ops:
        when its forward rows alone determine x, rank [K; F] = unknowns. Tested numerically, as the
        rank is elsewhere: a random probe v is solved back from W v by Fourier-preconditioned CGLS
        (rgap_audit.fourier); if W had a null direction, a generic v would not come back (the attack's
        --verify solves the instance's own z with the same solver). Known input
        entries only remove columns, which keeps full column rank."""
        from rgap_audit import fourier

        if getattr(spec, "transposed", False) or not fourier.eligible(spec) or spec.n_out < spec.n_in:
            return None
        need = fourier.memory_bytes(spec)
        if need > self.options.memory_budget_mb * 2**20 / 2:  # stay within half the audit's memory budget
            rec.extra["probe_skipped"] = f"the probe's preconditioner needs about {need / 2**30:.1f} GiB"
            return None
        out = fourier.solve(spec, None, tuple(spec.in_shape), seed=self.options.seed)  # the probe alone
        rec.extra.update(probe_error=out.probe_error, probe_iterations=out.iterations)
        if not (out.converged and out.probe_error <= fourier.PROBE_TOL):
            return None
        return replace(
            res,
            rank=res.unknowns,
            rank_lower=res.unknowns,
            rank_upper=res.unknowns,
            deficit=0,
            method="fourier-probe",
            null_basis=torch.zeros(spec.n_in, 0, dtype=torch.float64),
        )

    def _known_inputs(self, name: str, n_samples: int, spec) -> torch.Tensor | None:
        """Entries of this layer's input that do not depend on the layer below (a ReLU's zeros, given
        the activation pattern): known constants to the attacker, so not unknowns."""
        below = self.below.get(name)
        if below is None:
            return None
        lower, ops = below
        if not ops:
            return None
        if any(self.lg.node(o)["info"].kind == MERGE for o in ops):
            # other branches feed this input too: entries this branch leaves constant are not known
            # constants (a conservative choice: ReLU zeros inside a branch are counted as unknowns)
            return None
        fn = _make_path_fn(self.lg, lower, ops, self.env)
        z0 = self.values[lower]
        t = torch.randn(z0.shape, generator=self.gen, dtype=z0.dtype)
        moved = torch.func.jvp(fn, (z0,), (t,))[1]
        known = (moved == 0).reshape(n_samples, *spec.in_shape)
        return known if bool(known.any()) else None

    # ------------------------------------------------------------------ the model verdict
    def _verdict(self, records: list[LayerRecord]) -> ModelVerdict:
        lg = self.lg
        layers = [r for r in records if r.kind == LAYER and r.unknowns is not None]
        deficient = [r for r in layers if r.verdict == Verdict.DEFICIENT]
        total_deficit = sum(r.deficit or 0 for r in deficient)
        not_understood = [r for r in records if r.verdict == Verdict.NOT_UNDERSTOOD]
        caveats = [CAVEAT_PATTERN]
        if self.batch > 1:
            caveats.append(CAVEAT_BATCH.format(b=self.batch))
        if deficient:
            caveats.append(CAVEAT_DEFICIT)

        # the layers that read the model input (through invertible, single-input ops)
        first, path_ok, why_path = self._input_layer()
        if first is not None and path_ok and self.batch > 1:
            span = self._batch_span(first, records)
            if span is not None and span["span_rank"] == self.batch and span["span_distance"] <= SPAN_IN_TOL:
                caveats.append(
                    f"With {self.batch} samples, the weight gradient of {first} spans a {span['span_rank']}-dimensional "
                    f"subspace that holds every sample (largest relative distance {span['span_distance']:.1e}, measured): "
                    "the batch's span leaks whatever the per-sample verdict."
                )
        basis = Basis.NUMERICAL
        if first is None:
            status, recoverable, input_deficit = "unknown", None, None
            summary = f"the input cannot be traced to a weighted layer: {why_path}"
        else:
            rec = next(r for r in records if r.node == first)
            layer = f"layer {rec.module_path or first} ({rec.op})"
            input_deficit = rec.deficit
            if rec.verdict == Verdict.LEAKS_EXACTLY and path_ok:
                status, recoverable, basis = "leaks-exactly", True, Basis.STRUCTURE
                summary = f"the input leaks exactly through {layer}: x = dL/dW[j] / dL/db[j]"
            elif rec.unknowns is None:  # the layer could not be normalised
                status, recoverable, basis = "unknown", None, Basis.STRUCTURE
                summary = f"the input {layer} could not be analysed: {rec.reason}"
            elif rec.deficit is None and rec.rank_upper is not None and rec.rank_upper < rec.unknowns:
                status, recoverable, basis = "deficient", False, Basis.BOUNDS
                summary = (
                    f"input not recoverable in closed form: at least {rec.unknowns - rec.rank_upper} of {rec.unknowns} "
                    f"input directions undetermined (proven bounds: rank {rec.rank_lower}..{rec.rank_upper} at {layer})"
                )
            elif rec.deficit is None:
                status, recoverable, basis = "unknown", None, Basis.BOUNDS
                summary = f"input {layer} only bounded: rank {rec.rank_lower}..{rec.rank_upper} of {rec.unknowns}"
            elif rec.deficit == 0 and path_ok and not self.val_known.get(lg.input_node, False):
                status, recoverable = "recoverable-given-pattern", None
                if self.batch > 1:
                    summary = (
                        f"the {self.batch} inputs are determined by the gradient and forward constraints of {layer} "
                        "given each sample's dL/dz, which a gradient summed over the batch does not reveal "
                        "(R-GAP's recursion cannot start at the output); an attacker who separates the samples "
                        "may still recover them"
                    )
                else:
                    summary = (
                        f"the input is determined by the gradient and forward constraints of {layer}, "
                        "but forming them needs dL/dz, which rests on activation patterns above that the attacker "
                        "cannot derive in closed form; an attacker who estimates them may still recover the input"
                    )
            elif rec.deficit == 0 and path_ok:
                if deficient:
                    status = "recoverable-joint"
                    summary = (
                        f"input recoverable in closed form, though {len(deficient)} layer(s) are deficient "
                        f"(total {total_deficit}): a solve that keeps only the known directions of each z pins it down"
                    )
                else:
                    status = "recoverable-layerwise"
                    summary = "input recoverable in closed form, layer by layer (R-GAP)"
                recoverable = True
            elif rec.deficit == 0:
                status, recoverable = "deficient", False
                summary = f"the first layer's input is recoverable, but {why_path}"
            else:
                status, recoverable = "deficient", False
                summary = f"input not recoverable in closed form: {rec.deficit} input directions undetermined"
        if not_understood:
            names = ", ".join(sorted({r.op for r in not_understood}))
            if recoverable is not True:
                status, recoverable = "unknown", None
            summary += f"; not understood: {names} (never counted as safe)"
        return ModelVerdict(
            status=status,
            input_recoverable=recoverable,
            deficient_layers=len(deficient),
            total_deficit=total_deficit,
            input_deficit=input_deficit,
            basis=basis,
            summary=summary,
            caveats=caveats,
        )

    def _batch_span(self, first: str, records: list[LayerRecord]) -> dict | None:
        """B > 1, the input read by a Linear: dL/dW = sum_n k_n x_n^T, so its rows lie in span{x_n}.
        Measured on the instance (rgap_audit.span): the numerical rank of dL/dW and each sample's
        relative distance to its row space."""
        lg = self.lg
        module = lg.node(first)["module"]
        if module is None or getattr(module, "weight", None) is None or not module.weight.requires_grad:
            return None
        try:
            spec = lg.conv_spec(first)
        except (ValueError, TypeError):
            return None
        x = self.values[lg.data_args(first)[0]].detach().to(torch.float64)
        if spec.ndim != 0 or x.numel() != self.batch * spec.n_in:
            return None
        x = x.reshape(self.batch, spec.n_in)
        k = self.grads[first].detach().to(torch.float64).reshape(self.batch, -1)
        measured = row_space(k.T @ x, x, seed=self.options.seed)  # k^T x: the shared gradient of the weight
        if not measured.distances or measured.rank == 0:
            return None
        r, dist = measured.rank, max(measured.distances)
        rec = next(r_ for r_ in records if r_.node == first)
        rec.extra.update(span_rank=r, span_distance=float(f"{dist:.3g}"), span_samples=self.batch)  # 3 digits: shown as is
        return rec.extra

    def _input_layer(self) -> tuple[str | None, bool, str]:
        """The weighted layer that reads the model input, whether the ops before it are invertible, and why not."""
        lg = self.lg
        cur = lg.input_node
        lossy = []
        while True:
            succ = list(lg.graph.successors(cur))
            if len(succ) != 1:
                return None, False, "the input feeds several branches"
            cur = succ[0]
            info = lg.node(cur)["info"]
            if info.kind == LAYER:
                why = "" if not lossy else f"the ops before it are not invertible ({', '.join(lossy)})"
                return cur, not lossy, why
            if cur == lg.output_node:
                return None, False, "no weighted layer reads the input"
            if info.kind == MERGE:
                return None, False, f"the input joins another branch at {cur}"
            if not info.invertible:
                lossy.append(info.name)


def audit_loaded(loaded: LoadedModel, options: AuditOptions) -> ModelReport:
    """Audit one loaded model: the R-GAP walk, a record per op and the model verdict."""
    with single_thread():
        return Walker(loaded, options).run()


def audit(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    loss: str | None = None,
    seed: int = 0,
    name: str | None = None,
) -> ModelReport:
    """Python API: audit a model object directly (notebooks, tests)."""
    loaded = LoadedModel(file="<api>", name=name or type(model).__name__, module=model, input_shape=tuple(input_shape))
    return audit_loaded(loaded, AuditOptions(batch_size=batch_size, loss=loss, seed=seed))
