"""The layer graph: a networkx DiGraph of the traced operations that carry data.

Nodes are keyed by torch.fx node name (unique even when one module object is called at several
places). Each node holds the fx node, its op-table entry, the module (if any), its dotted module
path and its input/output shapes. Edges follow the data flow from the input to the output.
Shape-only nodes (``x.size(0)``, ``x.shape``) and parameter fetches are not data and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from rgap_audit.convspec import ConvSpec
from rgap_audit.ops import INPUT, LAYER, OUTPUT, OpInfo, lookup


def _tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and meta and isinstance(meta[0], TensorMetadata):
        meta = meta[0]  # an op returning several tensors (MultiheadAttention): keep it, shaped by the first
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    return None


def _resolve(gm: fx.GraphModule, value):
    """Replace get_attr nodes in call arguments by the tensors they fetch."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        obj = gm
        for part in str(value.target).split("."):
            obj = getattr(obj, part)
        return obj
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(gm, v) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(gm, v) for k, v in value.items()}
    return value


@dataclass
class LayerGraph:
    """The traced model as a graph of data-carrying operations."""

    gm: fx.GraphModule
    graph: nx.DiGraph
    input_node: str
    output_node: str

    def node(self, name: str) -> dict:
        return self.graph.nodes[name]

    def ops(self) -> list[str]:
        """Operation nodes (not the placeholder/output), from the output down to the input."""
        order = list(nx.topological_sort(self.graph))
        return [n for n in reversed(order) if self.graph.nodes[n]["fx"].op not in ("placeholder", "output")]

    def weighted(self) -> list[str]:
        """Weighted layers, output first: the order R-GAP solves them."""
        return [n for n in self.ops() if self.graph.nodes[n]["info"].kind == LAYER]

    def is_chain(self) -> bool:
        """True when every node has at most one data input and one data consumer."""
        return all(self.graph.in_degree(n) <= 1 and self.graph.out_degree(n) <= 1 for n in self.graph)

    def data_args(self, name: str) -> list[str]:
        """Names of the data-carrying inputs of a node, in argument order."""
        return [a.name for a in self.graph.nodes[name]["fx"].all_input_nodes if a.name in self.graph]

    def conv_spec(self, name: str) -> ConvSpec:
        """Normalised weighted-layer description; the input shape is one sample's (batch dim dropped)."""
        attrs = self.graph.nodes[name]
        info: OpInfo = attrs["info"]
        assert info.conv_spec is not None, f"{name} is not a weighted layer"
        fxn: fx.Node = attrs["fx"]
        args = _resolve(self.gm, fxn.args)
        kwargs = _resolve(self.gm, dict(fxn.kwargs))
        return info.conv_spec(attrs["module"], args, kwargs, tuple(attrs["in_shape"][1:]))


def build_layer_graph(gm: fx.GraphModule) -> LayerGraph:
    """Turn a shape-annotated GraphModule into a LayerGraph."""
    g = nx.DiGraph()
    modules = dict(gm.named_modules())
    input_node = output_node = None
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "output":
            output_node = node.name
            srcs = [a for a in node.all_input_nodes if a.name in g]
            shape = g.nodes[srcs[0].name]["out_shape"] if srcs else None
            g.add_node(node.name, fx=node, info=OUTPUT, module=None, module_path=None, in_shape=shape, out_shape=shape)
            for a in srcs:
                g.add_edge(a.name, node.name)
            continue
        out_shape = _tensor_shape(node)
        if out_shape is None:  # shape arithmetic, not data
            continue
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if node.op == "placeholder":
            if input_node is None:
                input_node = node.name
            info = INPUT
        elif node.op == "call_module":
            info = lookup(None, module)
        else:  # call_function / call_method
            info = lookup(node.target)
        data_inputs = [a for a in node.all_input_nodes if a.name in g]
        in_shape = g.nodes[data_inputs[0].name]["out_shape"] if data_inputs else out_shape
        g.add_node(
            node.name,
            fx=node,
            info=info,
            module=module,
            module_path=str(node.target) if node.op == "call_module" else None,
            in_shape=in_shape,
            out_shape=out_shape,
        )
        for a in data_inputs:
            g.add_edge(a.name, node.name)
    if input_node is None or output_node is None:
        raise ValueError("traced graph has no tensor input or no output")
    return LayerGraph(gm=gm, graph=g, input_node=input_node, output_node=output_node)


def record_instance(
    lg: LayerGraph, x: torch.Tensor, loss_fn, env: dict[str, object] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the model on x and backpropagate loss_fn(output); return node outputs and dL/d(output) per node.

    These are the real values of one client instance: forward values z, activation patterns and
    output gradients k = dL/dz from autograd, keyed by node name. `env`, if given, also receives
    every fx node's value (shape arithmetic included, tensors detached) from the same forward pass.
    """
    values: dict[str, torch.Tensor] = {}
    keep = set(lg.graph.nodes)

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if env is not None:
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
    out = _Recorder(lg.gm).run(x)
    loss = loss_fn(out)
    loss.backward()
    grads = {}
    for name, v in values.items():
        g = x.grad if name == lg.input_node else v.grad
        grads[name] = torch.zeros_like(v) if g is None else g.detach()
    return {k: v.detach() for k, v in values.items()}, grads
