"""glibc's mmap threshold, set at import (``lmmjax.memory``)."""

from __future__ import annotations

import ctypes

import pytest

from lmmjax.memory import tune_allocator


def _glibc() -> bool:
    return hasattr(ctypes.CDLL(None), "mallopt")


@pytest.mark.skipif(not _glibc(), reason="not glibc: nothing to set")
def test_threshold_is_set_on_glibc(monkeypatch):
    monkeypatch.delenv("LMMJAX_MMAP_THRESHOLD", raising=False)
    assert tune_allocator()
    monkeypatch.setenv("LMMJAX_MMAP_THRESHOLD", str(32 << 20))
    assert tune_allocator()


def test_zero_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("LMMJAX_MMAP_THRESHOLD", "0")
    assert not tune_allocator()


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("LMMJAX_MMAP_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="LMMJAX_MMAP_THRESHOLD"):
        tune_allocator()
