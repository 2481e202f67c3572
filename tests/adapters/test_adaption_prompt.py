"""Adaption prompt (LLaMA-Adapter): a zero-gated attention over learned prompt tokens at each SDPA call.

References: PEFT's AdaptionPromptConfig on HF LLaMA with GQA (its AdaptedAttention recomputes the
rotated query and projects the prompt through k_proj / v_proj / o_proj), with prompt and gate moved
off their init: logits of an imported checkpoint, of a surgeon adapter exported to PEFT, and greedy
generation over the KV-cache graphs, against PEFT's own outputs. Then the lifecycle (identity at
insert, training of prompt and gate only, param count, merge refused with the reason, round trip)
and the refusals: an attention without k_proj / v_proj / o_proj (GPT-2, BERT), an o_proj with a
bias, an export that is not the top layers, malformed checkpoints.
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.errors import SpecError
from tests.adapters.helpers import (KW, NAME, spec, assert_close, assert_edited_checkpoint_refused,
                                    assert_identity_insert, assert_param_count, assert_round_trip, assert_trains,
                                    compile_kind, randomized_peft_checkpoint)
from tests.conftest import hf_bert, hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits

LEN = 3


def _config(layers: int = 1):
    peft = pytest.importorskip("peft")
    return peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=LEN, adapter_layers=layers)


def _params(compiled, path):
    module = compiled.module
    return tuple(module.get_parameter(f"{path}.adapter_{NAME}.{p}") for p in ("adaption_prompt", "adaption_gate"))


def test_hf_llama_lifecycle(tmp_path):
    model, args, compiled = compile_kind("adaption_prompt", ["*.self_attn"], adapter_len=LEN)
    assert_identity_insert(compiled, model, args)   # the gate starts at 0: exact zeros are added
    prompt, gate = _params(compiled, "model.layers.0.self_attn")
    assert prompt.shape == (1, LEN, 64) and torch.equal(gate, torch.zeros(1))
    assert_param_count(compiled, 2 * (LEN * 64 + 1))   # layers * (n * hidden + gate)
    assert_trains(compiled, args)
    before = logits(compiled.module, args)
    with pytest.raises(SpecError, match="attention over learned tokens"):
        compiled.apply(["merge"])
    assert torch.equal(logits(compiled.module, args), before) and compiled.adapters[NAME].status == "inserted"
    assert_round_trip(compiled, model, args, tmp_path)


def test_deactivate_and_remove_restore_the_attention():
    model, args = hf_llama()
    two = spec("adaption_prompt", ["*.self_attn"], adapter_len=LEN)
    two["adapters"].append({"name": "other", "type": "lora", "targets": ["*.k_proj"]})   # B = 0: the identity
    compiled = surgeon.compile(model, args, two, KW)
    with torch.no_grad():
        for layer in (0, 1):
            _params(compiled, f"model.layers.{layer}.self_attn")[1].fill_(0.5)   # the gates open; the LoRA stays 0
    adapted, want = logits(compiled.module, args), logits(model, args)
    assert not torch.allclose(adapted, want, atol=1e-3)
    compiled.set_active("other")
    assert adapter_nodes(compiled.module, NAME) == [] and torch.equal(logits(compiled.module, args), want)
    compiled.set_active(NAME, "other")
    assert torch.equal(logits(compiled.module, args), adapted)
    compiled.apply([{"remove": {"adapters": [NAME]}}])
    assert adapter_nodes(compiled.module, NAME) == [] and torch.equal(logits(compiled.module, args), want)


def test_from_peft_matches_peft_and_exports_back(tmp_path):
    """A randomized PEFT checkpoint on the top layer: same logits; its keys name the module, so only layer 1
    is adapted; written back in PEFT's format it loads in PEFT with the same logits."""
    peft = pytest.importorskip("peft")
    model, args, wrapped = randomized_peft_checkpoint(_config(), tmp_path / "peft", scale=0.5)
    expected = logits(wrapped, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, KW)
    assert [s.path for s in compiled.adapters[NAME].sites] == ["model.layers.1.self_attn"]
    theirs = dict(wrapped.named_parameters())
    prompt, gate = _params(compiled, "model.layers.1.self_attn")
    assert torch.equal(prompt, theirs["base_model.model.model.layers.1.self_attn.adaption_prompt"])
    assert torch.equal(gate, theirs["base_model.model.model.layers.1.self_attn.adaption_gate"])
    assert_close(logits(compiled.module, args), expected)
    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export")).eval()
    assert torch.equal(logits(again, args), expected)


