"""Run the reconstruction single-threaded.

The systems solved here are small; on a busy two-core machine the OpenMP threads of torch and the
OpenBLAS threads of numpy/scipy (SuperLU calls BLAS) contend and slow the solves down tenfold or more.
torch has an API for its threads; for OpenBLAS the loaded libraries' own setters are called through
ctypes (as threadpoolctl does), and quietly skipped when not found.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch

_SETTERS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def _openblas_controls() -> list[tuple]:
    try:
        import numpy  # noqa: F401  (loads numpy's OpenBLAS)
        import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)

        paths = set()
        with open("/proc/self/maps") as fh:
            for line in fh:
                part = line.split()[-1] if line.split() else ""
                if "openblas" in part.lower() and part.startswith("/"):
                    paths.add(part)
    except OSError:
        return []
    controls = []
    for p in sorted(paths):
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for set_name, get_name in _SETTERS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                controls.append((getattr(lib, set_name), getattr(lib, get_name)))
                break
    return controls


_CONTROLS: list[tuple] | None = None


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch and OpenBLAS on one thread inside the block; restored afterwards."""
    global _CONTROLS
    if _CONTROLS is None:
        _CONTROLS = _openblas_controls()
    prev_torch = torch.get_num_threads()
    prev_blas = []
    for setter, getter in _CONTROLS:
        try:
            prev_blas.append((setter, int(getter())))
            setter(1)
        except Exception:  # pragma: no cover - foreign library quirks
            pass
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev_torch)
        for setter, n in prev_blas:
            try:
                setter(n)
            except Exception:  # pragma: no cover
                pass
