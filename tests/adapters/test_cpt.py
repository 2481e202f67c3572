"""CPT: the embeddings of given tokens plus offsets projected into small balls, in front of the input embeddings.

Against PEFT's CPTConfig on HF LLaMA (GQA) and GPT-2: logits (n + v positions) with and without an attention mask,
the projection PEFT writes back into the offsets, the gradient the offsets get (zero on label tokens), greedy
generate (PEFT's generate(use_cache=False)), PEFT import and export; the lifecycle (only the offsets train, merge
refused with the reason, safetensors round trip) and the refusals (bad token ids or type mask, a bad checkpoint).
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
from tests.passes.helpers import logits

IDS, TYPES = [5, 9, 17, 3], [1, 2, 3, 4]   # template, input, template, label (the label token does not move)
peft = pytest.importorskip("peft")


def hf_llama():
    """tests.conftest's LLaMA (GQA) with one layer: the rewrite is the same, the captures are quicker."""
    return _hf_llama(layers=1)


def _compile(factory=hf_llama, targets=("model.embed_tokens",), **options):
    model, args = factory()
    options = {"cpt_token_ids": IDS, "cpt_tokens_type_mask": TYPES, **options}
    return model, args, surgeon.compile(model, args, spec("cpt", targets, **options), KW)


def _param(compiled, name):
    (param,) = [p for n, p in compiled.module.named_parameters() if n.endswith(name)]
    return param


def _peft(model):
    config = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=IDS, cpt_tokens_type_mask=TYPES,
                            opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.2)
    return peft.get_peft_model(copy.deepcopy(model), config)


@pytest.mark.parametrize("factory,target", [(hf_llama, "model.embed_tokens"), (hf_gpt2, "transformer.wte")])
def test_logits_projection_gradient_and_generate_match_peft(factory, target):
    model, args, compiled = _compile(factory, (target,), opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.2)
    assert compiled.report.rows[-1].check == "changes function"
    wrapped = _peft(model)
    encoder = wrapped.prompt_encoder["default"]
    assert torch.equal(_param(compiled, "cpt_embedding"), encoder.embedding.weight)   # the tokens' own rows
    delta = _param(compiled, "cpt_delta")
    with torch.no_grad():
        delta.copy_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(1)))   # far outside the balls
        encoder.delta_embedding.weight.copy_(delta)
    ids = args[0]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0   # left padding in row 0
    compiled.module.train()
    for kwargs in ({}, {"attention_mask": mask}):
        want = wrapped(input_ids=ids, **kwargs).logits
        got = compiled.module(ids, **kwargs).logits
        assert got.shape == want.shape == (ids.shape[0], ids.shape[1] + len(IDS), want.shape[-1])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
        # both wrote the projection back into the offsets
        assert torch.allclose(delta, encoder.delta_embedding.weight, atol=1e-7)
        assert delta.norm(dim=1).max() < 0.3 * (delta.shape[1] / 2048) ** 0.5 + 1e-6
        want.square().mean().backward()
        got.square().mean().backward()
        assert torch.allclose(delta.grad, encoder.delta_embedding.weight.grad, atol=1e-6, rtol=1e-4)
        assert torch.equal(delta.grad[3], torch.zeros_like(delta.grad[3])) and delta.grad[:3].abs().sum() > 0
        delta.grad = encoder.delta_embedding.weight.grad = None
    compiled.module.eval()
    wrapped.eval()
    got = compiled.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, wrapped.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False))


def test_lifecycle(tmp_path):
    model, args, compiled = _compile(cpt_tokens_type_mask=[1, 2, 3, 1])   # every token moves
    assert_param_count(compiled, len(IDS) * 64)   # the offsets, v x hidden; the tokens' rows are frozen
    assert not _param(compiled, "cpt_embedding").requires_grad
    assert_trains(compiled, args)
    before = logits(compiled.module, args)
    with pytest.raises(SpecError, match="virtual tokens in front of the input sequence"):
        compiled.apply(["merge"])
    assert torch.equal(logits(compiled.module, args), before)
    assert_round_trip(compiled, model, args, tmp_path)


def test_refusals():
    with pytest.raises(SurgeonError, match="cpt_token_ids must be a non-empty list"):
        _compile(cpt_token_ids=[])
    with pytest.raises(SurgeonError, match=r"cpt_token_ids \[128\] are outside the embedding's 128 rows"):
        _compile(cpt_token_ids=[1, 128, 2, 3])
    with pytest.raises(SurgeonError, match="cpt_tokens_type_mask must be a list of 4 integers"):
        _compile(cpt_tokens_type_mask=[1, 2])


def test_from_peft_matches_and_exports_back(tmp_path):
    model, args = hf_llama()
    ids = args[0]
    wrapped = _peft(model)
    encoder = wrapped.prompt_encoder["default"]
    with torch.no_grad():
        encoder.delta_embedding.weight.normal_(generator=torch.Generator().manual_seed(2))
        expected = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path / "peft")
    imported = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, KW)
    assert imported.adapters[NAME].spec.type == "prompt_tuning"   # PEFT keeps the prompt only
    assert torch.allclose(logits(imported.module, args), expected, atol=1e-5, rtol=1e-4)
    # a cpt adapter exports as CPT: PEFT loads the prompt and runs it as surgeon does
    _, _, compiled = _compile(opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.2)
    with torch.no_grad():
        _param(compiled, "cpt_delta").normal_(generator=torch.Generator().manual_seed(3))
    want = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    saved = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CPT" and saved["cpt_token_ids"] == IDS and saved["cpt_tokens_type_mask"] == TYPES
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export")).eval()
    assert torch.allclose(logits(again, args), want, atol=1e-5, rtol=1e-4)


def test_malformed_peft_checkpoint_is_refused(tmp_path):
    model, args = hf_llama()
    _peft(model).save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "num_virtual_tokens": len(IDS) + 1}))
    with pytest.raises(SpecError, match="prompt_embeddings of shape .* does not fit num_virtual_tokens=5"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
