"""Single architecture edits that make the model input not recoverable, each re-audited in full.

For every editable weighted layer (rgap_audit.ops.edits) the search tries: fewer output channels / features (the
largest width that works, by halving then bisection), a stride one larger, a kernel one smaller, and an average pool
of kernel 2 inserted after it. Each edited model (the layer rebuilt, the layer that reads it adjusted to its new
fan-in) gets the whole static analysis again: CNN6-d shows why, a deficient layer above a full-rank one does not
protect the input. An edit works when the re-audit's verdict is that the input is not recoverable (undecided does
not count). Working edits are ranked by the parameters, then the multiply-adds, they cost.

An edit is machine-readable (layer, attribute, old -> new): `apply_edit(model, edit, input_shape)` rebuilds it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from rgap_audit.analysis import audit_instance
from rgap_audit.errors import AuditError
from rgap_audit.instance import build_instance
from rgap_audit.ops.edits import Editable, editable, rebuilt, with_pool
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.records import ArchitectureDefence, ArchitectureEdit, ModelReport, ModelStatus
from rgap_audit.threads import single_thread

WIDTH, STRIDE, KERNEL, POOL = "width", "stride", "kernel_size", "pool_after"
BISECT_STEPS = 2  # after halving: bisection steps towards the largest width that works
BUDGET_S = 25.0  # wall time of the search; edits not tried within it are counted and reported
MAX_FIXES = 64
SHOW = 5  # edits kept in the report


class _FanIn(Exception):
    """A layer whose input no longer matches its fan-in: (module path, fan-in its input calls for)."""

    def __init__(self, path: str, needed: int):
        super().__init__(path)
        self.path, self.needed = path, needed


def _fix_fan_in(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Rebuild every layer whose fan-in no longer matches what reaches it (the layer above an edited one), until a
    forward pass runs; returns the layers rebuilt."""
    fixed: list[str] = []
    for _ in range(MAX_FIXES):
        handles = []
        for path, mod in model.named_modules():
            entry = editable(mod)
            if entry is None:
                continue

            def hook(m: nn.Module, args: tuple, path: str = path, entry: Editable = entry) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    need = entry.fan_in_of(args[0])
                    if need != getattr(m, entry.fan_in):
                        raise _FanIn(path, need)

            handles.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                model(example)
            return fixed
        except _FanIn as miss:
            old = model.get_submodule(miss.path)
            entry = editable(old)
            assert entry is not None
            model.set_submodule(miss.path, rebuilt(old, {entry.fan_in: miss.needed}))
            fixed.append(miss.path)
        finally:
            for h in handles:
                h.remove()
    raise ValueError(f"the edited model still does not run after {MAX_FIXES} fan-in fixes")


