"""The layer graph: a networkx DiGraph of the traced operations that carry data.

Nodes are keyed by torch.fx node name (unique even when one module object is called at several
places); each holds a `GraphNode` (the fx node, its op-table entry, the module if any, its dotted
module path and its input/output shapes). Edges follow the data flow from the input to the output.
Shape-only nodes (``x.size(0)``, ``x.shape``) and parameter fetches are not data and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from rgap_audit.convspec import ConvSpec
from rgap_audit.convtranspose import ConvTransposeSpec
from rgap_audit.ops import INPUT, LAYER, OUTPUT, OpInfo, lookup


@dataclass
class GraphNode:
    """One data-carrying operation of the traced model."""

    name: str  # the fx node name
    fx: fx.Node
    info: OpInfo  # its op-table entry (refined for its module)
    module: nn.Module | None  # the called module, None for functions and methods
    module_path: str | None  # dotted path of the module in the model
    in_shape: tuple[int, ...] | None  # shape of its first data input (whole batch)
    out_shape: tuple[int, ...] | None  # shape of its output (whole batch); None for a non-tensor output


def _tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and meta and isinstance(meta[0], TensorMetadata):
        meta = meta[0]  # an op returning several tensors (MultiheadAttention): keep it, shaped by the first
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    return None


def _several(node: fx.Node) -> bool:
    """Whether the node returns several tensors (a tuple of TensorMetadata, e.g. an RNN's (output, hidden))."""
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)


def resolve(gm: fx.GraphModule, value: Any) -> Any:
    """Replace get_attr nodes in call arguments by the tensors they fetch."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        obj: Any = gm
        for part in str(value.target).split("."):
            obj = getattr(obj, part)
        return obj
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(gm, v) for v in value)
    if isinstance(value, dict):
        return {k: resolve(gm, v) for k, v in value.items()}
    return value


@dataclass
class LayerGraph:
    """The traced model as a graph of data-carrying operations."""

    gm: fx.GraphModule
    graph: nx.DiGraph
    input_node: str
    output_node: str

    def node(self, name: str) -> GraphNode:
        return self.graph.nodes[name]["node"]

    def ops(self) -> list[str]:
        """Operation nodes (not the placeholder/output), from the output down to the input."""
        order = list(nx.topological_sort(self.graph))
        return [n for n in reversed(order) if self.node(n).fx.op not in ("placeholder", "output")]

    def weighted(self) -> list[str]:
        """Weighted layers, output first: the order R-GAP solves them."""
        return [n for n in self.ops() if self.node(n).info.kind == LAYER]

    def consumers(self, name: str) -> list[str]:
        return list(self.graph.successors(name))

    def is_chain(self) -> bool:
        """True when every node has at most one data input and one data consumer."""
        return all(self.graph.in_degree(n) <= 1 and self.graph.out_degree(n) <= 1 for n in self.graph)

    def data_args(self, name: str) -> list[str]:
        """Names of the data-carrying inputs of a node, in argument order."""
        return [a.name for a in self.node(name).fx.all_input_nodes if a.name in self.graph]

    def conv_spec(self, name: str) -> ConvSpec | ConvTransposeSpec:
        """Normalised weighted-layer description; the input shape is one sample's (batch dim dropped)."""
        node = self.node(name)
        assert node.info.conv_spec is not None and node.in_shape is not None, f"{name} is not a weighted layer"
        args = resolve(self.gm, node.fx.args)
        kwargs = resolve(self.gm, dict(node.fx.kwargs))
        return node.info.conv_spec(node.module, args, kwargs, tuple(node.in_shape[1:]))

    def param_names(self, name: str) -> tuple[str | None, str | None]:
        """The parameter names (as in named_parameters()) of a weighted layer's weight and bias."""
        node = self.node(name)
        if node.module is not None:
            path = node.module_path
            weight = f"{path}.weight" if getattr(node.module, "weight", None) is not None else None
            return weight, (f"{path}.bias" if getattr(node.module, "bias", None) is not None else None)
        args = list(node.fx.args) + [None] * 3
        w = node.fx.kwargs.get("weight", args[1])
        b = node.fx.kwargs.get("bias", args[2])
        wn = str(w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        bn = str(b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
        return wn, bn


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
            shape = g.nodes[srcs[0].name]["node"].out_shape if srcs else None
            g.add_node(node.name, node=GraphNode(node.name, node, OUTPUT, None, None, shape, shape))
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
        if info.on_tuple is not None and data_inputs and _several(data_inputs[0]):
            info = info.on_tuple  # (output, hidden)[0]: one output of a multi-output op, not indexing into a tensor
        in_shape = g.nodes[data_inputs[0].name]["node"].out_shape if data_inputs else out_shape
        path = str(node.target) if node.op == "call_module" else None
        g.add_node(node.name, node=GraphNode(node.name, node, info, module, path, in_shape, out_shape))
        for a in data_inputs:
            g.add_edge(a.name, node.name)
    if input_node is None or output_node is None:
        raise ValueError("traced graph has no tensor input or no output")
    return LayerGraph(gm=gm, graph=g, input_node=input_node, output_node=output_node)
