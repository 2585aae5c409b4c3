"""The R-GAP walk: from the output down to the input, one LayerRecord per operation.

For every weighted layer the walk measures, on the instance (float64, the model's weights as
constructed, a random input, the real dL/dz from autograd and the real activation pattern), the rank
of the layer's linear system [K; F] (rgap_audit.rank), where F holds only the forward constraints the
attacker really has: those that survive the ops between this layer and the layer above (a ReLU keeps
active units only) and the directions the layer above left undetermined. The undetermined directions
of each layer are handed down to the next one, so the deficit reported at the lowest layer is the
number of input directions that no closed-form solve can pin down. Ops are dispatched by their kind;
what an op does comes from its op-table fields.
"""

from __future__ import annotations

import time

import torch

from rgap_audit import ops, progress
from rgap_audit.analysis.bounds import rank_given_uncertain_above
from rgap_audit.analysis.forward import ForwardSide, forward_side, known_inputs
from rgap_audit.analysis.joint import SUBBLOCK, InnerLayer, joint_rank
from rgap_audit.analysis.probe import forward_probe
from rgap_audit.analysis.rows import measure_param_rows
from rgap_audit.analysis.state import LayerSystem, WalkState
from rgap_audit.convtranspose import ConvTransposeSpec
from rgap_audit.instance import Instance
from rgap_audit.links import above
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.rank import LayerRank, layer_rank
from rgap_audit.records import Basis, Chain, LayerRecord, Location, SegmentRecord, TokenLeak, Undetermined, Verdict
from rgap_audit.segments import Segment, common_module_path, joint_segments


def location_of(loaded: LoadedModel | None, module_path: str | None) -> Location | None:
    """Where a layer was constructed: its module's own line, else its nearest located parent's, else the model's."""
    if loaded is None:
        return None
    if module_path is not None:
        path = module_path
        while path:
            if path in loaded.layer_locations:
                return loaded.layer_locations[path]
            path = path.rpartition(".")[0]
    return loaded.location


def _basis_would_fit(res: LayerRank, total_x: int, exact_limit: int) -> bool:
    """Whether rank.layer_rank would have kept the null basis had it been asked for (an exact rank from
    the reduced system keeps it when total_x * deficit <= exact_limit): so that a layer whose basis was
    not computed reports the same `undetermined` bounds as before."""
    return res.rank is not None and res.deficit is not None and total_x * res.deficit <= exact_limit


