"""Trace a model into a torch.fx GraphModule and annotate every node with its shape (ShapeProp).

torch.fx cannot trace every model, so tracing tries, in order:

1. ``torch.fx`` symbolic tracing;
2. ``fx-leaf-modules``: the same, keeping every submodule whose own forward cannot be traced as one
   opaque node (it then shows up as a not-understood op unless the op table knows its class);
3. ``fx-concrete-args``: flag arguments of ``forward`` with non-tensor defaults fixed to them
   (``if self.training_flag`` / ``if return_features``), with leaf modules as in 2;
4. ``torch.export`` (non-strict), which specialises shape branches; its aten graph is turned back
   into module calls where a registered leaf module produced a single op, so reports keep module
   paths.

Each attempt must also pass ShapeProp. When all fail, the AuditError lists every attempt's reason
in one line and names the user's source line. The GraphModule records what happened in
``gm.meta["rgap_trace"]`` (method, leaf modules, concrete args, the failed attempts) and the
module-state warnings of `ops.check_model` in ``gm.meta["rgap_warnings"]``.

Calls whose result never reaches the output (a tuple's other outputs, shapes kept for logging) are
removed, in-place calls excepted: they change neither the loss nor a gradient.

After tracing, call sites whose meaning depends on their operands (the op table's `rewrite` families)
are rewritten to the functions of `rgap_audit.ops.wrappers` (``x @ W`` with a Parameter W ->
`linear_matmul`, ``x + c`` with c not depending on the input -> `shift_add`, ...); the wrappers
compute exactly what the original call did. Positional arguments an inverse reads (the op table's
`kwarg_names`: ``F.leaky_relu(x, 0.2)``) are moved to keyword arguments. Every node gets ``node.meta["rgap_data"]``: whether it depends on the
model input (False for parameters and arithmetic on them).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import re
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from rgap_audit import ops
from rgap_audit.errors import AuditError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OUR_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_DIR = os.path.dirname(os.__file__)


# ----------------------------------------------------------------------------- error text
def _user_frame(exc: BaseException, file: str | None) -> tuple[str, int] | None:
    """The innermost traceback frame in the audited file, else in any user code (not torch, not us)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if file:
        hit = [f for f in frames if f.filename == file]
        if hit:
            return hit[-1].filename, hit[-1].lineno or 0
    for f in reversed(frames):
        name = os.path.abspath(f.filename) if not f.filename.startswith("<") else f.filename
        if name.startswith((_TORCH_DIR, _OUR_DIR, _STDLIB_DIR)) or "site-packages" in name:
            continue
        return f.filename, f.lineno or 0
    # torch.export names the user frame only in its message
    m = re.search(r'File "([^"]+)", line (\d+), in \w+', str(exc))
    if m and not m.group(1).startswith(_TORCH_DIR):
        return m.group(1), int(m.group(2))
    return None


def _user_line(exc: BaseException, file: str | None) -> int | None:
    """Innermost traceback line inside the audited file, if any."""
    fr = _user_frame(exc, file)
    return fr[1] if fr is not None and file and fr[0] == file else None


class ShapeProp(fx.Interpreter):
    """torch.fx's ShapeProp (node.meta["tensor_meta"] and ["type"] from one run) without its fake-tensor
    mode, which rgap-audit never uses: torch's run_node imports torch.fx.experimental.symbolic_shapes
    and sympy on its first call (about half a second of every audit). Errors read as torch's do."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            traceback.print_exc()
            raise RuntimeError(f"ShapeProp error for: node={n.format_node()} with meta={n.meta}") from e
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj, include_contiguity=False)  # memory formats: never read here
            return obj

        tensor_meta = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        n.meta["type"] = type(result)
        return result

    def propagate(self, *args: Any) -> Any:
        """Run the module on `args`, recording every node's shape and type."""
        return super().run(*args)


