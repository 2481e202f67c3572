"""Compiled.save_pretrained: a merged checkpoint that the model's own class loads, with the same outputs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import surgeon
from tests.conftest import SmallCNN, assert_untouched, hf_gpt2, hf_llama, randomize_adapters, small_cnn, snapshot

KW = {"use_cache": False}


def lora(targets, name="a", **extra):
    return {"adapters": [{"name": name, "type": "lora", "targets": targets, "rank": 2, **extra}]}


@pytest.mark.parametrize("factory,targets", [(hf_llama, ["*.q_proj", "*.down_proj"]), (hf_gpt2, ["*.c_attn", "*.c_fc"])])
def test_transformers_loads_the_merged_model_with_the_same_outputs(tmp_path, factory, targets):
    from transformers import AutoModelForCausalLM

    model, (ids,) = factory()
    before = snapshot(model)
    compiled = surgeon.compile(model, (ids,), lora(targets), KW)
    randomize_adapters(compiled.module)
    with torch.no_grad():
        want = compiled.module(ids).logits
    out = compiled.save_pretrained(tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not any(".adapter_" in k for k in load_file(out / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
    assert compiled.adapters["a"].status == "inserted"          # the compiled module keeps its adapter
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(ids).logits, want, rtol=0, atol=0)
    assert_untouched(model, before)


def test_a_plain_module_loads_it_strictly(tmp_path):
    model, (x,) = small_cnn()
    compiled = surgeon.compile(model, (x,), lora(["block1.0", "head"]))
    randomize_adapters(compiled.module)
    out = compiled.save_pretrained(tmp_path / "cnn")
    fresh = SmallCNN().eval()
    fresh.load_state_dict(load_file(out / "model.safetensors"))     # strict: every key, num_batches_tracked too
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), compiled.module(x), rtol=1e-5, atol=1e-6)


def test_an_inactive_adapter_is_left_out_and_the_active_one_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    model, (ids,) = hf_llama()
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 2},
                         {"name": "b", "type": "lora", "targets": ["*.v_proj"], "rank": 2}]}
    compiled = surgeon.compile(model, (ids,), spec, KW)
    randomize_adapters(compiled.module)
    compiled.set_active("b")
    with torch.no_grad():
        want = compiled.module(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(compiled.save_pretrained(tmp_path / "b")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)


def test_what_cannot_be_merged_is_refused_and_nothing_is_written(tmp_path):
    model, (ids,) = hf_llama()
    compiled = surgeon.compile(model, (ids,), {"adapters": [{"name": "p", "type": "prefix", "targets": ["*.self_attn"],
                                                             "num_virtual_tokens": 2}]}, KW)
    with pytest.raises(surgeon.SurgeonError, match=r"save_pretrained: the running adapters \['p'\] cannot all be "
                                                   r"merged"):
        compiled.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p").exists()
    (tmp_path / "file").write_text("mine")
    plain = surgeon.compile(model, (ids,), lora(["*.q_proj"]), KW)
    with pytest.raises(surgeon.SurgeonError, match="is a file, not a folder"):
        plain.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
