"""The tuning table: measured once per bucket, then read from memory, then from disk in a new process."""
from __future__ import annotations

import json

import pytest

from surgeon.kernels import tuning


def test_fastest_measures_once_and_reuses_the_disk_cache():
    calls = []

    def time_one(candidate):
        calls.append(candidate)
        if candidate == (256, 256):
            raise RuntimeError("out of shared memory")     # skipped, as a config that does not fit
        return {(64, 64): 2.0, (128, 64): 1.0}[candidate]

    candidates = [(64, 64), (128, 64), (256, 256)]
    table = {}
    assert tuning.fastest(table, "op", (16, "bf16"), candidates, time_one) == (128, 64)
    assert tuning.fastest(table, "op", (16, "bf16"), candidates, time_one) == (128, 64)
    assert len(calls) == 3
    stored = json.loads(tuning.cache_path().read_text())
    assert list(stored.values()) == ["[128, 64]"] and "| op | (16, 'bf16')" in next(iter(stored))
    fresh = {}                                                # a new process: nothing in memory
    assert tuning.fastest(fresh, "op", (16, "bf16"), candidates, time_one) == (128, 64) and len(calls) == 3
    assert tuning.fastest(fresh, "op", (16, "bf16"), [(64, 64)], time_one) == (128, 64)   # memory first
    assert tuning.fastest({}, "op", (16, "bf16"), [(64, 64)], time_one) == (64, 64)       # stored: not a candidate


def test_no_candidate_launches_is_an_error_and_a_broken_cache_is_retuned():
    tuning.cache_path().write_text("{not json")
    with pytest.raises(RuntimeError, match="op: no candidate launches"):
        tuning.fastest({}, "op", (1,), ["a"], lambda c: 1 / 0)
    assert tuning.fastest({}, "op", (1,), ["a", "b"], lambda c: {"a": 2.0, "b": 1.0}[c]) == "b"


def test_a_candidate_that_disagrees_with_the_reference_is_not_chosen(monkeypatch):
    """A kernel that launches and is fastest but computes something else (a race, a wrong tile) is skipped."""
    times = {"right": 2.0, "wrong": 1.0}
    timed = []

    def time_one(candidate):
        timed.append(candidate)
        return times[candidate]

    warned = []
    monkeypatch.setattr(tuning._log, "warning", lambda message, *args: warned.append(message % args))
    found = tuning.fastest({}, "op", (3,), ["wrong", "right"], time_one, check=lambda c: c == "right")
    assert found == "right" and timed == ["right"]
    assert warned == ["op: candidate 'wrong' disagrees with the reference for (3,); skipped"]
    with pytest.raises(RuntimeError, match="no candidate launches"):
        tuning.fastest({}, "op", (4,), ["wrong"], time_one, check=lambda c: False)


def test_nothing_is_run_when_it_cannot_be_measured_but_a_stored_choice_is_used():
    """Inside a CUDA graph capture (`capture_reason`), a launch is recorded, not run: the tuner then
    runs no candidate. A choice in memory or on disk is still used; without one the error says why."""
    ran = []
    time_one = lambda c: ran.append(c) or {"a": 2.0, "b": 1.0}[c]  # noqa: E731
    with pytest.raises(RuntimeError, match=r"op: no tuned choice for \(8,\), and capturing: warm up first"):
        tuning.fastest({}, "op", (8,), ["a", "b"], time_one, check=lambda c: ran.append(c) or True,
                       unmeasurable=lambda: "capturing: warm up first")
    assert ran == []
    assert tuning.fastest({}, "op", (8,), ["a", "b"], time_one) == "b" and len(ran) == 2     # the warm-up
    assert tuning.fastest({}, "op", (8,), ["a", "b"], time_one, unmeasurable=lambda: "capturing") == "b"  # disk
    table = {(9,): "a"}
    assert tuning.fastest(table, "op", (9,), ["a", "b"], time_one, unmeasurable=lambda: 1 / 0) == "a"  # not asked
    assert len(ran) == 2


def test_a_tuning_failure_is_a_kernel_error():
    """surgeon's error hierarchy: what the tuner cannot choose is a KernelError (a RuntimeError too)."""
    from surgeon import KernelError

    with pytest.raises(KernelError, match="op: no candidate launches on this device for \\(2,\\)"):
        tuning.fastest({}, "op", (2,), ["a"], lambda c: 1 / 0)
    with pytest.raises(KernelError, match="no tuned choice"):
        tuning.fastest({}, "op", (5,), ["a"], lambda c: 1.0, unmeasurable=lambda: "capturing")


def test_capture_reason_is_empty_off_a_gpu():
    import torch

    assert tuning.capture_reason(torch.zeros(1)) == ""
