"""Targets and declaration values checked without torch: a path as shown, a dotted module name's file,
the package a file belongs to, an input shape, the keys that say how forward is called.

They live apart from loader.py (which imports torch) so that the configuration, the command line and a
run served from the cache (rgap_audit.cache) start without importing torch; loader.py re-exports them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

CALL_KEYS = ("output", "example_inputs", "private_input", "batch_dim")  # -> ForwardCall


def display_path(path: str) -> str:
    """The path as the user wrote it, normalised (`./a/../b.py` -> `b.py`); findings print this."""
    return os.path.normpath(path)


def parse_shape(text: str | list | tuple) -> tuple[int, ...]:
    """`3,32,32`, `3x32x32`, `[3, 32, 32]` or a sequence of ints -> (3, 32, 32). Raises ValueError."""
    if isinstance(text, str):
        parts = [p for p in text.replace("x", ",").replace("X", ",").replace(" ", ",").strip("()[]").split(",") if p]
    else:
        parts = list(text)
    try:
        shape = tuple(int(p) for p in parts)
        bad = not shape or any(isinstance(p, bool) or (isinstance(p, float) and not p.is_integer()) for p in parts)
    except (TypeError, ValueError):
        bad = True
    if bad or any(s < 1 for s in shape):
        raise ValueError(f"invalid input shape {text!r}: expected positive integers such as 3,32,32")
    return shape


def check_call(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the ForwardCall keys of a declaration or a [tool.rgap-audit.models.NAME] table (python
    names); returns the ones given. Raises ValueError naming the key."""
    out: dict[str, Any] = {}
    for key in CALL_KEYS:
        value = fields.get(key)
        if value is None:
            continue
        if key == "output" and not (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
            raise ValueError(f"output must be an index or a key (int or str), got {value!r}")
        if key == "example_inputs" and not callable(value):
            raise ValueError(f"example_inputs must be a function of the model returning forward's arguments, got {type(value).__name__}")
        if key == "private_input" and not (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)):
            raise ValueError(f"private_input must be a position (int >= 0) or a parameter name of forward, got {value!r}")
        if key == "batch_dim" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"batch_dim must be an integer >= 0, got {value!r}")
        out[key] = value
    return out


def module_file(target: str) -> str:
    """PATH as given, or the file of a dotted module name (`pkg.models.resnet`) that is not a path.

    Looked up, without importing anything, under the working directory and then sys.path: first
    `pkg/models/resnet.py`, then `pkg/models/resnet/__init__.py`. The file is shown relative to the
    working directory when it lies below it. A target that is neither stays as given (the loader then
    says there is no such file).
    """
    if os.path.exists(target) or target.endswith(".py"):
        return target
    parts = target.split(".")
    if not all(p.isidentifier() for p in parts):
        return target
    roots = [os.getcwd(), *[p for p in sys.path if p and os.path.isdir(p)]]
    for root in dict.fromkeys(os.path.abspath(r) for r in roots):
        for candidate in (os.path.join(root, *parts) + ".py", os.path.join(root, *parts, "__init__.py")):
            if os.path.isfile(candidate):
                rel = os.path.relpath(candidate)
                return candidate if rel.startswith("..") else rel
    return target


def package_of(file: str) -> tuple[str | None, str]:
    """(dotted package name or None, folder to put on sys.path) for a file.

    The package is made of the folders above the file that hold an `__init__.py`, up to the nearest one
    that does not (their names must be identifiers); sys.path then gets the folder above the package.
    A file outside any package gets its own folder on sys.path (sibling imports).
    """
    folder = os.path.dirname(os.path.abspath(file))
    parts: list[str] = []
    while os.path.isfile(os.path.join(folder, "__init__.py")) and os.path.basename(folder).isidentifier():
        parts.append(os.path.basename(folder))
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not parts:
        return None, os.path.dirname(os.path.abspath(file))
    return ".".join(reversed(parts)), folder
