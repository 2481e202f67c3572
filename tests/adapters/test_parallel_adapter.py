"""Parallel adapter: s * U act(D x) beside the linear op; merge exact without a nonlinearity, refused with one."""
from __future__ import annotations

import pytest

from surgeon.errors import SpecError
from surgeon.spec import kinds
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind)


def test_linear_parallel_adapter_lifecycle(tmp_path):
    model, args, compiled = compile_kind("parallel-adapter", ["*.q_proj", "*.down_proj"], rank=4,
                                         activation="none", scale=0.5)
    assert_identity_insert(compiled, model, args)     # U = 0
    assert_param_count(compiled, 2 * 4 * ((64 + 64) + (128 + 64)))   # rank * (in + out) per site
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)                       # W + s U D


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_nonlinear_branch_trains_and_refuses_merge(activation):
    model, args, compiled = compile_kind("parallel-adapter", ["*.o_proj"], rank=4, activation=activation)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * 4 * (64 + 64))
    ops = {n.target.__name__ for n in compiled.module.graph.nodes if n.meta.get("surgeon_adapter") == NAME
           and n.op == "call_function"}
    assert f"{activation}.default" in ops
    assert_trains(compiled, args, steps=3)
    assert activation in kinds()["parallel-adapter"].refusal(compiled.adapters[NAME].spec.options)
    nodes = [n.name for n in compiled.module.graph.nodes]
    with pytest.raises(SpecError, match=f"applies {activation} between the down and up projections"):
        compiled.apply(["merge"])
    assert [n.name for n in compiled.module.graph.nodes] == nodes       # refused before any change
    assert compiled.adapters[NAME].status == "inserted"


def test_refusal_is_empty_without_a_nonlinearity():
    kind = kinds()["parallel-adapter"]
    assert kind.refusal({"activation": "none"}) == ""
    assert kinds()["lora"].refusal({}) == ""