def apply_edit(model: nn.Module, edit: ArchitectureEdit, input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """A copy of `model` with the edit applied: the layer rebuilt with its attribute changed (new weights drawn under
    torch.manual_seed(seed)), the layers reading it rebuilt to their new fan-in. The original is not touched."""
    out = copy.deepcopy(model)
    layer = out.get_submodule(edit.layer)
    entry = editable(layer)
    if entry is None:
        raise ValueError(f"{edit.layer}: {type(layer).__name__} is not an editable layer")
    torch.manual_seed(seed)
    new: nn.Module
    if edit.attribute == POOL:
        new = with_pool(layer, edit.new[0])
    elif edit.attribute in (entry.width, WIDTH):
        new = rebuilt(layer, {entry.width: edit.new[0]})
    elif edit.attribute in (STRIDE, KERNEL):
        new = rebuilt(layer, {edit.attribute: tuple(edit.new)})
    else:
        raise ValueError(f"unknown edit attribute {edit.attribute!r}")
    out.set_submodule(edit.layer, new)
    weight = next((p for p in out.parameters()), None)
    dtype = weight.dtype if weight is not None else torch.float32
    _fix_fan_in(out, torch.rand((1, *input_shape), dtype=dtype))
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(specs: dict[str, Any]) -> int:
    """Multiply-adds per sample of the weighted layers (weight entries x output positions), from the ranked specs."""
    total = 0
    for spec in specs.values():
        weight = getattr(spec, "weight", None)
        spatial = getattr(spec, "out_spatial", ())
        if weight is None:
            continue
        total += int(weight.numel()) * math.prod(spatial)
    return total


def _audit(module: nn.Module, loaded: LoadedModel, options: AuditOptions) -> tuple[ModelReport, int]:
    edited = LoadedModel(file=loaded.file, name=loaded.name, module=module, input_shape=loaded.input_shape, loss=loaded.loss,
                         batch_size=1, location=loaded.location, call=loaded.call)
    opts = AuditOptions(batch_size=1, loss=options.loss, seed=options.seed, input_shape=options.input_shape,
                        memory_budget_mb=options.memory_budget_mb, exact_rank_limit=options.exact_rank_limit)
    with single_thread():
        audited = audit_instance(build_instance(edited, opts), opts)
    return audited.report, macs({n: s.spec for n, s in audited.systems.items()})


class _Search:
    """The edits of one model, each audited once (cached by edit)."""

    def __init__(self, loaded: LoadedModel, options: AuditOptions, base_macs: int):
        self.loaded, self.options, self.base_macs = loaded, options, base_macs
        self.base_params = _params(loaded.module)
        self.tried = 0
        self.failed: list[str] = []
        self.cache: dict[tuple, ArchitectureEdit | None] = {}
        self.deadline = math.inf
        self.skipped = 0  # edits not tried: the time budget was spent

    def run(self, node: str, path: str, attribute: str, old: list[int], new: list[int], text: str) -> ArchitectureEdit | None:
        key = (path, attribute, tuple(new))
        if key in self.cache:
            return self.cache[key]
        if time.perf_counter() > self.deadline:
            self.skipped += 1
            return None
        shape = tuple(self.loaded.input_shape or ())
        draft = ArchitectureEdit(path, node, attribute, old, new, ModelStatus.UNKNOWN, None, 0, 0.0, 0, text)
        result: ArchitectureEdit | None = None
        try:
            module = apply_edit(self.loaded.module, draft, shape, self.options.seed)
            report, m = _audit(module, self.loaded, self.options)
            self.tried += 1
            old_layer = _params(self.loaded.module.get_submodule(path))
            new_layer = _params(module.get_submodule(path))
            result = ArchitectureEdit(
                path, node, attribute, old, new, report.verdict.status, report.verdict.input_deficit,
                self.base_params - _params(module), 100.0 * (old_layer - new_layer) / old_layer if old_layer else 0.0,
                self.base_macs - m, text,
            )
        except (AuditError, ValueError, RuntimeError, TypeError) as exc:
            self.failed.append(f"{text}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        self.cache[key] = result
        return result


def _works(e: ArchitectureEdit | None) -> bool:
    return e is not None and e.status.input_recoverable is False


def _widths(search: _Search, node: str, path: str, attr: str, old: int) -> list[ArchitectureEdit]:
    """The largest width below `old` that works: halve until one works, then bisect between (a few steps)."""
    run: Callable[[int], ArchitectureEdit | None] = lambda w: search.run(node, path, attr, [old], [w], f"{path}: {attr} {old} -> {w}")
    hi_bad, lo_good, found = old, None, None
    w = old // 2
    while w >= 1:
        e = run(w)
        if _works(e):
            lo_good, found = w, e
            break
        hi_bad, w = w, w // 2
    if lo_good is None:
        return []
    for _ in range(BISECT_STEPS):
        mid = (lo_good + hi_bad) // 2
        if mid <= lo_good:
            break
        e = run(mid)
        if _works(e):
            lo_good, found = mid, e
        else:
            hi_bad = mid
    return [found] if found is not None else []


def architecture_defence(
    loaded: LoadedModel, options: AuditOptions, graph: Any, specs: dict[str, Any], budget_s: float = BUDGET_S
) -> ArchitectureDefence:
    """Search single edits of every editable weighted layer of the audited graph, input first, within budget_s."""
    t0 = time.perf_counter()
    report_macs = sum(int(s.weight.numel()) * math.prod(getattr(s, "out_spatial", ())) for s in specs.values()
                      if getattr(s, "weight", None) is not None)
    search = _Search(loaded, options, report_macs)
    search.deadline = t0 + budget_s
    found: list[ArchitectureEdit] = []
    for node in reversed(graph.weighted()):
        path = graph.node(node).module_path
        if path is None:
            continue
        try:
            module = loaded.module.get_submodule(path)
        except AttributeError:
            continue
        entry = editable(module)
        if entry is None:
            continue
        args = entry.arguments(module)
        width = int(args[entry.width])
        if args.get("groups", 1) == 1 and width > 1:
            found += _widths(search, node, path, entry.width, width)
        if entry.spatial:
            stride = [int(s) for s in args["stride"]]
            e = search.run(node, path, STRIDE, stride, [s + 1 for s in stride], f"{path}: stride {tuple(stride)} -> {tuple(s + 1 for s in stride)}")
            found += [e] if e is not None and _works(e) else []
            kernel = [int(k) for k in args["kernel_size"]]
            if all(k > 1 for k in kernel):
                e = search.run(node, path, KERNEL, kernel, [k - 1 for k in kernel], f"{path}: kernel {tuple(kernel)} -> {tuple(k - 1 for k in kernel)}")
                found += [e] if e is not None and _works(e) else []
            e = search.run(node, path, POOL, [], [2] * entry.spatial, f"{path}: average pool of kernel 2 inserted after it")
            found += [e] if e is not None and _works(e) else []
    found.sort(key=lambda e: (e.params_lost, e.macs_lost))
    best = found[0] if found else None
    if best is None:
        summary = f"no single edit of the {search.tried} tried makes the input not recoverable"
    else:
        summary = (
            f"{best.text} makes the input not recoverable ({best.status.value}, {best.input_deficit} input directions undetermined), "
            f"at a cost of {best.params_lost_layer_pct:.0f} % of that layer's parameters ({best.params_lost} in the model, "
            f"{best.macs_lost} multiply-adds per sample); {len(found)} of {search.tried} edits tried work"
        )
    if search.skipped:
        summary += f"; {search.skipped} further edits not tried within the {budget_s:g} s budget"
    return ArchitectureDefence(search.tried, search.skipped, found[:SHOW], best, search.failed, time.perf_counter() - t0, summary)
