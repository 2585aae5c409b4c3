"""One seeded client instance of one model: traced once, run once, read by every later stage.

The audit, `--verify` (B = 1 and B > 1) and `--identifiability` all read the same `Instance`: the
traced GraphModule and its layer graph, the seeded input and labels, the loss, every node's value and
dL/d(value) from autograd, every fx node's value (shape arithmetic included), and the gradient the
client shares, by parameter name. Nothing after this stage traces the model again: a different input
or checkpoint re-runs the same graph (`replay`, `with_weights`), and the batch-1 view the attack needs
re-propagates shapes through it (`single_sample`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from rgap_audit import forwardcall, ops
from rgap_audit.errors import AuditError
from rgap_audit.layergraph import LayerGraph, build_layer_graph, resolve
from rgap_audit.losses import choose_loss, loss_value, make_labels
from rgap_audit.options import AuditOptions, LoadedModel
from rgap_audit.tracing import ShapeProp, trace


@dataclass
class Recorded:
    """What one forward and backward pass of the traced graph produced."""

    values: dict[str, torch.Tensor]  # data node -> its output (detached)
    grads: dict[str, torch.Tensor]  # data node -> dL/d(output); the input placeholder's is dL/dx
    env: dict[str, Any]  # every fx node -> its value (shape arithmetic included, tensors detached)
    param_grads: dict[str, torch.Tensor]  # trainable parameter name -> dL/dparam: what the client shares


@dataclass
class Instance:
    """A model traced once, with one client's input, labels and every value and gradient of that run."""

    loaded: LoadedModel
    graph: LayerGraph
    input_shape: tuple[int, ...]  # one sample
    batch: int
    loss: str
    seed: int
    x: torch.Tensor  # (batch, *input_shape): float64, or integer token ids
    labels: torch.Tensor
    values: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    env: dict[str, Any]
    param_grads: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)  # what tracing had to say (module-state warnings, fallbacks)
    timings: dict[str, float] = field(default_factory=dict)
    output: str | None = None  # which of forward's outputs the loss sees, when forward returns several
    private_input: str | None = None  # which of forward's arguments is the input, when it takes several

    @property
    def rows(self) -> int:
        """Labelled rows of the output: the batch, or one per position (a language model's (T*B, V) logits)."""
        shape = self.graph.node(self.graph.output_node).out_shape or (self.batch,)
        return int(shape[0])

    @property
    def gm(self) -> fx.GraphModule:
        return self.graph.gm

    @property
    def out_features(self) -> int:
        shape = self.graph.node(self.graph.output_node).out_shape or ()
        return ops.numel(shape[1:])

    def loss_fn(self, labels: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        lab = self.labels if labels is None else labels
        return lambda out: loss_value(self.loss, out, lab)

    # ------------------------------------------------------------------ other runs of the same graph
    def replay(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Instance:
        """The same graph on another input (same batch size) and labels."""
        lab = self.labels if labels is None else labels
        rec = record(self.graph, x, lambda out: loss_value(self.loss, out, lab))
        return replace(self, x=x, labels=lab, values=rec.values, grads=rec.grads, env=rec.env, param_grads=rec.param_grads)

    def with_weights(self, state: Mapping[str, torch.Tensor]) -> Instance:
        """The same graph with other weights (a checkpoint already matched against the user's model)."""
        gm = copy.deepcopy(self.gm)
        own: dict[str, torch.Tensor] = dict(gm.named_parameters())
        own.update(dict(gm.named_buffers()))
        missing = [k for k in own if k not in state]
        if missing:
            raise AuditError(
                f"--weights: the traced model holds {len(missing)} tensors the checkpoint lacks ({', '.join(missing[:3])})",
                self.loaded.file, self.loaded.name,
            )
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(state[k].to(t.dtype))
        graph = build_layer_graph(gm)
        rec = record(graph, self.x, self.loss_fn())
        return replace(self, graph=graph, values=rec.values, grads=rec.grads, env=rec.env, param_grads=rec.param_grads)

    def single_sample(self) -> LayerGraph:
        """The layer graph at batch 1 (shapes re-propagated through the same graph), for an attack that
        reconstructs one input. Raises AuditError when the traced graph is specialised to its batch size."""
        if self.batch == 1:
            return self.graph
        gm = copy.deepcopy(self.gm)
        x1 = self.x[:1]
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(x1.to(torch.float64) if x1.is_floating_point() else x1)
        except Exception as exc:
            raise AuditError(
                f"the traced graph does not run on one sample ({type(exc).__name__}): it is specialised to batch {self.batch}",
                self.loaded.file, self.loaded.name,
            ) from exc
        return build_layer_graph(gm)


def record(
    graph: LayerGraph, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor] | None
) -> Recorded:
    """Run the graph on x and backpropagate loss_fn(output): node values, dL/d(output) per node, every
    fx node's value and the parameter gradients, from one forward and one backward pass. Without a
    loss (values only) there is no backward pass and the gradients are empty."""
    values: dict[str, torch.Tensor] = {}
    env: dict[str, Any] = {}
    keep = set(graph.graph.nodes)

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            env[n.name] = out.detach() if isinstance(out, torch.Tensor) else out
            if n.name in keep and isinstance(out, torch.Tensor) and n.op != "output":
                if out.requires_grad:
                    out.retain_grad()
                values[n.name] = out
            return out

    if x.is_floating_point():
        x = x.detach().to(torch.float64).requires_grad_(True)
    else:  # token ids: no gradient with respect to the input itself
        x = x.detach()
    params = [(n, p) for n, p in graph.gm.named_parameters() if p.requires_grad]
    for _, p in params:
        p.grad = None
    if loss_fn is None:
        with torch.no_grad():
            _Recorder(graph.gm).run(x.detach())
        return Recorded({k: v.detach() for k, v in values.items()}, {}, env, {})
    out = _Recorder(graph.gm).run(x)
    loss_fn(out).backward()
    grads = {}
    for name, v in values.items():
        g = x.grad if name == graph.input_node else v.grad
        grads[name] = torch.zeros_like(v) if g is None else g.detach()
    param_grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in params}
    for _, p in params:
        p.grad = None
    return Recorded({k: v.detach() for k, v in values.items()}, grads, env, param_grads)


