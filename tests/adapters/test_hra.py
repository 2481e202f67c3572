"""HRA: Householder reflections on the input; paired init, Gram-Schmidt variant, PEFT parity."""
from __future__ import annotations

import pytest
import torch

from surgeon.adapters import input_map
from surgeon.adapters.hra import HRA
from tests.adapters.helpers import (assert_identity_insert, assert_merge, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind, peft_export, peft_parity)

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("apply_gs", [False, True])
def test_reflections_match_peft(apply_gs):
    from peft.tuners.hra.layer import HRALinear

    layer = HRALinear(torch.nn.Linear(16, 8), "default", peft.HRAConfig(r=4, apply_GS=apply_gs), r=4)
    u = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    layer.hra_u["default"].data.copy_(u)
    ours = input_map(HRA.forward_input, {"hra_u": u}, {"rank": 4, "apply_GS": apply_gs}, 16)   # H^T
    torch.testing.assert_close(ours.T.float(), layer.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-6)


def test_hra_lifecycle(tmp_path):
    model, args, compiled = compile_kind("hra", ["*.q_proj", "*.down_proj"], rank=4)
    assert_identity_insert(compiled, model, args, exact=False)     # H1 H1 H2 H2 == I up to rounding
    assert_param_count(compiled, 2 * 64 * 4 + 2 * 128 * 4)
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_gram_schmidt_variant_changes_the_function_at_insert():
    model, args, compiled = compile_kind("hra", ["*.q_proj"], rank=2, apply_GS=True)
    assert compiled.report.rows[-1].check == "changes function"    # I - 2 Q Q^T is never I
    assert_merge(compiled, args)


def test_peft_parity(tmp_path):
    peft_parity(peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), tmp_path)
