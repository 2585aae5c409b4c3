"""Cut tensors and joint segments of the layer graph: where the layer-by-layer walk must rank several
layers together.

A cut is a node whose output every path from the model input to the output passes through: the
dominators of the output node, seen from the input (in a chain every node is one; in a ResNet the
block boundaries; in a transformer the residual stream between blocks). Between two consecutive cuts
`a` and `b` lies a segment: the nodes reachable from `a` that reach `b`, `b` included. Where that
subgraph is a simple path, the walk's links already carry the constraints through it. Where it
branches (a residual block, an inception-like concatenation, attention's shared input), the layers in
it are ranked together as one system over the value of `a`: a **joint segment**. Consecutive
branching segments stay separate (each has its own cut input), so the walk still goes from cut to cut.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import networkx as nx

from rgap_audit import ops
from rgap_audit.layergraph import LayerGraph


@dataclass(frozen=True)
class Segment:
    """A branching subgraph between two cuts, ranked as one system over the value of `start`.

    start: the cut whose value is the segment's unknown; end: the cut whose value leaves it;
    nodes: the segment's nodes after `start` in data-flow order (`end` last); layers: its weighted
    layers in the walk's order (output first).
    """

    name: str
    start: str
    end: str
    nodes: tuple[str, ...]
    layers: tuple[str, ...]


def cut_chain(lg: LayerGraph) -> list[str]:
    """The cuts from the model input to the output node (both included), in data-flow order."""
    idom = nx.immediate_dominators(lg.graph, lg.input_node)
    if lg.output_node not in idom:  # the output does not depend on the input
        return [lg.input_node, lg.output_node]
    chain = [lg.output_node]
    while chain[-1] != lg.input_node:
        chain.append(idom[chain[-1]])
    return chain[::-1]


def _is_path(lg: LayerGraph, start: str, inner: set[str]) -> bool:
    """Whether start -> inner is a simple path: one successor each, one data input each, inside the set."""
    members = inner | {start}
    for n in members:
        succ = [s for s in lg.graph.successors(n) if s in inner]
        if n != start and lg.graph.in_degree(n) != 1:
            return False
        if len(succ) > 1:
            return False
    return True


def joint_segments(lg: LayerGraph) -> list[Segment]:
    """The branching segments between consecutive cuts, from the output down (the walk's order)."""
    cuts = cut_chain(lg)
    order = {n: i for i, n in enumerate(nx.topological_sort(lg.graph))}
    walk_rank = {n: i for i, n in enumerate(lg.weighted())}
    out: list[Segment] = []
    for a, b in itertools.pairwise(cuts):
        inner = (nx.descendants(lg.graph, a) & nx.ancestors(lg.graph, b)) | {b}
        if b == lg.output_node:
            inner.discard(b)
            if not inner:
                continue
            b = max(inner, key=order.__getitem__)  # the node feeding the output
        if _is_path(lg, a, inner):
            continue
        nodes = tuple(sorted(inner, key=order.__getitem__))
        layers = tuple(sorted((n for n in nodes if lg.node(n).info.kind == ops.LAYER), key=walk_rank.__getitem__))
        out.append(Segment(f"{a}->{b}", a, b, nodes, layers))
    return out[::-1]


def common_module_path(lg: LayerGraph, seg: Segment) -> str:
    """The longest dotted module path shared by the segment's weighted layers ('' when none): its name in a report."""
    paths = [p for p in (lg.node(n).module_path for n in seg.layers) if p]
    if not paths:
        return ""
    out: list[str] = []
    for group in zip(*(p.split(".") for p in paths)):
        if any(g != group[0] for g in group):
            break
        out.append(group[0])
    return ".".join(out)
