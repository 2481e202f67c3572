"""generate for an encoder-decoder (transformers' T5): token-for-token parity with transformers + peft.

A tiny random T5 (large init, so its greedy tokens vary) is compiled with a `decoder_input_ids`
example; its generate recomputes the encoder and the decoder's sequence with the compiled module
for each new token. The reference is transformers' own `generate` on the PEFT model carrying the
same random LoRA weights, for a batch of right-padded prompts of different lengths: unmerged, then
merged; EOS in rows finishing at different steps; sampling from the global RNG; a compile without a
dynamic decoder input is refused saying how to compile for generation.
"""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.errors import SurgeonError
from tests.conftest import peft_lora_checkpoint

peft = pytest.importorskip("peft")
NEW = 8
VOCAB = 64


def t5(seed: int = 0):
    """A tiny T5 (decoder start 0 = pad, EOS 1) and its compile example: input ids, decoder input ids."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                   initializer_factor=10.0)
    model = T5ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    return model, (torch.randint(2, VOCAB, (2, 7), generator=gen),), {
        "decoder_input_ids": torch.randint(2, VOCAB, (2, 5), generator=gen)}


def prompts(lengths=(3, 6, 4), seed: int = 3):
    """A right-padded batch (as T5's tokenizer pads): rows of `lengths` real tokens (never pad 0 or EOS 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(2, VOCAB, (length,), generator=gen)
        mask[row, :length] = 1
    return ids, mask


def reference(model, ids, mask, **kwargs):
    """transformers' own generate (greedy unless kwargs say otherwise)."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **{"max_new_tokens": NEW, "do_sample": False, **kwargs})


def ours(compiled, ids, mask, **kwargs):
    out = compiled.generate(ids, attention_mask=mask, **{"max_new_tokens": NEW, **kwargs})
    assert compiled.generator.mode == "recompute" and compiled.generator.encoder_decoder
    return out


@pytest.fixture(scope="module")
def plain():
    """The T5 compiled without adapters (verify=False: export's ranges, from 2, so a batch of one and the
    decoder's first token are padded up to them)."""
    model, args, kwargs = t5()
    return model, surgeon.compile(model, args, {"pipeline": []}, kwargs, verify=False)


def test_lora_unmerged_then_merged_matches_peft(tmp_path):
    model, args, kwargs = t5()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"])
    wrapped = peft_lora_checkpoint(model, config, tmp_path / "a", scale=0.3, seed=7)
    ids, mask = prompts()
    expected = reference(wrapped, ids, mask)
    assert expected.shape == (3, 1 + NEW) and (expected[:, 0] == 0).all()   # the decoder's tokens, not the prompt
    assert not torch.equal(expected, reference(model, ids, mask)), "the adapter should change the tokens"
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "a", "from_peft": str(tmp_path / "a")}]}, kwargs,
                               verify=False)
    note = "recomputes the encoder and the whole decoder sequence for each new token"
    assert any(note in n for n in compiled.report.rows[0].notes)
    assert torch.equal(ours(compiled, ids, mask), expected)
    compiled.apply(["merge"])
    assert compiled.adapters["a"].status == "merged"
    assert not any("lora_A" in n for n, _ in compiled.module.named_parameters())
    assert torch.equal(ours(compiled, ids, mask), expected)
    assert torch.equal(ours(compiled, ids, mask), reference(wrapped.merge_and_unload(), ids, mask))


def test_eos_pads_rows_finishing_at_different_steps(plain):
    model, compiled = plain
    ids, mask = prompts()
    free = reference(model, ids, mask)
    assert torch.equal(ours(compiled, ids, mask), free)
    some = [int(free[1, 3]), int(free[2, 5])]   # tokens rows 1 and 2 make (row 0 may not: it runs on)
    for eos in (some, [int(free[0, 1]), *some]):   # then every row finishes: generation stops early
        expected = reference(model, ids, mask, eos_token_id=eos, pad_token_id=0)
        got = ours(compiled, ids, mask, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, expected)
        ends = [next((i for i in range(1, free.shape[1]) if int(free[row, i]) in eos), None)
                for row in range(free.shape[0])]
        assert len({end for end in ends if end is not None}) >= 2, ends   # rows finish at different steps
        for row, end in enumerate(ends):
            if end is not None:
                assert int(got[row, end]) in eos and (got[row, end + 1:] == 0).all()
        if None not in ends:
            assert got.shape[1] == 1 + max(ends) < 1 + NEW


