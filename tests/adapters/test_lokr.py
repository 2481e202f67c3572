"""LoKr: Kronecker product of two factors, PEFT's factorization and full/low-rank factor rules."""
from __future__ import annotations

import pytest

from surgeon.adapters.lokr import factorization, lokr_shapes
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity)

peft = pytest.importorskip("peft")


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 300):
        for factor in (-1, 2, 3, 4, 8, 16):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor)


def test_factor_shapes():
    opts = {"rank": 4, "decompose_both": False, "decompose_factor": -1}
    assert lokr_shapes(opts, 64, 64) == {"lokr_w1": (8, 8), "lokr_w2": (8, 8)}              # 4 >= 8 / 2
    assert lokr_shapes(opts, 128, 64) == {"lokr_w1": (8, 8), "lokr_w2_a": (8, 4), "lokr_w2_b": (4, 16)}
    both = {**opts, "rank": 2, "decompose_both": True}
    assert lokr_shapes(both, 128, 64) == {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2),
                                          "lokr_w2_b": (2, 16)}


@pytest.mark.parametrize("options", [{}, {"init": "lycoris", "decompose_both": True, "rank": 2}])
def test_lokr_lifecycle(options, tmp_path):
    options = {"rank": 4, "alpha": 8, **options}
    model, args, compiled = compile_kind("lokr", ["*.q_proj", "*.down_proj"], **options)
    assert_identity_insert(compiled, model, args)     # one factor is zero
    expected = sum(a * b for s in compiled.adapters[NAME].sites
                   for a, b in lokr_shapes(s.options, s.in_features, s.out_features).values())
    assert_param_count(compiled, expected)
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_peft_parity(tmp_path):
    config = peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], decompose_both=True,
                             rank_pattern={"v_proj": 2})
    peft_parity(config, tmp_path)
