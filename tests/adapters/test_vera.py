"""VeRA: frozen random projections shared across sites of a shape, trained scaling vectors."""
from __future__ import annotations

import pytest

from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity)

peft = pytest.importorskip("peft")


def _projections(module) -> list[str]:
    return sorted(n for n, _ in module.named_parameters() if n.startswith(f"adapter_{NAME}."))


def test_vera_lifecycle(tmp_path):
    model, args, compiled = compile_kind("vera", ["*.q_proj", "*.o_proj", "*.down_proj"], rank=4)
    assert_identity_insert(compiled, model, args)     # b = 0
    # q_proj and o_proj (64 -> 64) share one A and one B; down_proj (128 -> 64) has its own A
    assert _projections(compiled.module) == [f"adapter_{NAME}.vera_A_4x128", f"adapter_{NAME}.vera_A_4x64",
                                             f"adapter_{NAME}.vera_B_64x4"]
    assert_param_count(compiled, 6 * (4 + 64))         # d (r) and b (out) per site
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)
    assert _projections(compiled.module)               # unmerge brought the shared projections back


def test_single_shape_exports_to_peft(tmp_path):
    model, args, compiled = compile_kind("vera", ["*.q_proj", "*.o_proj"], rank=4)
    peft_export(compiled, model, args, tmp_path)


def test_peft_parity_slices_the_largest_projection(tmp_path):
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"])
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert {s.merged["vera_A"].shape for s in state.sites} == {(4, 128)}   # one A for all, read as A[:, :in]
