"""The cpu target's pool of warm memory (attndsl/runtime/buffers.py): a map goes back to the
pool only when no view of its array is left, comes out zeroed for `zeros`, and the idle bytes
stay under ATTNDSL_POOL_MIB."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
import torch

from attndsl.runtime import buffers

SHAPE = (2, 4, 1024, 64)  # 4 MiB in float64: over MIN_BYTES


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ATTNDSL_POOL_MIB", raising=False)
    buffers.release()
    yield
    buffers.release()


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_a_freed_array_is_handed_out_again_and_zeroed() -> None:
    a = buffers.zeros(SHAPE, np.float64)
    assert a.shape == SHAPE and a.dtype == np.float64 and a.flags.c_contiguous
    assert a.flags.writeable and not a.any()
    a[...] = 7.0
    where = _address(a)
    del a
    assert buffers.idle_bytes() == np.prod(SHAPE) * 8
    b = buffers.zeros(SHAPE, np.float64)
    assert _address(b) == where, "the idle map was not reused"
    assert not b.any(), "a reused map was not zeroed"
    assert buffers.idle_bytes() == 0


@pytest.mark.parametrize("keep", ["slice", "transpose", "reshape", "torch"])
def test_a_map_stays_out_while_any_view_of_it_lives(keep: str) -> None:
    a = buffers.empty(SHAPE, np.float64)
    a[...] = 3.0
    where = _address(a)
    view: Any = {"slice": a[1, 2:3], "transpose": a.T, "reshape": a.reshape(-1)[5:],
                 "torch": torch.from_numpy(a)}[keep]
    del a
    gc.collect()
    assert buffers.idle_bytes() == 0, f"returned while a {keep} view lives"
    other = buffers.zeros(SHAPE, np.float64)
    assert _address(other) != where
    assert float(view.sum()) == 3.0 * (view.numel() if keep == "torch" else view.size)
    del view
    gc.collect()
    assert buffers.idle_bytes() == np.prod(SHAPE) * 8


def test_small_arrays_and_a_zero_limit_use_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    small = buffers.zeros((3, 5), np.float32)
    assert small.base is None and not small.any()
    monkeypatch.setenv("ATTNDSL_POOL_MIB", "0")
    big = buffers.zeros(SHAPE, np.float64)
    assert big.base is None and not big.any()
    del small, big
    assert buffers.idle_bytes() == 0


def test_idle_bytes_stay_under_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNDSL_POOL_MIB", "10")  # two 4 MiB maps fit, a third does not
    first, second, third = (buffers.empty(SHAPE, np.float64) for _ in range(3))
    addresses = [_address(a) for a in (first, second, third)]
    del first
    del second
    del third
    assert buffers.idle_bytes() == 2 * np.prod(SHAPE) * 8
    again = [buffers.empty(SHAPE, np.float64) for _ in range(2)]
    # the least recently freed (the first) was dropped
    assert sorted(map(_address, again)) == sorted(addresses[1:])
    too_big = buffers.empty((8, 4, 1024, 64), np.float64)  # 16 MiB: over the limit alone
    del too_big
    assert buffers.idle_bytes() == 0
    del again
    buffers.release()
    assert buffers.idle_bytes() == 0


def test_a_bad_limit_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNDSL_POOL_MIB", "lots")
    with pytest.raises(ValueError, match="ATTNDSL_POOL_MIB='lots'"):
        buffers.empty(SHAPE, np.float64)


def test_the_default_limit_follows_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset: a sixteenth of physical memory (at least 256 MiB); ATTNDSL_POOL_MIB overrides."""
    import os

    monkeypatch.delenv("ATTNDSL_POOL_MIB", raising=False)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert buffers.limit_bytes() == int(max(256 << 20, memory / 16))
    monkeypatch.setenv("ATTNDSL_POOL_MIB", "300")
    assert buffers.limit_bytes() == 300 << 20
