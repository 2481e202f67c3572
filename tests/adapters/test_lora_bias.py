"""LoRA's `bias` (PEFT's lora_bias): y + s (B A x + b_B); merged into the base bias where there is one,
refused where there is none; PEFT import, export and merge parity; merge-checkpoint on disk."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import surgeon
from surgeon.errors import SurgeonError
from surgeon.merge_checkpoint import merge_checkpoint
from tests.adapters.helpers import (KW, NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, compile_kind, peft_export, peft_parity)
from tests.conftest import hf_gpt2, randomize_adapters, small_cnn
from tests.passes.helpers import logits

peft = pytest.importorskip("peft")


def test_biased_sites_merge_the_lora_bias(tmp_path):
    """GPT-2's c_attn and c_fc carry a bias: the merge adds s b_B to it; unmerge takes it back out."""
    model, args, compiled = compile_kind("lora", ["*.c_attn", "*.c_fc"], factory=hf_gpt2, rank=4, alpha=8, bias=True)
    assert_identity_insert(compiled, model, args)                # b_B = 0 and B = 0 at init
    assert all(s.options["biased"] for s in compiled.adapters[NAME].sites)
    assert_param_count(compiled, 2 * sum(4 * (32 + out) + out for out in (96, 128)))
    assert_round_trip(compiled, model, args, tmp_path)
    biases = {n: p.clone() for n, p in compiled.module.named_parameters() if n.endswith(".bias")}
    assert_merge(compiled, args)
    compiled.apply(["merge"])
    changed = {n for n, p in compiled.module.named_parameters() if n in biases and not torch.equal(p, biases[n])}
    assert changed and all(n.endswith(("c_attn.bias", "c_fc.bias")) for n in changed)


def test_peft_parity_and_merge_on_gpt2(tmp_path):
    config = peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, lora_bias=True,
                             fan_in_fan_out=True, lora_dropout=0.0)
    compiled = peft_parity(config, tmp_path, factory=hf_gpt2)    # before and after merge, against merge_and_unload
    assert {s.options["bias"] for s in compiled.adapters[NAME].sites} == {True}


def test_peft_export_and_merge_checkpoint(tmp_path):
    model, args, compiled = compile_kind("lora", ["*.c_attn"], factory=hf_gpt2, rank=4, alpha=4, bias=True)
    peft_export(compiled, model, args, tmp_path / "export")
    randomize_adapters(compiled.module, seed=9)
    compiled.save_adapter(NAME, tmp_path / "peft", format="peft")
    model.save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged")   # the biases from the tensors
    compiled.apply(["merge"])
    ours = dict(compiled.module.named_parameters())
    on_disk = load_file(tmp_path / "merged" / "model.safetensors")
    assert [n for n in on_disk if n.endswith("c_attn.bias")]
    for name, tensor in on_disk.items():
        if name in ours:
            assert torch.equal(tensor, ours[name]), name


def test_a_site_without_a_base_bias_runs_but_refuses_the_merge(tmp_path):
    """LLaMA's projections have no bias: the adapter's bias is applied, its merge refused (as PEFT)."""
    model, args, compiled = compile_kind("lora", ["*.q_proj"], rank=2, bias=True)
    assert_identity_insert(compiled, model, args)
    assert {s.options["biased"] for s in compiled.adapters[NAME].sites} == {False}
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    with pytest.raises(surgeon.SpecError, match="lora_bias needs a bias in the base layer"):
        compiled.apply(["merge"])
    assert torch.equal(logits(compiled.module, args), before)
    config = peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4, lora_bias=True, lora_dropout=0.0)
    with pytest.warns(Warning):   # PEFT warns that such an adapter cannot merge
        wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    randomize_adapters(wrapped)
    wrapped.save_pretrained(tmp_path)
    imported = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
    assert_close(logits(imported.module, args), logits(wrapped, args))


def test_bias_off_linear_sites_is_refused():
    model, args = small_cnn()
    with pytest.raises(SurgeonError, match="supported on linear and Conv1D sites only"):
        surgeon.compile(model, args, {"adapters": [{"name": "a", "type": "lora", "targets": ["block1.0"],
                                                    "rank": 2, "bias": True}]})
