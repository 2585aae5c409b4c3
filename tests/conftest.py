"""Test session settings shared by every test file."""

from __future__ import annotations

import pytest

from rgap_audit.threads import single_thread


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_linear_algebra():
    """Run BLAS and torch single-threaded, as the audit and the attack do: on a shared 2-core machine
    thread oversubscription slows mid-sized SVDs several-fold and makes timings erratic."""
    with single_thread():
        yield
