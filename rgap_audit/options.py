"""What flows between the stages: a loaded model and the options of one audit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rgap_audit.records import Location


@dataclass(frozen=True)
class ForwardCall:
    """How the audit calls `forward` (declared in RGAP_MODELS or [tool.rgap-audit.models.NAME]).

    The audit's instance is one batch-first tensor, the private input; `forward` may take more
    arguments (an RNN's hidden state) and return more than the logits (a tuple, list, dict or
    dataclass). rgap_audit.forwardcall turns this into a one-argument, one-tensor forward.
    """

    # (model) or (model, batch_size) -> the positional arguments of forward (a tuple; one tensor alone is fine)
    example_inputs: Callable[..., Any] | None = None
    private_input: int | str = 0  # which argument of forward is the private input: position or parameter name
    batch_dim: int = 0  # where that argument's batch dimension is (1 for sequence-first models)
    output: int | str | None = None  # which output the loss sees: index, key or attribute; None: the first tensor

    @property
    def declared(self) -> bool:
        return self.example_inputs is not None or self.private_input != 0 or self.batch_dim != 0 or self.output is not None


@dataclass
class LoadedModel:
    """A model constructed from a user's file, ready to trace. Produced by rgap_audit.loader."""

    file: str
    name: str
    module: torch.nn.Module
    input_shape: tuple[int, ...] | None = None  # one sample, no batch dimension
    loss: str | None = None  # one of LOSSES, None = choose from the output size
    batch_size: int | None = None  # declared in the file, else options / 1
    location: Location | None = None  # where the model is defined (class or factory line)
    layer_locations: dict[str, Location] = field(default_factory=dict)  # module path -> constructor line
    call: ForwardCall = field(default_factory=ForwardCall)  # forward's arguments and which output is audited


@dataclass
class AuditOptions:
    """Knobs of one audit; command-line flags and [tool.rgap-audit] end up here."""

    batch_size: int | None = None  # None: the model's declaration, else 1
    loss: str | None = None
    seed: int = 0
    input_shape: tuple[int, ...] | None = None  # overrides the model's declaration
    memory_budget_mb: float = 4096.0  # refuse models whose instance would need more
    exact_rank_limit: int = 40_000_000  # largest reduced system (rows x cols) ranked exactly; above: bounds
    debug: bool = False  # --debug: let unexpected exceptions propagate (tracebacks) instead of recording them