def test_batch_of_one_start_token_and_max_length(plain):
    model, compiled = plain
    one = torch.tensor([[5, 9, 3]])
    assert torch.equal(compiled.module.generate(one, max_new_tokens=5), reference(model, one, None, max_new_tokens=5))
    assert torch.equal(compiled.generate(input_ids=one, max_length=4, decoder_start_token_id=7),
                       reference(model, one, None, max_new_tokens=None, max_length=4, decoder_start_token_id=7))
    assert torch.equal(compiled.generate(one, max_new_tokens=0), torch.zeros(1, 1, dtype=torch.long))


def test_sampling_is_seeded_and_draws_like_transformers(plain):
    model, compiled = plain
    ids, mask = prompts()
    options = dict(do_sample=True, top_k=20, temperature=20.0)   # the random model's logits are large (std ~100)
    seeded = ours(compiled, ids, mask, generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(seeded, ours(compiled, ids, mask, generator=torch.Generator().manual_seed(3), **options))
    assert seeded.shape == (3, 1 + NEW) and ((seeded >= 0) & (seeded < VOCAB)).all()
    torch.manual_seed(11)
    got = ours(compiled, ids, mask, **options)
    torch.manual_seed(11)
    expected = reference(model, ids, mask, **options)
    assert torch.equal(got, expected)   # the same draws from the same distributions
    assert not torch.equal(got, reference(model, ids, mask))


@pytest.mark.parametrize("how,message", [
    ("labels", "compiled without a decoder_input_ids input"),
    ("static", "length was captured static at 5"),
])
def test_a_compile_that_cannot_grow_the_decoder_says_how_to_compile(how, message):
    model, args, kwargs = t5()
    if how == "labels":   # the decoder's input made inside the model, from labels
        compiled = surgeon.compile(model, args, {"pipeline": []}, {"labels": kwargs["decoder_input_ids"]},
                                   verify=False)
    else:
        compiled = surgeon.compile(model, args, {"pipeline": []}, kwargs, dynamic=False, verify=False)
    assert compiled.generator.mode == "unsupported"
    assert any(message in n for n in compiled.report.rows[0].notes)
    ids, mask = prompts()
    with pytest.raises(SurgeonError, match=f"{message}.*example_kwargs=.*'decoder_input_ids'"):
        compiled.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_a_verified_compile_with_an_attention_mask_input():
    model, args, kwargs = t5(seed=1)
    kwargs["attention_mask"] = torch.ones_like(args[0])
    compiled = surgeon.compile(model, args, {"pipeline": []}, kwargs)   # verified: sizes from 1 where they agree
    shapes = compiled.module.meta["surgeon_inputs"].shapes
    assert shapes["decoder_input_ids"][1].low == 1 and shapes["input_ids"][0].low == 1   # nothing padded up
    ids, mask = prompts(lengths=(2, 5, 1, 4))
    assert torch.equal(ours(compiled, ids, mask), reference(model, ids, mask))
    assert torch.equal(ours(compiled, ids[2:3, :1], mask[2:3, :1]), reference(model, ids[2:3, :1], mask[2:3, :1]))


def test_bart_with_its_forced_eos_matches_transformers():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     dropout=0.0, attention_dropout=0.0, init_std=0.5)
    model = BartForConditionalGeneration(cfg).eval()
    assert model.generation_config.forced_eos_token_id == 2   # the last new token is forced to EOS
    gen = torch.Generator().manual_seed(0)
    args, kwargs = (torch.randint(3, VOCAB, (2, 7), generator=gen),), {
        "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=gen)}
    compiled = surgeon.compile(model, args, {"pipeline": []}, kwargs, verify=False)
    ids, mask = prompts()
    ids = ids.masked_fill(mask == 0, cfg.pad_token_id)   # BART pads with 1
    expected = reference(model, ids, mask)
    assert (expected[:, 0] == 2).all() and (expected[:, -1] == 2).all()
    assert torch.equal(ours(compiled, ids, mask), expected)
    for options in ({"forced_bos_token_id": 0}, {"forced_bos_token_id": 0, "max_new_tokens": 1}):
        assert torch.equal(ours(compiled, ids, mask, **options), reference(model, ids, mask, **options))
