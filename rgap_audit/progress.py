"""Progress of long work (the walk over many layers, the attack, identifiability) on stderr.

The stages call `step(stage, label, done, total)`, one line per unit of work; nothing happens unless a
sink is installed with `reporting(sink)`, which the pipeline does only when stderr is a terminal and
neither PRE_COMMIT nor CI is set (`wanted`). So pre-commit, CI, pipes and the JSON on stdout never see
it. The sink lives in a context variable, so the stages take no extra argument and the walk needs one
line per layer.

`Meter` is the sink: one line rewritten in place (carriage return, erase to end of line), at most
`rate` redraws a second (a new stage and a stage's last unit always), erased when the model is done. It is ours rather than rich or tqdm: what it
draws is one status line, and the core audit takes no dependency for it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TextIO

Sink = Callable[[str, str, "int | None", "int | None"], None]
_SINK: ContextVar[Sink | None] = ContextVar("rgap_audit_progress", default=None)


def step(stage: str, label: str = "", done: int | None = None, total: int | None = None) -> None:
    """Report one unit of `stage` (e.g. "walk", "conv2", 3, 48); a no-op unless a sink is installed."""
    sink = _SINK.get()
    if sink is not None:
        sink(stage, label, done, total)


@contextlib.contextmanager
def reporting(sink: Sink | None) -> Iterator[None]:
    """Install `sink` for the work done inside (None: no progress)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def wanted(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """A person is watching: `stream` is a terminal, and this is not a pre-commit hook or a CI job."""
    env = os.environ if environ is None else environ
    if env.get("PRE_COMMIT") or env.get("CI"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Meter:
    """One status line on `stream`: `rgap-audit: MODEL: stage done/total label`."""

    def __init__(self, stream: TextIO, rate: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval = 1.0 / rate
        self.clock = clock
        self.model = ""
        self.counts: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.last = -float("inf")
        self.stage = ""
        self.shown = False

    def start(self, model: str, totals: Mapping[str, int] | None = None) -> Meter:
        """A new model: counts reset; `totals` gives the units a stage will report (e.g. {"walk": 48})."""
        self.model, self.counts, self.totals = model, {}, dict(totals or {})
        return self

    def __call__(self, stage: str, label: str, done: int | None, total: int | None) -> None:
        done = self.counts.get(stage, 0) + 1 if done is None else done
        self.counts[stage] = done
        total = total if total is not None else self.totals.get(stage)
        now = self.clock()
        if now - self.last < self.interval and stage == self.stage and not (total and done >= total):
            return  # a new stage and a stage's last unit are always drawn
        self.last, self.stage = now, stage
        count = f"{done}/{total}" if total else str(done)
        self._write(f"\rrgap-audit: {self.model}: {stage} {count} {label}"[:200] + "\x1b[K")

    def clear(self) -> None:
        """Erase the status line (before a model's errors are printed, and when it is done)."""
        if self.shown:
            self._write("\r\x1b[K")
            self.shown = False
        self.last = -float("inf")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
            self.shown = not text.endswith("\r\x1b[K")
        except (OSError, ValueError):
            pass
