"""LoRA parity with PEFT on LLaMA-style and GPT-2 models: from_peft import, insert, merge, export."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from tests.conftest import hf_gpt2, hf_llama, lora_spec, peft_lora_checkpoint, randomize_adapters

peft = pytest.importorskip("peft")
KW = {"use_cache": False}
CASES = {
    "llama": (hf_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (hf_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama-rslora-rank-pattern": (hf_llama, dict(target_modules=["q_proj", "o_proj"], use_rslora=True,
                                                 rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3})),
}


def logits(module, args):
    with torch.no_grad():
        return module(*args, **({} if isinstance(module, torch.fx.GraphModule) else KW)).logits


def peft_model(factory, options, tmp_path):
    model, args = factory()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **options)
    return model, args, peft_lora_checkpoint(model, config, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_from_peft_matches_peft_before_and_after_merge(case, tmp_path):
    factory, options = CASES[case]
    model, args, wrapped = peft_model(factory, options, tmp_path)
    expected = logits(wrapped, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "imported", "from_peft": str(tmp_path)}]}, KW)
    torch.testing.assert_close(logits(compiled.module, args), expected, rtol=1e-5, atol=1e-5)
    compiled.apply(["merge"])
    merged_peft = wrapped.merge_and_unload()
    torch.testing.assert_close(logits(compiled.module, args), logits(merged_peft, args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory,targets,peft_targets", [
    (hf_llama, ["*.q_proj", "*.v_proj"], ["q_proj", "v_proj"]),
    (hf_gpt2, ["*.c_attn", "*.mlp.c_proj"], None),
])
def test_insert_and_export_match_peft(factory, targets, peft_targets, tmp_path):
    model, args = factory()
    compiled = surgeon.compile(model, args, lora_spec(targets, rank=4, alpha=8), KW)
    randomize_adapters(compiled.module)
    ours = logits(compiled.module, args)
    compiled.save_adapter("chat", tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, args), ours, rtol=1e-5, atol=1e-5)
    if peft_targets:   # the same weights put into a model PEFT built itself
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8,
                                                                             target_modules=peft_targets)).eval()
        state = {f"base_model.model.{path}.{p}.default.weight": t
                 for path, ps in compiled.adapter_weights("chat").items() for p, t in ps.items()}
        missing = wrapped.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys
        torch.testing.assert_close(logits(wrapped, args), ours, rtol=1e-5, atol=1e-5)