def seeded_input(
    loaded: LoadedModel, shape: tuple[int, ...], batch: int, gen: torch.Generator, like: torch.Tensor | None = None
) -> torch.Tensor:
    """The instance's input: uniform [0, 1) in float64, or token ids below every embedding's vocabulary.

    `like` is the private argument of the declared example_inputs: its dtype decides between the two
    (integer ids without an embedding stay below the example's largest id + 1)."""
    vocabularies = [info.tokens(m) for m in loaded.module.modules() if (info := ops.lookup(None, m)).tokens is not None]
    integer = like is not None and not like.is_floating_point() and like.dtype != torch.bool
    if vocabularies and (like is None or integer):
        return torch.randint(0, min(vocabularies), (batch, *shape), generator=gen)
    if integer:
        assert like is not None
        high = max(2, int(like.max()) + 1) if like.numel() else 2
        return torch.randint(0, high, (batch, *shape), generator=gen, dtype=like.dtype)
    return torch.rand((batch, *shape), generator=gen, dtype=torch.float64)


def _arguments(loaded: LoadedModel, batch: int, seed: int) -> tuple[list[Any] | None, int, str | None]:
    """forward's example arguments (None: the private input alone), the private one's position, and
    how the report describes the call; an AuditError when forward needs arguments nobody declared.
    example_inputs runs under torch.manual_seed(seed): a random initial state is the same every run."""
    call = loaded.call
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        example = forwardcall.example_args(loaded, batch)
    if example is None:
        why = forwardcall.arity_error(loaded.module, call)
        if why is not None:
            raise AuditError(why, loaded.file, loaded.name, loaded.location.line if loaded.location else None)
        return None, 0, (f"batch dimension {call.batch_dim}" if call.batch_dim else None)
    args, index = example
    names = [p.name for p in forwardcall.positional_params(loaded.module)]
    name = f" ({names[index]})" if index < len(names) else ""
    text = f"argument {index}{name} of {len(args)}; the others held at their example_inputs values"
    if call.batch_dim:
        text += f"; batch dimension {call.batch_dim}"
    return args, index, text


def _fold_log_softmax(graph: LayerGraph, loss: str) -> tuple[LayerGraph, str | None]:
    """A log-softmax over the classes right before a cross-entropy loss is folded into the loss.

    CE(log_softmax(z), y) = CE(z, y) exactly (log_softmax is idempotent), which is also the NLL loss a
    log-softmax head trains with: the audit then sees the logits z, and every gradient is unchanged.
    """
    srcs = graph.data_args(graph.output_node)
    if loss != "cross-entropy" or len(srcs) != 1:
        return graph, None
    gn = graph.node(srcs[0])
    rule = gn.info.folds_into_cross_entropy
    ins = graph.data_args(gn.name)
    if rule is None or len(ins) != 1 or graph.graph.out_degree(gn.name) != 1 or gn.out_shape is None:
        return graph, None
    gm = graph.gm
    if not rule(gn.module, tuple(resolve(gm, gn.fx.args)), resolve(gm, dict(gn.fx.kwargs)), gn.out_shape):
        return graph, None
    source = graph.node(ins[0]).fx
    for user in list(gn.fx.users):
        user.replace_input_with(gn.fx, source)
    gm.graph.erase_node(gn.fx)
    gm.graph.lint()
    gm.recompile()
    note = (
        f"the output's {gn.info.name} ({gn.name}) is folded into the cross-entropy loss: CE(log_softmax(z)) = CE(z) "
        "(the NLL loss such a head trains with), so the audit sees the logits z; the gradients are unchanged"
    )
    return build_layer_graph(gm), note


