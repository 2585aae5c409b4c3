"""What flows between the stages: a loaded model and the options of one audit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rgap_audit.records import Location


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
