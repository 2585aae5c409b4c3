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
from rgap_audit.analysis.forward import forward_side, known_inputs
from rgap_audit.analysis.probe import forward_probe
from rgap_audit.analysis.rows import measure_param_rows
from rgap_audit.analysis.state import LayerSystem, WalkState
from rgap_audit.instance import Instance
from rgap_audit.links import above
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.rank import layer_rank
from rgap_audit.records import Basis, Chain, LayerRecord, Location, TokenLeak, Undetermined, Verdict


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


class Walker:
    """One walk over one instance, from the output down: records and what the attacker knows per node."""

    def __init__(self, inst: Instance, options: AuditOptions):
        self.inst = inst
        self.options = options
        self.gen = torch.Generator().manual_seed(options.seed)
        self.state = WalkState(warnings=list(inst.notes))

    def run(self) -> list[LayerRecord]:
        inst, state = self.inst, self.state
        lg = inst.graph
        state.k_known[lg.output_node] = inst.batch == 1
        for lower in lg.weighted():
            link = above(lg, lower, inst.env)
            state.above[lower] = link
            if link.upper is not None and link.upper != lg.output_node:
                state.below[link.upper] = link
        records = []
        for index, name in enumerate(lg.ops()):
            gn = lg.node(name)
            info = gn.info
            rec = LayerRecord(
                index=index,
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
        res = layer_rank(spec, k, side.info, known=known, want_null=True, exact_limit=self.options.exact_rank_limit)  # type: ignore[arg-type]
        if side.uncertain is not None:
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
        if res.null_basis is None and res.deficit != 0:  # the layer below learns only how many directions are lost
            state.carried[name] = (res.unknowns - res.rank_upper, res.unknowns - res.rank_lower)
            rec.undetermined = Undetermined(*state.carried[name])
        leak = gn.info.leak(ops.LeakContext(module, spec, x_in, k, n_samples)) if gn.info.leak is not None else None
        if leak is not None and leak.exact:
            rec.verdict, rec.basis = Verdict.LEAKS_EXACTLY, Basis.STRUCTURE
            rec.reason = leak.reason
            state.nulls[name] = None
            state.carried.pop(name, None)
            rec.undetermined = None
        elif res.rank is None:
            rec.verdict = Verdict.DEFICIENT if res.rank_upper < res.unknowns else Verdict.RECOVERABLE
            rec.basis = Basis.BOUNDS
            cause = "the layer above is only bounded" if side.uncertain is not None else "system too large for an exact rank"
            rec.reason = f"rank between {res.rank_lower} and {res.rank_upper} of {res.unknowns} unknowns ({cause})"
            if res.rank_upper < res.unknowns:
                rec.reason += f": at least {res.unknowns - res.rank_upper} directions undetermined"
            elif res.rank_lower < res.unknowns:
                rec.reason += ": undecided, counted as recoverable (the attacker's side)"
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
