"""What the walk has learnt so far, node by node: read by the forward rows, the bounds and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rgap_audit.links import Link
from rgap_audit.rank import ForwardInfo, LayerRank


@dataclass
class LayerSystem:
    """The system the audit ranked for one weighted layer: what the attack solves for that layer.

    spec: the normalised layer; k: dL/dz on the instance, (samples, *out_shape); forward: what is known
    of z (ForwardInfo: the Jacobian of the link above, the directions left undetermined above); known:
    input entries known to the attacker (a ReLU's zeros), or None; result: its rank, deficit, null basis.
    """

    node: str
    spec: object
    k: torch.Tensor
    forward: ForwardInfo
    known: torch.Tensor | None
    result: LayerRank


@dataclass
class WalkState:
    """Per node, what the attacker knows once the walk has passed it."""

    # weighted layer -> undetermined directions of its input (orthonormal basis), None when not kept
    nulls: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # weighted layer -> (lower, upper) number of undetermined directions of its input when no basis is kept
    carried: dict[str, tuple[int, int]] = field(default_factory=dict)
    # the unknowns those directions lie among (the unit's input entries less its known constants)
    carried_among: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # weighted layers that could not be normalised
    above: dict[str, Link] = field(default_factory=dict)  # weighted layer -> the link up from its output
    below: dict[str, Link] = field(default_factory=dict)  # weighted layer -> the link from the layer below
    k_known: dict[str, bool] = field(default_factory=dict)  # dL/d(output) derivable by the attacker
    val_known: dict[str, bool] = field(default_factory=dict)  # the output value recovered by the attacker
    systems: dict[str, LayerSystem] = field(default_factory=dict)
    stops: dict[str, str] = field(default_factory=dict)  # joint segment input cut -> segment name (links end there)
    unit_size: dict[str, int] = field(default_factory=dict)  # joint segment -> entries of its input value
    warnings: list[str] = field(default_factory=list)
