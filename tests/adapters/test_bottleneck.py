"""Bottleneck (serial) adapter: y + s U act(D y) on the output; Houlsby/Pfeiffer by targets; merge refused."""
from __future__ import annotations

import pytest

from surgeon.errors import SpecError
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind)
from tests.conftest import hf_gpt2


def test_houlsby_placement_lifecycle(tmp_path):
    model, args, compiled = compile_kind("bottleneck", ["*.o_proj", "*.down_proj"], rank=4)
    assert_identity_insert(compiled, model, args)     # U = 0
    assert sorted(s.path.rsplit(".", 1)[-1] for s in compiled.adapters[NAME].sites) == ["down_proj"] * 2 + ["o_proj"] * 2
    assert_param_count(compiled, 4 * 2 * 4 * 64)      # 2 * rank * out per site
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    with pytest.raises(SpecError, match="serial adapter transforms the layer's output"):
        compiled.apply(["merge"])
    assert compiled.adapters[NAME].status == "inserted"   # refused before touching the graph


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_pfeiffer_placement_on_conv1d_reads_the_biased_output(activation):
    model, args, compiled = compile_kind("bottleneck", ["*.mlp.c_proj"], factory=hf_gpt2, rank=4,
                                         activation=activation, scale=2.0)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * 2 * 4 * 32)
    site = compiled.adapters[NAME].sites[0]
    assert site.op == "addmm"
    down = next(n for n in compiled.module.graph.nodes if n.meta.get("surgeon_adapter") == NAME
                and n.op == "call_function" and n.args[1].target == site.params["adapter_down"])
    assert down.args[0].target.__name__ == "addmm.default"      # D reads the base output y = x W + b
    assert_trains(compiled, args, steps=3)