def build_instance(loaded: LoadedModel, options: AuditOptions, gradients: bool = True) -> Instance:
    """Trace the model once and run the seeded client instance: input, labels, values, gradients.

    The input is drawn first from a generator seeded with `options.seed`, then the labels from the
    same generator, so `--verify` and `--identifiability` see the instance the audit ranked. Without
    `gradients` only the forward pass runs (values and constants; no dL/d anything).
    """
    t0 = time.perf_counter()
    batch = int(options.batch_size or loaded.batch_size or 1)
    if batch < 1:
        raise AuditError(f"batch size must be >= 1, got {batch}", loaded.file, loaded.name)
    call = loaded.call
    fixed, index, private = _arguments(loaded, batch, options.seed)
    shape = options.input_shape or loaded.input_shape
    if shape is None and fixed is not None:
        shape = forwardcall.sample_shape(fixed[index], call.batch_dim)
    if shape is None:
        raise AuditError("input shape unknown: declare it in RGAP_MODELS or pass --input-shape", loaded.file, loaded.name)
    shape = tuple(int(s) for s in shape)
    if call.batch_dim > len(shape):
        raise AuditError(f"batch_dim {call.batch_dim}: the input has {len(shape) + 1} dimensions with the batch", loaded.file, loaded.name)
    gen = torch.Generator().manual_seed(options.seed)
    x = seeded_input(loaded, shape, batch, gen, None if fixed is None else fixed[index])
    called: dict[str, Any] = {}
    gm = trace(
        loaded.module, x, file=loaded.file, name=loaded.name,
        adapt=lambda m: forwardcall.adapt(m, call, fixed, index, x.dim(), called),
    )
    t_trace = time.perf_counter()
    graph = build_layer_graph(gm)
    output = called.get("output")
    out_shape = graph.node(graph.output_node).out_shape
    if out_shape is None:
        which = f"the output it audits ({output})" if output else "forward's output"
        raise AuditError(
            f"{which} is not a tensor: name the logits with output = INDEX or KEY in RGAP_MODELS or [tool.rgap-audit.models.{loaded.name}]",
            loaded.file, loaded.name,
        )
    out_features = math.prod(out_shape[1:])
    try:
        loss = choose_loss(options.loss or loaded.loss, out_features)
    except ValueError as exc:
        raise AuditError(str(exc), loaded.file, loaded.name) from exc
    graph, folded = _fold_log_softmax(graph, loss)
    labels = make_labels(loss, int(out_shape[0]), out_features, gen)
    rec = record(graph, x, (lambda out: loss_value(loss, out, labels)) if gradients else None)
    notes = list(gm.meta.get("rgap_warnings", []))
    method = gm.meta.get("rgap_trace", {}).get("method")
    if method and method != "torch.fx":
        notes.append(f"traced with the fallback '{method}' (plain torch.fx failed)")
    if output:
        notes.append(f"forward returns several outputs: the loss sees {output}")
    if folded:
        notes.append(folded)
    t_end = time.perf_counter()
    return Instance(
        loaded=loaded,
        graph=graph,
        input_shape=shape,
        batch=batch,
        loss=loss,
        seed=options.seed,
        x=x,
        labels=labels,
        values=rec.values,
        grads=rec.grads,
        env=rec.env,
        param_grads=rec.param_grads,
        notes=notes,
        timings={"trace_s": t_trace - t0, "instance_s": t_end - t_trace},
        output=output,
        private_input=private,
    )


def bare_instance(model: torch.nn.Module, input_shape: tuple[int, ...], name: str | None = None) -> Instance:
    """An instance of a model object given directly (the Python API), at batch 1 with the loss chosen
    from the output size. Used by `rgap_audit.attack.reconstruct`, whose gradients come from the caller:
    only the traced graph, its shapes and the constants of the run matter there."""
    loaded = LoadedModel(file="<api>", name=name or type(model).__name__, module=model, input_shape=tuple(input_shape))
    return build_instance(loaded, AuditOptions(), gradients=False)