class Walker:
    """One walk over one instance, from the output down: records and what the attacker knows per node."""

    def __init__(self, inst: Instance, options: AuditOptions):
        self.inst = inst
        self.options = options
        self.gen = torch.Generator().manual_seed(options.seed)
        self.state = WalkState(warnings=list(inst.notes))
        self.segments = joint_segments(inst.graph)
        self.by_start: dict[str, Segment] = {s.start: s for s in self.segments}
        self.inner: dict[str, str] = {layer: s.name for s in self.segments for layer in s.layers}
        self.state.stops = {s.start: s.name for s in self.segments}
        self.recs: dict[str, LayerRecord] = {}

    def run(self) -> list[LayerRecord]:
        inst, state = self.inst, self.state
        lg = inst.graph
        state.k_known[lg.output_node] = inst.batch == 1
        for lower in lg.weighted():
            link = above(lg, lower, inst.env, state.stops)
            state.above[lower] = link
            leaves = lower in self.inner and self.inner.get(link.upper or "") != self.inner[lower]
            if link.upper is not None and link.upper != lg.output_node and not leaves:
                state.below[link.upper] = link
        for seg in self.segments:  # a segment's link starts at its end cut
            link = above(lg, seg.end, inst.env, state.stops)
            state.above[seg.name] = link
            state.unit_size[seg.name] = inst.values[seg.start].numel()
            if link.upper is not None and link.upper != lg.output_node:
                state.below[link.upper] = link
        records: list[LayerRecord] = []
        for name in lg.ops():
            if name in self.by_start:  # the segment above this cut first: it decides what is known of the cut's value
                records.append(self._segment(self.by_start[name], len(records)))
            gn = lg.node(name)
            info = gn.info
            rec = LayerRecord(
                index=len(records),
                node=name,
                op=info.name,
                kind=info.kind,
                module_path=gn.module_path,
                input_shape=list(gn.in_shape or ()),
                output_shape=list(gn.out_shape or ()),
                location=location_of(inst.loaded, gn.module_path),
            )
            t0 = time.perf_counter()
            progress.step("walk", f"{gn.module_path or name} ({info.name})")
            state.k_known[name] = self._k_derivable(name)
            if info.kind == ops.LAYER:
                self._weighted(name, rec)
            elif info.kind == ops.EMBEDDING:
                self._embedding(name, rec)
            elif info.kind == ops.UNKNOWN:
                rec.verdict, rec.basis = Verdict.NOT_UNDERSTOOD, Basis.STRUCTURE
                rec.reason = f"{info.name}: {info.why}; never counted as safe"
                state.warnings.append(f"{name} ({info.name}) is not understood by rgap-audit and was not analysed")
            else:
                rec.verdict = Verdict.PASSES if info.invertible else Verdict.CHAIN_BROKEN
                rec.basis = Basis.STRUCTURE
                rec.reason = info.why
                if info.param_rows is not None:
                    measure_param_rows(inst, name, rec, state.warnings)
                if info.invertible and state.val_known.get(name):
                    for a in lg.data_args(name):
                        state.val_known[a] = True
            rec.seconds = time.perf_counter() - t0
            records.append(rec)
            self.recs[name] = rec
        if lg.input_node in self.by_start:
            records.append(self._segment(self.by_start[lg.input_node], len(records)))
        return records

    # ------------------------------------------------------------------ what the attacker can derive
    def _k_derivable(self, name: str) -> bool:
        """Can the attacker compute dL/d(output of name)? Every consumer's k must be derivable and its
        Jacobian known: constant (weighted layer, reshape, add, BatchNorm, average pool), a function
        of the consumer's output for monotone activations (ReLU, LeakyReLU, Sigmoid ...) once that
        output is recovered, and otherwise a function of values the walk does not recover."""
        state, lg = self.state, self.inst.graph
        ok = True
        for c in lg.consumers(name):
            source = lg.node(c).info.jacobian
            known = source == ops.CONSTANT or (source == ops.FROM_OUTPUT and state.val_known.get(c, False))
            ok = ok and state.k_known.get(c, False) and known
        return ok

    # ------------------------------------------------------------------ per kind
    def _embedding(self, name: str, rec: LayerRecord) -> None:
        """Token ids -> rows of the table; its weight gradient reveals the set of tokens used (measured)."""
        inst, state = self.inst, self.state
        gn = inst.graph.node(name)
        token_node = inst.graph.data_args(name)[0]
        rec.verdict, rec.basis = Verdict.PASSES, Basis.STRUCTURE
        rec.reason = "injective for distinct rows: recovering its output recovers the tokens"
        if state.val_known.get(name):
            state.val_known[token_node] = True
        if gn.info.leak is None:
            return
        leak = gn.info.leak(ops.LeakContext(gn.module, None, inst.values[token_node], inst.grads[name], 1))
        if leak is None:
            return
        rec.tokens = TokenLeak(tokens_used=leak.tokens_used, rows_nonzero=leak.rows_nonzero)
        if leak.exact:
            rec.verdict = Verdict.LEAKS_EXACTLY
            rec.reason = f"{leak.reason}; " + rec.reason

    def _weighted(self, name: str, rec: LayerRecord) -> None:
        inst, state, lg = self.inst, self.state, self.inst.graph
        gn = lg.node(name)
        try:
            spec = lg.conv_spec(name)
        except (ValueError, TypeError) as exc:
            rec.verdict, rec.basis = Verdict.NOT_UNDERSTOOD, Basis.STRUCTURE
            rec.reason = f"cannot normalise this layer: {exc}"
            state.warnings.append(f"{name}: {rec.reason}")
            state.failed.add(name)
            return
        x_in = inst.values[lg.data_args(name)[0]]
        n_samples = x_in.numel() // spec.n_in
        k = inst.grads[name].reshape(n_samples, *spec.out_shape)
        module = gn.module
        frozen = module is not None and getattr(module, "weight", None) is not None and not module.weight.requires_grad
        if frozen:  # a frozen weight's gradient is never shared: no gradient rows
            k = torch.zeros_like(k)
            rec.frozen = True
        side = forward_side(inst, state, name, self.gen)
        known = known_inputs(inst, state, name, n_samples, tuple(spec.in_shape), self.gen)
        want_null = self._null_read_below(name, spec, side)
        res = layer_rank(
            spec, k, side.info, known=known, want_null=want_null, exact_limit=self.options.exact_rank_limit,  # type: ignore[arg-type]
            lost_above=None if side.uncertain is None else side.uncertain[1],
        )
        if side.uncertain is not None and res.method != "batch-composite":  # (ranked with the rows above: exact)
            res = rank_given_uncertain_above(res, side.uncertain, side.info.rows or 0)
        elif res.rank is None and side.chain == Chain.FULL and n_samples == 1:
            settled, rec.probe = forward_probe(spec, res, self.options.memory_budget_mb, self.options.seed)  # type: ignore[arg-type]
            res = settled or res
        if known is not None:
            rec.known_inputs = int(known.sum())
        rec.unknowns, rec.grad_rows, rec.fwd_rows = res.unknowns, res.grad_rows, res.fwd_rows
        rec.rank_grad, rec.rank_grad_counting = res.rank_grad, res.rank_grad_counting
        rec.rank, rec.rank_lower, rec.rank_upper = res.rank, res.rank_lower, res.rank_upper
        rec.rank_method, rec.deficit, rec.sigma_min_rel = res.method, res.deficit, res.sigma_min_rel
        rec.chain, rec.chain_reason = side.chain, side.why
        rec.samples = n_samples
        state.nulls[name] = res.null_basis
        state.systems[name] = LayerSystem(name, spec, k, side.info, known, res)
        kept = res.null_basis is not None or (not want_null and _basis_would_fit(res, n_samples * spec.n_in, self.options.exact_rank_limit))
        if not kept and res.deficit != 0:  # the layer below learns only how many directions are lost
            _carry_count(state, name, res, rec)
        leak = gn.info.leak(ops.LeakContext(module, spec, x_in, k, n_samples)) if gn.info.leak is not None else None
        if leak is not None and leak.exact:
            rec.verdict, rec.basis = Verdict.LEAKS_EXACTLY, Basis.STRUCTURE
            rec.reason = leak.reason
            state.nulls[name] = None
            state.carried.pop(name, None)
            rec.undetermined = None
        elif res.rank is None:
            cause = "the layer above is only bounded" if side.uncertain is not None else "system too large for an exact rank"
            _bounded(rec, res, cause)
        elif res.deficit == 0:
            rec.verdict, rec.basis = Verdict.RECOVERABLE, Basis.NUMERICAL
            rec.reason = f"rank {res.rank} = {res.unknowns} unknowns: closed-form solve"
            if res.method == "fourier-probe" and rec.probe is not None:
                rec.reason += (
                    f" (the forward rows alone determine x: a random probe came back to {rec.probe.error:.1e} "
                    f"after {rec.probe.iterations} preconditioned CGLS iterations)"
                )
        else:
            rec.verdict, rec.basis = Verdict.DEFICIENT, Basis.NUMERICAL
            rec.reason = f"rank {res.rank} of {res.unknowns} unknowns: {res.deficit} directions undetermined"
        batch_notes = [t for t in res.notes if t.startswith(("batch", "forward-first", "per-sample"))]
        if batch_notes and (res.method.startswith("batch-") or res.rank is None):  # how the batch system was eliminated, or why not
            rec.reason += f" ({batch_notes[-1]})"
        if side.chain != Chain.FULL:
            rec.reason += f" ({side.why})"
        if frozen:
            rec.grad_rows = 0
            rec.reason += "; weight frozen (requires_grad=False): its gradient is not shared"
        k_ok = state.k_known.get(name, False)
        rec.k_derivable = k_ok
        leaked = rec.verdict == Verdict.LEAKS_EXACTLY
        if (res.deficit == 0 and k_ok) or leaked:
            state.val_known[lg.data_args(name)[0]] = True
        if rec.verdict == Verdict.RECOVERABLE and not k_ok:
            rec.reason += (
                "; needs dL/dz, which rests on activation patterns above that the attacker cannot derive "
                "in closed form (taken from the instance)"
            )
        if name in self.inner:
            rec.in_segment = self.inner[name]
            rec.reason += f"; layer-wise only: inside joint segment {self.inner[name]}, whose joint rank decides what reaches the layer below"

    def _null_read_below(self, name: str, spec: object, side: ForwardSide) -> bool:
        """Whether a basis of this layer's undetermined directions is worth computing: only a layer whose
        links are read from below (forward.forward_side) uses it. The input layer's is read by nobody, and
        for a small CIFAR CNN its full SVD was most of the audit (the rank itself needs singular values
        only, by the same rule). Transposed convolutions and layers under bounded ones keep it (their
        rank code reads it)."""
        if any(link.upper == name for link in self.state.above.values()):
            return True
        return isinstance(spec, ConvTransposeSpec) or side.uncertain is not None or side.info.none

    # ------------------------------------------------------------------ joint segments
    def _segment(self, seg: Segment, index: int) -> LayerRecord:
        """One row for a branching segment: the joint system of its layers over the value of its input cut."""
        t0 = time.perf_counter()
        inst, state, lg = self.inst, self.state, self.inst.graph
        u0 = inst.values[seg.start]
        paths = [p for p in (lg.node(n).module_path for n in seg.layers) if p]
        prefix = common_module_path(lg, seg)
        rec = LayerRecord(
            index=index,
            node=seg.name,
            op="segment",
            kind=ops.SEGMENT,
            module_path=prefix or None,
            input_shape=list(u0.shape),
            output_shape=list(inst.values[seg.end].shape),
            location=location_of(inst.loaded, prefix or (paths[-1] if paths else None)),
            segment=SegmentRecord(start=seg.start, end=seg.end, layers=list(seg.layers)),
        )
        inner: list[InnerLayer] = []
        for name in seg.layers:
            try:
                spec = lg.conv_spec(name)
            except (ValueError, TypeError) as exc:
                rec.verdict, rec.basis = Verdict.NOT_UNDERSTOOD, Basis.STRUCTURE
                rec.reason = f"joint segment with a layer that cannot be normalised ({name}: {exc}); never counted as safe"
                state.failed.add(seg.name)
                return rec
            x_in = inst.values[lg.data_args(name)[0]]
            n_samples = x_in.numel() // spec.n_in
            module = lg.node(name).module
            frozen = module is not None and getattr(module, "weight", None) is not None and not module.weight.requires_grad
            inner.append(InnerLayer(name, lg.data_args(name)[0], spec, inst.grads[name].reshape(n_samples, *spec.out_shape), frozen))
        unknown_ops = [lg.node(n).info.name for n in seg.nodes if lg.node(n).info.kind == ops.UNKNOWN]
        side = forward_side(inst, state, seg.name, self.gen, z0=inst.values[seg.end])
        known = self._segment_known(seg)
        lower_g = self._direct_reader_rank(seg, known)
        upper_g = 0
        for n in seg.layers:  # rank(G_i J_i) <= rank(K_i): each layer's own gradient rank
            r = self.recs.get(n)
            if r is not None:
                upper_g += r.rank_grad if r.rank_grad is not None else (r.grad_rows or 0)
        link = state.above[seg.name]
        fwd_width = 0 if link.upper is None else int(link.fn()(inst.values[seg.end]).numel())
        try:
            res = joint_rank(inst, seg, inner, side.info, known, fwd_width, self.options.exact_rank_limit, (lower_g, upper_g))
        except Exception as exc:  # an op without forward-mode AD, a shape the segment function cannot replay
            rec.verdict, rec.basis = Verdict.NOT_UNDERSTOOD, Basis.STRUCTURE
            rec.reason = f"joint segment not analysed: {type(exc).__name__}: {exc}; never counted as safe"
            state.warnings.append(f"{seg.name}: {rec.reason}")
            state.failed.add(seg.name)
            return rec
        if side.uncertain is not None and res.method != "batch-composite":  # (ranked with the rows above: exact)
            res = rank_given_uncertain_above(res, side.uncertain, side.info.rows or 0)
        if known is not None:
            rec.known_inputs = int(known.sum())
        rec.unknowns, rec.grad_rows, rec.fwd_rows = res.unknowns, res.grad_rows, res.fwd_rows
        rec.rank_grad, rec.rank = res.rank_grad, res.rank
        rec.rank_lower, rec.rank_upper = res.rank_lower, res.rank_upper
        rec.rank_method, rec.deficit, rec.sigma_min_rel = res.method, res.deficit, res.sigma_min_rel
        rec.chain, rec.chain_reason = side.chain, side.why
        rec.samples = inst.batch
        state.nulls[seg.name] = res.null_basis
        if res.null_basis is None and res.deficit != 0:
            _carry_count(state, seg.name, res, rec)
        what = f"joint system of {len(seg.layers)} weighted layer(s) over the value of {seg.start}"
        if res.rank is None:
            _bounded(rec, res, "too large for an exact rank", prefix=f"{what}: ")
        elif res.deficit == 0:
            rec.verdict, rec.basis = Verdict.RECOVERABLE, Basis.NUMERICAL
            rec.reason = f"{what}: rank {res.rank} = {res.unknowns} unknowns: one least-squares solve recovers it"
            if res.method == SUBBLOCK:
                rec.reason += (
                    " (the gradient rows of a layer reading the cut directly have full column rank on their own; "
                    "the whole system is too large to form)"
                )
        else:
            rec.verdict, rec.basis = Verdict.DEFICIENT, Basis.NUMERICAL
            rec.reason = f"{what}: rank {res.rank} of {res.unknowns} unknowns: {res.deficit} directions undetermined"
        if side.chain != Chain.FULL:
            rec.reason += f" ({side.why})"
        if unknown_ops:
            rec.reason += f"; through not-understood {', '.join(sorted(set(unknown_ops)))} (linearised at the instance)"
        k_ok = all(state.k_known.get(n, False) for n in seg.layers) and state.k_known.get(seg.end, False)
        rec.k_derivable = k_ok
        if res.deficit == 0 and k_ok:
            state.val_known[seg.start] = True
        if rec.verdict == Verdict.RECOVERABLE and not k_ok:
            rec.reason += (
                "; needs each inner layer's dL/dz, which rests on activation patterns the attacker cannot derive "
                "in closed form (taken from the instance)"
            )
        rec.seconds = time.perf_counter() - t0
        return rec

    def _direct_reader_rank(self, seg: Segment, known: torch.Tensor | None) -> int:
        """A lower bound on the rank of the segment's gradient rows: a layer reading the cut directly has rank
        K on the entries it counts as unknown; those of them the segment counts as known (a ReLU's zeros)
        are dropped columns, each lowering that rank by at most one."""
        lg, state = self.inst.graph, self.state
        seg_known = None if known is None else known.reshape(-1).bool()
        best = 0
        for n in seg.layers:
            rec, system = self.recs.get(n), state.systems.get(n)
            if lg.data_args(n)[0] != seg.start or rec is None or rec.rank_grad is None or system is None:
                continue
            dropped = 0
            if seg_known is not None:
                reader_free = torch.ones_like(seg_known) if system.known is None else ~system.known.reshape(-1).bool()
                dropped = int((reader_free & seg_known).sum())
            best = max(best, rec.rank_grad - dropped)
        return best

    def _segment_known(self, seg: Segment) -> torch.Tensor | None:
        """Entries of the segment's input that do not depend on the unit below (a ReLU's zeros, given the pattern)."""
        link = self.state.below.get(seg.name)
        if link is None or not link.steps or link.lower is None or link.joins:
            return None
        u0 = self.inst.values[seg.start]
        known = link.constant_entries(self.inst.values[link.lower], self.gen).reshape(u0.shape)
        return known if bool(known.any()) else None


def _carry_count(state: WalkState, unit: str, res: LayerRank, rec: LayerRecord) -> None:
    """No basis of the undetermined directions: the unit below learns only how many there are, within bounds."""
    state.carried[unit] = (res.unknowns - res.rank_upper, res.unknowns - res.rank_lower)
    state.carried_among[unit] = res.unknowns
    rec.undetermined = Undetermined(*state.carried[unit])


def _bounded(rec: LayerRecord, res: LayerRank, cause: str, prefix: str = "") -> None:
    """Verdict and reason of a layer or segment whose rank is only bounded: deficient when the upper bound
    falls short of the unknowns, otherwise counted as recoverable (the attacker's side)."""
    rec.verdict = Verdict.DEFICIENT if res.rank_upper < res.unknowns else Verdict.RECOVERABLE
    rec.basis = Basis.BOUNDS
    rec.reason = f"{prefix}rank between {res.rank_lower} and {res.rank_upper} of {res.unknowns} unknowns ({cause})"
    if res.rank_upper < res.unknowns:
        rec.reason += f": at least {res.unknowns - res.rank_upper} directions undetermined"
    elif res.rank_lower < res.unknowns:
        rec.reason += ": undecided, counted as recoverable (the attacker's side)"
