"""LoHa: Hadamard product of two rank-r factors; exact identity, merge, PEFT parity."""
from __future__ import annotations

import pytest

from tests.adapters.helpers import (assert_identity_insert, assert_merge, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind, peft_export, peft_parity)

peft = pytest.importorskip("peft")


def test_loha_lifecycle(tmp_path):
    model, args, compiled = compile_kind("loha", ["*.q_proj", "*.down_proj"], rank=4, alpha=8)
    assert_identity_insert(compiled, model, args)     # W2b = 0
    assert_param_count(compiled, 2 * 2 * 4 * (64 + 64) + 2 * 2 * 4 * (128 + 64))
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_peft_parity(tmp_path):
    config = peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_parity(config, tmp_path)