def _cause(exc: BaseException) -> str:
    """A one-line, human cause for a tracing exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if "symbolically traced variables cannot be used as inputs to control flow" in text:
        return "forward has control flow on a tensor value or shape (an `if`/`while`), which torch.fx cannot trace"
    if "GuardOnDataDependent" in name or "data-dependent" in text:
        return "forward branches on a tensor value (data-dependent control flow)"
    if "Proxy object cannot be iterated" in text or "cannot be iterated" in text:
        return "forward iterates over a traced tensor, which torch.fx cannot trace"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    first = " ".join(first.split())
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{name}: {first}"


def _where(exc: BaseException, file: str | None) -> str:
    fr = _user_frame(exc, file)
    return f" (at {fr[0]}:{fr[1]})" if fr is not None else ""


class _Skip(Exception):
    """An attempt that does not apply to this model (the reason is reported as is)."""


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs and prints (to stderr) failures we report ourselves."""
    names = ["torch", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ----------------------------------------------------------------------------- the attempts
class _LeafTracer(fx.Tracer):
    """fx.Tracer that keeps the modules in `leaves` opaque and notes the innermost module that failed."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        qual = self.path_of_module(m)
        if self.is_leaf_module(m, qual):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = qual
            raise


def _trace_with_leaves(model: nn.Module, concrete: dict | None, max_leaves: int = 64) -> tuple[fx.GraphModule, list[str]]:
    """fx trace making failing submodules leaves, one at a time, until the root traces or fails itself."""
    leaves: set[str] = set()
    while True:
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(model, concrete_args=concrete)
        except Exception as exc:
            failed = tracer.failed
            if (failed is None or failed == "") and not leaves and concrete is None:
                raise _Skip("the failure is in the model's own forward, not in a submodule") from exc
            if failed is None or failed == "" or failed in leaves or len(leaves) >= max_leaves:
                raise
            leaves.add(failed)
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        return gm, sorted(leaves)


def _attempt_fx(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, dict]:
    return fx.symbolic_trace(model), {}


def _attempt_leaves(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, dict]:
    gm, leaves = _trace_with_leaves(model, None)
    return gm, {"leaf_modules": leaves}


def _flag_defaults(model: nn.Module) -> dict[str, Any]:
    """forward's arguments after the first with a non-tensor default: flags fx can fix."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    out = {}
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for p in params[1:]:
        if p.default is not inspect.Parameter.empty and not isinstance(p.default, torch.Tensor):
            out[p.name] = p.default
    return out


def _attempt_concrete(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, dict]:
    concrete = _flag_defaults(model)
    if not concrete:
        raise _Skip("forward has no flag arguments with defaults to fix")
    gm, leaves = _trace_with_leaves(model, concrete)
    return gm, {"concrete_args": {k: repr(v) for k, v in concrete.items()}, "leaf_modules": leaves}


def _module_path(entry: Any) -> str | None:
    """The dotted module path of an nn_module_stack entry (its form varies across torch versions)."""
    path = entry[0] if isinstance(entry, tuple) else entry
    if not isinstance(path, str):
        return None
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = path.replace("L__self___", "")
    return path.strip(".")


def _single_input_forward(m: nn.Module) -> bool:
    try:
        sig = inspect.signature(m.forward)
    except (TypeError, ValueError):
        return False
    required = [
        p for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) == 1


def _collapse_modules(gm: fx.GraphModule, model: nn.Module) -> int:
    """Turn aten nodes that one registered leaf module produced back into a call of that module.

    Only when the group of consecutive nodes of the module has exactly one data input, uses no other
    non-parameter nodes, has one output used outside, and the module takes one positional input: then
    call_module(path, (input,)) computes exactly what the group did. Returns how many were collapsed.
    """
    nodes = list(gm.graph.nodes)
    groups: list[tuple[str, list[fx.Node]]] = []
    for n in nodes:
        if n.op != "call_function":
            continue
        stack = n.meta.get("nn_module_stack")
        if not stack:
            continue
        path = _module_path(list(stack.values())[-1])
        if not path:
            continue
        if groups and groups[-1][0] == path and any(a in groups[-1][1] for a in n.all_input_nodes):
            groups[-1][1].append(n)
        else:
            groups.append((path, [n]))
    collapsed = 0
    for path, group in groups:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if list(mod.children()) or not ops.registered_module(mod) or not _single_input_forward(mod):
            continue
        members = set(group)
        ext = {a for n in group for a in n.all_input_nodes if a not in members}
        data_in = [a for a in ext if a.op != "get_attr"]
        if len(data_in) != 1:
            continue
        used_outside = [n for n in group if any(u not in members for u in n.users)]
        if len(used_outside) != 1 or used_outside[0] is not group[-1]:
            continue
        last = group[-1]
        gm.add_submodule(path, mod)
        with gm.graph.inserting_before(last):
            new = gm.graph.call_module(path, (data_in[0],))
        new.meta.update({k: v for k, v in last.meta.items() if k in ("nn_module_stack", "stack_trace")})
        last.replace_all_uses_with(new)
        for n in reversed(group):
            gm.graph.erase_node(n)
        collapsed += 1
    if collapsed:
        for n in list(gm.graph.nodes):
            if n.op == "get_attr" and not n.users:
                gm.graph.erase_node(n)
    return collapsed


def _attempt_export(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, dict]:
    if not hasattr(torch, "export"):
        raise _Skip("torch.export is not available in this torch")
    with _quiet_torch_logs():
        ep = torch.export.export(model, (example,), strict=False)
    gm = ep.module()
    if not isinstance(gm, fx.GraphModule):
        raise _Skip(f"torch.export gave a {type(gm).__name__}, not an fx GraphModule")
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards_fn") and not n.users:
            gm.graph.erase_node(n)
    collapsed = _collapse_modules(gm, model)
    gm.graph.lint()
    gm.recompile()
    return gm, {"collapsed_modules": collapsed}


ATTEMPTS: list[tuple[str, Callable[[nn.Module, torch.Tensor], tuple[fx.GraphModule, dict]]]] = [
    ("torch.fx", _attempt_fx),
    ("fx-leaf-modules", _attempt_leaves),
    ("fx-concrete-args", _attempt_concrete),
    ("torch.export", _attempt_export),
]


# ----------------------------------------------------------------------------- normalisation of call sites
def _hashable(t: Any) -> bool:
    try:
        hash(t)
    except TypeError:
        return False
    return True


def _entry(target: Any) -> ops.OpInfo | None:
    """The op table's entry of a call target, None for unhashable or unknown ones."""
    return ops.OPS.get(target) if _hashable(target) else None


def _family(target: Any) -> str | None:
    """The call-site family (ops.MATMUL, ADD, SUB, MUL, DIV) the op table gives this target."""
    info = _entry(target)
    return None if info is None else info.rewrite


def _fetch(gm: fx.GraphModule, node: fx.Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _trainable_param(gm: fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    p = _fetch(gm, node)
    return isinstance(p, nn.Parameter) and p.requires_grad


def _transposed_param(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The get_attr node W when `node` is W.t(), W.T or W.transpose(0, 1) / (-2, -1) of a 2-d trainable Parameter."""
    if not isinstance(node, fx.Node) or len(node.args) < 1:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or not _trainable_param(gm, src) or _fetch(gm, src).dim() != 2:
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return src
    info = _entry(node.target) if node.op in ("call_method", "call_function") else None
    if info is not None and info.transposes_matrix is not None and info.transposes_matrix(tuple(node.args[1:])):
        return src
    return None


def _nonzero_constant(gm: fx.GraphModule, v: Any) -> bool:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, fx.Node) and v.op == "get_attr":
        t = _fetch(gm, v)
        return isinstance(t, torch.Tensor) and t.is_floating_point() and bool((t != 0).all())
    return False


def _mark_data(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that depend on a tensor input of the model; recorded as node.meta['rgap_data']."""
    data: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            is_data = True
        elif n.op == "get_attr":
            is_data = False
        else:
            is_data = any(a in data for a in n.all_input_nodes)
        if is_data:
            data.add(n)
        n.meta["rgap_data"] = is_data
    return data


def _normalise(gm: fx.GraphModule) -> list[str]:
    """Rewrite call sites to the op table's wrappers; returns one line per rewrite (kept in the trace meta)."""
    data = _mark_data(gm)
    notes: list[str] = []

    def is_data(v: Any) -> bool:
        return isinstance(v, fx.Node) and v in data

    for n in list(gm.graph.nodes):
        if n.op not in ("call_function", "call_method"):
            continue
        t = n.target
        info = _entry(t)
        if n.op == "call_function" and info is not None and info.kwarg_names and len(n.args) > 1:
            names = info.kwarg_names
            extra = dict(zip(names, n.args[1:]))
            n.args = n.args[:1]
            n.kwargs = {**extra, **n.kwargs}
            continue
        if len(n.args) != 2:
            continue
        a, b = n.args
        new: tuple[Callable[..., Any], tuple[Any, Any]] | None = None
        family = _family(t)
        if family == ops.MATMUL and not n.kwargs:
            if is_data(a) and not is_data(b):
                wt = _transposed_param(gm, b)
                if _trainable_param(gm, b):
                    new = (ops.wrappers.linear_matmul, (a, b))
                elif wt is not None:
                    new = (ops.wrappers.linear_matmul_t, (a, wt))
                elif isinstance(b, fx.Node) and b.op == "get_attr":
                    new = (ops.wrappers.constant_matmul, (a, b))
                else:
                    new = (ops.wrappers.computed_matmul, (a, b))
            elif is_data(b) and not is_data(a):
                if _trainable_param(gm, a):
                    new = (ops.wrappers.param_matmul_left, (a, b))
                elif isinstance(a, fx.Node) and a.op == "get_attr":
                    new = (ops.wrappers.constant_matmul, (a, b))
                else:
                    new = (ops.wrappers.computed_matmul, (a, b))
        elif family in (ops.ADD, ops.SUB) and not n.kwargs and is_data(a) != is_data(b):
            new = (ops.wrappers.shift_add if family == ops.ADD else ops.wrappers.shift_sub, (a, b))
        elif family == ops.MUL and not n.kwargs and is_data(a) != is_data(b):
            if _nonzero_constant(gm, b if is_data(a) else a):
                new = (ops.wrappers.scale_mul, (a, b))
        elif family == ops.DIV and not n.kwargs and is_data(a) and not is_data(b) and _nonzero_constant(gm, b):
            new = (ops.wrappers.scale_div, (a, b))
        if new is None:
            continue
        fn, args = new
        with gm.graph.inserting_before(n):
            repl = gm.graph.call_function(fn, args)
        repl.meta.update(n.meta)
        if n in data:
            data.add(repl)
        n.replace_all_uses_with(repl)
        old_b, old_name = n.args[1], n.name
        gm.graph.erase_node(n)
        if isinstance(old_b, fx.Node) and not old_b.users and old_b.op in ("call_method", "call_function"):
            gm.graph.erase_node(old_b)  # the W.t() a linear_matmul_t replaced
        notes.append(f"{old_name}: {getattr(t, '__name__', t)} -> {fn.__name__}")
    gm.graph.lint()
    gm.recompile()
    _mark_data(gm)
    return notes


def _in_place(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A call that may write into its input (`x.relu_()`, `F.relu(x, inplace=True)`, `nn.ReLU(inplace=True)`)."""
    if n.kwargs.get("inplace") is True:
        return True
    if n.op == "call_method":
        return str(n.target).endswith("_")
    if n.op == "call_function":
        return getattr(n.target, "__name__", "").endswith("_") or n.is_impure()
    if n.op == "call_module":
        return bool(getattr(gm.get_submodule(str(n.target)), "inplace", False)) or n.is_impure()
    return False


def _drop_dead(gm: fx.GraphModule) -> int:
    """Remove calls whose result never reaches the output (the outputs forward computes but the loss does
    not see: a tuple's other items, shapes kept for logging, a dict's extra heads). They change neither
    the loss nor any gradient. In-place calls are kept. Returns how many nodes were removed."""
    removed = 0
    for n in reversed(list(gm.graph.nodes)):
        if n.op in ("call_function", "call_method", "call_module", "get_attr") and not n.users and not _in_place(gm, n):
            gm.graph.erase_node(n)
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


# ----------------------------------------------------------------------------- entry point
def trace(
    model: torch.nn.Module,
    example: torch.Tensor,
    *,
    file: str | None = None,
    name: str | None = None,
    adapt: Callable[[nn.Module], nn.Module] | None = None,
) -> fx.GraphModule:
    """Trace a float64 copy of `model` (see the module docstring for the fallbacks) and propagate shapes.

    The copy keeps the caller's model untouched; float64 makes ranks and reconstructions exact
    enough to compare with dense SVDs. An integer example (token ids) is kept integer. `adapt`
    (rgap_audit.forwardcall) turns the copy into the one-input, one-output forward that is traced.
    """
    warnings = [f"{path}: {msg}" for path, msg in ops.check_model(model)]
    model = copy.deepcopy(model).to(torch.float64).eval()
    decomposed = ops.attention.decompose(model)  # fused attention / encoder layers -> explicit ops
    if adapt is not None:
        model = adapt(model)
    ex = example.to(torch.float64) if example.is_floating_point() else example
    eager_checked = False

    def check_eager() -> None:
        """A forward that fails without tracing is the user's error, not a tracing problem."""
        nonlocal eager_checked
        if eager_checked:
            return
        eager_checked = True
        try:
            with torch.no_grad():
                model(ex)
        except AuditError:  # raised by the adapted forward (rgap_audit.forwardcall): already the user's cause
            raise
        except Exception as exc:
            raise AuditError(
                f"forward failed on an input of shape {tuple(example.shape)}: {_cause(exc)}{_where(exc, file)}",
                file=file,
                model=name,
                line=_user_line(exc, file),
            ) from exc

    failures: list[tuple[str, str]] = []
    first_line: int | None = None
    for method, attempt in ATTEMPTS:
        try:
            with ops.attention.math_attention():
                gm, details = attempt(model, ex)
        except _Skip as skip:
            failures.append((method, str(skip)))
            continue
        except Exception as exc:
            check_eager()
            failures.append((method, _cause(exc) + _where(exc, file)))
            first_line = first_line if first_line is not None else _user_line(exc, file)
            continue
        try:
            dead = _drop_dead(gm)
            notes = _normalise(gm)
            with torch.no_grad():
                ShapeProp(gm).propagate(ex)
        except Exception as exc:
            check_eager()
            failures.append((method, f"traced, but the traced graph failed on the input: {_cause(exc)}{_where(exc, file)}"))
            first_line = first_line if first_line is not None else _user_line(exc, file)
            continue
        gm.meta["rgap_trace"] = {
            "method": method,
            "leaf_modules": details.get("leaf_modules", []),
            "concrete_args": details.get("concrete_args", {}),
            "collapsed_modules": details.get("collapsed_modules", 0),
            "rewrites": notes,
            "decomposed": decomposed,
            "dead_nodes_removed": dead,
            "failed_attempts": [f"{m}: {why}" for m, why in failures],
        }
        gm.meta["rgap_warnings"] = warnings
        return gm
    check_eager()
    raise AuditError(
        "cannot trace the model: " + "; ".join(f"{m}: {why}" for m, why in failures),
        file=file,
        model=name,
        line=first_line,
    )


def trace_method(gm: fx.GraphModule) -> str:
    """How `gm` was traced ("torch.fx", "fx-leaf-modules", "fx-concrete-args", "torch.export"), for reports."""
    return gm.meta.get("rgap_trace", {}).get("method", "torch.fx")
