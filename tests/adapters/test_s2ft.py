"""S2FT: a dense update of the leading input columns that co-permute gathered; k from its record."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.errors import PassError, SpecError
from tests.adapters.helpers import (KW, NAME, assert_close, assert_merge, assert_param_count, assert_trains,
                                    compile_kind)
from tests.conftest import hf_llama, randomize_adapters
from tests.passes.helpers import logits

PERMUTE = {"co-permute": {"ffn_fraction": 0.25, "head_fraction": 0.5}}
TARGETS = ["*.o_proj", "*.down_proj"]


def _compile(model, args, entry):
    return surgeon.compile(model, args, {"adapters": [entry], "pipeline": [PERMUTE, "insert"]}, KW)


def test_s2ft_lifecycle(tmp_path):
    model, args = hf_llama()
    compiled = _compile(model, args, {"name": NAME, "type": "s2ft", "targets": TARGETS})
    assert compiled.report.rows[-1].check == "exact"          # D = 0 on the permuted graph
    assert_close(logits(compiled.module, args), logits(model, args))
    # k per site: 2 of 4 query heads * head_dim 16 (o_proj), 32 of 128 channels (down_proj)
    assert {s.path: s.options["columns"] for s in compiled.adapters[NAME].sites} == {
        f"model.layers.{i}.{m}": 32 for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert_param_count(compiled, 4 * 64 * 32)                 # out * k per site
    assert_trains(compiled, args)
    randomize_adapters(compiled.module, seed=3)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "saved")
    again = _compile(model, args, {"name": "again", "from_dir": str(tmp_path / "saved")})
    assert torch.equal(logits(again.module, args), expected)
    assert_merge(compiled, args)


def test_un_permute_refuses_until_merged_then_restores_the_selected_columns():
    model, args = hf_llama()
    compiled = _compile(model, args, {"name": NAME, "type": "s2ft", "targets": ["*.down_proj"]})
    with pytest.raises(PassError, match="merge first"):
        compiled.apply(["un-permute"])
    record = compiled.module.meta["surgeon_permutations"][-1]["groups"]
    selected = next(e["selected"] for e in record if e["group"] == "model.layers.0.mlp")
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply(["merge", "un-permute"])
    assert_close(logits(compiled.module, args), before)
    assert compiled.module.meta["surgeon_permutations"] == []
    original = model.model.layers[0].mlp.down_proj.weight
    changed = (compiled.module.get_parameter("model.layers.0.mlp.down_proj.weight") != original).any(0)
    assert changed.nonzero().flatten().tolist() == selected   # the trained columns, back at their own indices
    assert selected != list(range(32))


def test_explicit_columns_need_no_record_and_a_missing_record_is_refused():
    model, args, compiled = compile_kind("s2ft", ["*.down_proj"], columns=8)
    assert_param_count(compiled, 2 * 64 * 8)
    assert_merge(compiled, args)
    with pytest.raises(SpecError, match="no co-permute record names its weight"):
        compile_kind("s2ft", ["*.down_proj"])
