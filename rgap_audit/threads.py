"""Run rgap-audit's linear algebra single-threaded.

The systems solved per layer are mid-sized (a few thousand columns). On a busy two-core machine the
BLAS threads of numpy/scipy (OpenBLAS) and torch's OpenMP threads oversubscribe the cores and a
1620 x 1500 SVD slows from about 2 s to 10 s; one thread is both faster there and reproducible.
threadpoolctl (the library scikit-learn uses for this) sets the limits of every loaded BLAS.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from threadpoolctl import ThreadpoolController


@functools.cache
def _controller() -> ThreadpoolController:
    """The loaded BLAS/OpenMP libraries, scanned once (a scan reads /proc/self/maps: ~3 ms a call)."""
    import numpy  # noqa: F401  (load numpy's and scipy's BLAS so that their pools are limited too)
    import scipy.linalg  # noqa: F401

    return ThreadpoolController()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Limit BLAS/OpenMP pools and torch's intra-op threads to 1, restoring them afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _controller().limit(limits=1):
            yield
    finally:
        torch.set_num_threads(prev)
