"""generate without a KV cache: the recompute path (models whose forward takes no cache, and the fallback
when the cache graphs cannot be used), the models that do not generate, and bad calls."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.errors import SurgeonError
from surgeon.models import tiny_llama
from tests.conftest import hf_bert, hf_llama, lora_spec, randomize_adapters, small_cnn


def greedy(module, ids, new):
    """The plain loop: the module on the whole sequence, argmax at the last position, append."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, module(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture(scope="module")
def tiny():
    model, (ids,) = tiny_llama(seed=0, vocab_size=96, hidden_size=32, intermediate_size=64)
    compiled = surgeon.compile(model, (ids[:, :8],), lora_spec(["*.q_proj", "*.v_proj"]))
    randomize_adapters(compiled.module)
    return compiled, ids[:, :8]


def test_a_model_without_a_cache_recomputes_and_says_so(tiny):
    compiled, ids = tiny
    assert compiled.generator.mode == "recompute"
    note = "recomputes the full sequence for each new token"
    assert any(note in n for n in compiled.report.rows[0].notes)   # the report's capture row
    assert any(note in n for n in compiled.generator.notes)
    got = compiled.module.generate(ids, max_new_tokens=5)
    assert torch.equal(got, greedy(compiled.module, ids, 5))
    assert torch.equal(compiled.generate(ids, max_new_tokens=5), got)


def test_left_padded_rows_match_each_prompt_alone(tiny):
    compiled, ids = tiny
    rows = [ids[0, :5], ids[1, :3], ids[0, 2:7]]
    padded = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, 5 - len(row):], mask[i, 5 - len(row):] = row, 1
    got = compiled.generate(padded, attention_mask=mask, max_new_tokens=4)
    for i, row in enumerate(rows):
        assert torch.equal(got[i, 5:], greedy(compiled.module, row[None], 4)[0, len(row):])


def test_eos_on_the_recompute_path_pads_and_stops(tiny):
    compiled, ids = tiny
    free = compiled.generate(ids, max_new_tokens=6)
    eos = int(free[0, 9])
    got = compiled.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert got[0, 9] == eos and (got[0, 10:] == 0).all()
    if eos not in free[1, 8:].tolist():
        assert got.shape[1] == 14 and torch.equal(got[1], free[1])


def test_generation_keeps_the_training_mode_and_grad_mode(tiny):
    compiled, ids = tiny
    compiled.module.train()
    try:
        compiled.generate(ids, max_new_tokens=1)
        assert compiled.module.training and torch.is_grad_enabled()
    finally:
        compiled.module.eval()


def test_an_hf_model_falls_back_when_the_cache_graphs_cannot_be_captured(monkeypatch):
    import surgeon.generate as generate

    model, args = hf_llama()
    compiled = surgeon.compile(model, args, {"pipeline": []}, {"use_cache": False})
    ids = torch.tensor([[0, 0, 7, 8, 9], [3, 4, 5, 6, 7]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=3, use_cache=False), expected)
    assert compiled.generator.graphs is None   # use_cache=False never builds them

    def refuse(*args, **kwargs):
        raise RuntimeError("no export today")

    monkeypatch.setattr(generate, "capture", refuse)
    with pytest.warns(UserWarning, match="could not be used.*no export today"):
        got = compiled.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert compiled.generator.mode == "recompute" and torch.equal(got, expected)


def test_models_that_do_not_generate_have_no_generator():
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, {"pipeline": []})
    assert compiled.generator is None
    with pytest.raises(SurgeonError, match="has no generator"):
        compiled.module.generate(torch.zeros(1, 3, dtype=torch.long))
    model, args, kwargs = hf_bert()
    assert surgeon.compile(model, args, {"pipeline": []}, kwargs, verify=False).generator is None


def test_an_encoder_decoder_without_a_decoder_input_says_how_to_compile_it():
    from transformers import T5Config, T5ForConditionalGeneration

    from surgeon.generate import generator_for

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0)).eval()
    generator = generator_for(model, None, None, [])   # no graph inputs: none takes the decoder's tokens
    assert generator.mode == "unsupported"
    with pytest.raises(SurgeonError, match="encoder-decoder.*example_kwargs=.*'decoder_input_ids'"):
        generator.generate(None, torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("kwargs,message", [
    ({"num_beams": 2}, "unsupported argument num_beams"),
    ({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, "pass the prompt once"),
    ({"attention_mask": torch.ones(2, 7)}, "attention_mask must have the shape"),
    ({"attention_mask": torch.zeros(1, 8, dtype=torch.long).expand(2, 8)}, "has no tokens"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
    ({"do_sample": True, "temperature": 0.0}, "temperature must be a strictly positive"),
    ({"do_sample": True, "top_p": 1.5}, "top_p must be in"),
])
def test_bad_calls_are_surgeon_errors(tiny, kwargs, message):
    compiled, ids = tiny
    with pytest.raises(SurgeonError, match=message):
        compiled.generate(ids, **kwargs)
    with pytest.raises(SurgeonError, match="2-D integer tensor"):
        compiled.generate(ids[0])
