"""Kernel tests run the generated Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 is set per test (monkeypatch), not for the session, so test folders
collected alongside keep the no-GPU reference path. That works whatever imported triton
first: Triton reads the variable when a kernel is decorated, surgeon loads one module per
(source, interpreter flag), and generated kernels call only Triton builtins (no @jit helpers,
which are fixed as compiled or interpreted when triton is imported). A test that wants the
reference path deletes the variable.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SURGEON_TUNE_CACHE", str(tmp_path / "tuning.json"))   # tuner tests start from nothing


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    """Each test starts with empty launch-plan tables (a plan made under another test's patches of
    the launcher's helpers must not decide this test's calls)."""
    from surgeon.kernels import lora_linear, pointwise

    monkeypatch.setattr(lora_linear, "_PLANS", {})
    monkeypatch.setattr(pointwise, "_PLANS", {})