def test_surgeon_adapter_exports_to_peft(tmp_path):
    """Both layers adapted in surgeon, trained (randomized), exported: PEFT's outputs are surgeon's."""
    peft = pytest.importorskip("peft")
    model, args, compiled = compile_kind("adaption_prompt", ["*.self_attn"], adapter_len=LEN)
    randomize_adapters(compiled.module, seed=5)
    expected = logits(compiled.module, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    compiled.save_adapter(NAME, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert loaded.peft_config["default"].adapter_layers == 2
    assert_close(logits(loaded, args), expected)


def test_export_of_lower_layers_is_refused(tmp_path):
    """PEFT places the prompts on the top adapter_layers modules: layer 0 alone cannot be written."""
    _, _, compiled = compile_kind("adaption_prompt", ["*.layers.0.self_attn"], adapter_len=LEN)
    with pytest.raises(SpecError, match="top adapter_layers"):
        compiled.save_adapter(NAME, tmp_path, format="peft")


def test_generate_matches_peft(tmp_path):
    """Greedy generation over the prefill / decode graphs: each decode step's query (rotated at its own
    position) attends the prompt, as PEFT recomputes it per step."""
    pytest.importorskip("peft")
    prompt = torch.tensor([[44, 47, 117, 5], [2, 120, 9, 31]])
    model, args, wrapped = randomized_peft_checkpoint(_config(2), tmp_path, scale=1.0)
    with torch.no_grad():
        want = wrapped.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        base = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(want, base)   # the prompts change what is generated
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW,
                               verify=False)
    assert torch.equal(compiled.generate(prompt, max_new_tokens=6, pad_token_id=0), want)
    assert compiled.generator.mode == "cache", compiled.generator.notes


@pytest.mark.parametrize("factory, target", [(hf_gpt2, "*.attn"), (hf_bert, "*.attention.self")])
def test_attention_without_llama_projections_is_refused(factory, target):
    made = factory()
    model, args, kwargs = made if len(made) == 3 else (*made, KW)
    with pytest.raises(SpecError, match="needs linears .*k_proj"):
        surgeon.compile(model, args, spec("adaption_prompt", [target], adapter_len=LEN), kwargs)


def test_o_proj_with_bias_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model, args = LlamaForCausalLM(cfg).eval(), (torch.randint(0, 128, (2, 8)),)
    with pytest.raises(SpecError, match="o_proj' has a bias"):
        surgeon.compile(model, args, spec("adaption_prompt", ["*.self_attn"], adapter_len=LEN), KW)


def _gate_shape(config, tensors):
    tensors["base_model.model.model.layers.1.self_attn.adaption_gate"] = torch.zeros(2)


def _layers(config, tensors):
    config["adapter_layers"] = 2


def _length(config, tensors):
    config["adapter_len"] = LEN + 1


@pytest.mark.parametrize("edit, message", [
    (_gate_shape, "module 'model.layers.1.self_attn' needs a one-element adaption_gate, got \\[2\\]"),
    (_layers, "adapter_layers=2, but the checkpoint holds adaption prompts for 1 modules"),
    (_length, "needs an adaption_prompt of shape \\[1, adapter_len=4, hidden\\], got \\[1, 3, 64\\]"),
])
def test_malformed_checkpoint_is_refused(tmp_path, edit, message):
    assert_edited_checkpoint_refused(_config(), tmp_path, edit, message)
