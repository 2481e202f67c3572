"""Lily: y + s h (sum_e p_e B_e), h = A x, p = the batch-mean router softmax; A and the router per site, B one
trained Parameter per (module name, shape) group; no merge; PEFT import (its ties checked), export, parity."""
from __future__ import annotations

import pytest
import torch

import surgeon
from tests.adapters.helpers import (KW, NAME, assert_close, assert_identity_insert, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export,
                                    randomized_peft_checkpoint)
from tests.conftest import hf_llama
from tests.passes.helpers import logits

TARGETS = ["*.q_proj", "*.k_proj", "*.down_proj"]


def _count(rank: int, experts: int) -> int:
    # hf_llama, 2 layers: q_proj 64 -> 64, k_proj 64 -> 32 (GQA), down_proj 128 -> 64; per site A (r x in) and
    # the router (num_B x r); per group one B ((num_B r) x out), counted once
    own = 2 * rank * ((64 + experts) + (64 + experts) + (128 + experts))
    return own + experts * rank * (64 + 32 + 64)


def test_lily_lifecycle(tmp_path):
    model, args, compiled = compile_kind("lily", TARGETS, rank=4, num_b=3)
    assert_identity_insert(compiled, model, args)   # B = 0: the branch adds exact zeros
    assert_param_count(compiled, _count(4, 3))
    sites = compiled.adapters[NAME].sites
    by_group = {}
    for site in sites:
        by_group.setdefault(site.options["group"], set()).add(site.params["lily_B"])
    assert len(by_group) == 3 and all(len(targets) == 1 for targets in by_group.values())   # one B per group
    assert len({s.params["lily_A"] for s in sites}) == len(sites) == 6                      # A per site
    assert {s.options["width"] for s in sites if s.path.endswith("k_proj")} == {32}
    assert_trains(compiled, args)                    # B's gradient sums its group's sites
    assert_round_trip(compiled, model, args, tmp_path)
    # p is averaged over every token of every row: a row's output changes with the rows beside it
    both, alone = logits(compiled.module, args), logits(compiled.module, (args[0][:1],))
    assert not torch.allclose(both[:1], alone, atol=1e-6)
    with pytest.raises(surgeon.SpecError, match="router probabilities averaged over each batch"):
        compiled.apply(["merge"])


def test_peft_parity_and_export(tmp_path):
    """A randomized PEFT Lily checkpoint (B tied per target and shape) imports with PEFT's outputs, on the full
    batch and on one row; surgeon's adapter exports back and loads in PEFT with the same outputs."""
    peft = pytest.importorskip("peft")
    config = peft.LilyConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=4, num_B=3, scaling=0.5)
    model, args, wrapped = randomized_peft_checkpoint(config, tmp_path / "in")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, KW)
    for batch in (args, (args[0][1:],)):
        expected = logits(wrapped, batch)
        assert not torch.allclose(expected, logits(model, batch), atol=1e-3)
        assert_close(logits(compiled.module, batch), expected)
    state = compiled.adapters[NAME]
    assert state.spec.options["scaling"] == 0.5 and len({s.params["lily_B"] for s in state.sites}) == 3
    assert state.param_count == sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == _count(4, 3)
    peft_export(compiled, model, args, tmp_path / "out")


def test_export_refuses_groups_peft_would_tie_together(tmp_path):
    """q_proj and o_proj are both 64 -> 64: separate groups here, one for PEFT under an exact regex target."""
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("lily", ["*.q_proj", "*.o_proj"], rank=2)
    with pytest.raises(surgeon.SpecError, match="would tie groups 0 and 1"):
        peft_export(compiled, model, args, tmp_path)


def test_untied_or_strided_checkpoints_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    config = peft.LilyConfig(target_modules=["q_proj"], r=2, num_B=2)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lily_B.weight"
    save_file({**tensors, key: tensors[key] + 1}, file)
    with pytest.raises(surgeon.SpecError, match="lily_B differs from module 'model.layers.0.self_attn.q_proj'"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
    save_file(tensors, file)
    text = (tmp_path / "adapter_config.json").read_text().replace('"stride_A": 1', '"stride_A": 2')
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(surgeon.SpecError, match="stride_A=2"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("lily", ["*.q_proj"], factory=lambda: hf_llama(layers=1), rank=2,
                                         init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)

