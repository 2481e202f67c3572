"""Prompt tuning: v learned virtual tokens in front of the input embeddings (surgeon.adapters.virtual_tokens).

Against PEFT's PromptTuningConfig on HF LLaMA (GQA) and GPT-2 (its ids are viewed by the mask's length): logits of the same shape (n + v positions)
with and without an attention mask, greedy generate, PEFT import and export; the lifecycle (only the
prompt trains, merge refused with the reason, remove / deactivate restore the graph, safetensors round
trip) and the refusals (TEXT init, a static length, a position_ids input, a bad checkpoint).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import surgeon
from surgeon.errors import SpecError, SurgeonError
from tests.adapters.helpers import KW, NAME, assert_param_count, assert_round_trip, assert_trains, spec
from tests.conftest import hf_gpt2, hf_llama as _hf_llama
from tests.passes.helpers import adapter_nodes, logits

V = 3
peft = pytest.importorskip("peft")


def hf_llama():
    """tests.conftest's LLaMA (GQA) with one layer: the rewrite is the same, the captures are quicker."""
    return _hf_llama(layers=1)


def _compile(factory=hf_llama, targets=("model.embed_tokens",), **options):
    model, args = factory()
    return model, args, surgeon.compile(model, args, spec("prompt_tuning", targets, num_virtual_tokens=V,
                                                          **options), KW)


def _prompt(compiled):
    (param,) = [p for n, p in compiled.module.named_parameters() if n.endswith("prompt_embeddings")]
    return param


def _peft_with(model, prompt):
    """PEFT's prompt-tuning model on a copy of `model` holding `prompt` as its virtual tokens."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=V)).eval()
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return wrapped


def _peft_greedy(wrapped, ids, new):
    """Greedy decoding by PEFT's own forward on the whole sequence at each step."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, wrapped(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("factory,target", [(hf_llama, "model.embed_tokens"), (hf_gpt2, "transformer.wte")])
def test_logits_and_generate_match_peft(factory, target):
    model, args, compiled = _compile(factory, (target,))
    assert compiled.report.rows[-1].check == "changes function"
    wrapped = _peft_with(model, _prompt(compiled))
    ids = args[0]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0   # left padding in row 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            want = wrapped(input_ids=ids, **kwargs).logits
            got = compiled.module(ids, **kwargs).logits
            assert got.shape == want.shape == (ids.shape[0], ids.shape[1] + V, want.shape[-1])
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
        assert not torch.allclose(compiled.module(ids).logits[:, V:], model(ids).logits, atol=1e-3)
    # greedy: PEFT's cached generate for the first new token; for a longer run PEFT's generate without its
    # cache and its forward step by step (its cached steps after the first do not follow its own forward)
    first = wrapped.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=1, do_sample=False), first)
    longer = compiled.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(longer, wrapped.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False))
    assert torch.equal(longer, _peft_greedy(wrapped, ids, 4))


def test_lifecycle(tmp_path):
    model, args, compiled = _compile()
    assert_param_count(compiled, V * 64)   # v x hidden
    assert_trains(compiled, args)
    before = logits(compiled.module, args)
    with pytest.raises(SpecError, match="virtual tokens in front of the input sequence"):
        compiled.apply(["merge"])
    assert torch.equal(logits(compiled.module, args), before)
    assert_round_trip(compiled, model, args, tmp_path)


def test_remove_and_deactivate_restore_the_graph():
    model, args = hf_llama()
    two = spec("prompt_tuning", ["model.embed_tokens"], num_virtual_tokens=V)
    two["adapters"].append({"name": "other", "type": "lora", "targets": ["*.q_proj"]})   # B = 0: the identity
    compiled = surgeon.compile(model, args, two, KW)
    inserted, want = logits(compiled.module, args), logits(model, args)
    compiled.set_active("other")
    assert adapter_nodes(compiled.module, NAME) == [] and torch.equal(logits(compiled.module, args), want)
    compiled.set_active(NAME, "other")
    assert torch.equal(logits(compiled.module, args), inserted)
    compiled.apply([{"remove": {"adapters": [NAME]}}])
    assert adapter_nodes(compiled.module, NAME) == [] and torch.equal(logits(compiled.module, args), want)


def test_sample_vocab_init_takes_vocabulary_rows():
    model, _, compiled = _compile(init="sample_vocab")
    rows = model.model.embed_tokens.weight.detach()
    prompt = _prompt(compiled).detach()
    assert all(any(torch.equal(p, r) for r in rows) for p in prompt)


def test_refusals():
    with pytest.raises(SurgeonError, match="needs a tokenizer"):
        _compile(init="text")
    model, args = hf_llama()
    with pytest.raises(SurgeonError, match="static length"):
        surgeon.compile(model, args, {**spec("prompt_tuning", ["model.embed_tokens"]), "static_shapes": True,
                                      "verify": False}, KW)
    positions = torch.arange(args[0].shape[1]).expand(args[0].shape[0], -1)
    with pytest.raises(SurgeonError, match="position_ids"):
        surgeon.compile(model, args, {**spec("prompt_tuning", ["model.embed_tokens"]), "verify": False},
                        {**KW, "position_ids": positions})
    assert surgeon.adapters.kinds()["prompt_tuning"].refusal({}).startswith("prompt tuning puts learned virtual")


def test_from_peft_matches_and_exports_back(tmp_path):
    model, args = hf_llama()
    torch.manual_seed(4)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=V, prompt_tuning_init="SAMPLE_VOCAB")).eval()
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.add_(0.3 * torch.randn(V, 64))
        expected = wrapped(input_ids=args[0]).logits
    wrapped.save_pretrained(tmp_path / "peft")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, KW)
    assert torch.equal(_prompt(compiled).detach(), wrapped.prompt_encoder["default"].embedding.weight.detach())
    assert torch.allclose(logits(compiled.module, args), expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _prompt(compiled).mul_(0.5)   # "trained" in surgeon
    want = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export")).eval()
    assert torch.allclose(logits(again, args), want, atol=1e-5, rtol=1e-4)


def test_malformed_peft_checkpoint_is_refused(tmp_path):
    model, args = hf_llama()
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=V))
    wrapped.save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    entry = {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "num_virtual_tokens": V + 1}))
    with pytest.raises(SpecError, match="does not fit num_virtual_tokens=4"):
        surgeon.compile(model, args, entry, KW)
    config.write_text(json.dumps({**data, "num_transformer_submodules": 2}))
    with pytest.raises(SpecError, match="encoder-decoder"):
        surgeon.compile(model, args, entry, KW)
