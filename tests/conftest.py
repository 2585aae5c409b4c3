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


@pytest.fixture(autouse=True)
def _no_results_cache(monkeypatch):
    """No test reads or writes the results cache (rgap_audit.cache) unless it asks for one: tests that
    patch the analysis must see a fresh run, and the repository gets no .rgap_audit_cache/ folder.
    tests/test_cache.py removes the variable and gives every run its own --cache-dir."""
    monkeypatch.setenv("RGAP_AUDIT_NO_CACHE", "1")
