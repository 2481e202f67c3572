"""DoRA: exact identity at insert, magnitude + direction training, exact merge, PEFT parity."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity)
from tests.conftest import hf_gpt2

peft = pytest.importorskip("peft")


def test_dora_lifecycle(tmp_path):
    model, args, compiled = compile_kind("dora", ["*.q_proj", "*.down_proj"], rank=4, alpha=8)
    assert_identity_insert(compiled, model, args)     # g = m / ||W|| == 1 exactly at init
    site = next(s for s in compiled.adapters[NAME].sites if s.path == "model.layers.1.self_attn.q_proj")
    magnitude = get_tensor(compiled.module, site.params["lora_magnitude"])
    torch.testing.assert_close(magnitude, model.model.layers[1].self_attn.q_proj.weight.norm(dim=1), rtol=0, atol=0)
    assert_param_count(compiled, 2 * (4 * (64 + 64) + 64) + 2 * (4 * (128 + 64) + 64))
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=False)
    with pytest.raises(surgeon.SpecError, match="row norms"):
        compiled.apply(["unmerge"])


def test_dora_on_conv1d_with_bias_merges_exactly():
    model, args, compiled = compile_kind("dora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=2)
    assert_identity_insert(compiled, model, args)
    assert_merge(compiled, args, unmerge=False)


def test_peft_parity(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    compiled = peft_parity(config, tmp_path)
    assert compiled.adapters[NAME].spec.type == "dora"


def test_dropout_in_train_mode_matches_peft_on_a_biased_linear(tmp_path):
    """PEFT's DoRA with a dropout recomputes its base term from the dropped input in train mode
    (y + (g - 1) W x_d + g s B A x_d) and uses y - b in eval; the imported adapter does both."""
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(16, 12)).eval(), torch.randn(5, 16)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.4, target_modules=["0"])
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    wrapped.save_pretrained(tmp_path)
    module = surgeon.compile(model, (x,), {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}).module
    with torch.no_grad():
        torch.testing.assert_close(module(x), wrapped.eval()(x))
        module.train(), wrapped.train()
        for seed in range(3):
            torch.manual_seed(seed)
            want = wrapped(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(module(x), want)
