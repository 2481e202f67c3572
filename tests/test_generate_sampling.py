"""Sampling follows transformers: its temperature / top-k / top-p warpers on the same logits give the same
scores, settings resolve from the call, then the generation config, then transformers' defaults, and
sampled generation is seeded by a torch.Generator or the global RNG."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.generate import DEFAULTS, Settings, choose, process_logits, resolve
from tests.conftest import hf_llama

pytest.importorskip("transformers")


def transformers_warpers(temperature=1.0, top_k=0, top_p=1.0):
    """The warpers transformers' _get_logits_processor appends for sampling, in its order."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return chain


def logits(seed=0):
    scores = torch.randn(4, 40, generator=torch.Generator().manual_seed(seed)) * 3
    scores[1, :6] = scores[1, 6]   # ties at the top-k boundary
    scores[2] = 0.0                # a flat row: top-p keeps what transformers keeps
    return scores


@pytest.mark.parametrize("options", [
    dict(temperature=0.7), dict(temperature=1.5), dict(top_k=5), dict(top_k=1), dict(top_k=500),
    dict(top_p=0.8), dict(top_p=0.0), dict(top_p=0.999), dict(temperature=0.6, top_k=12, top_p=0.9),
    dict(temperature=2.0, top_k=7), dict(top_k=3, top_p=0.5),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_warpers_match_transformers_on_the_same_logits(options, seed):
    scores = logits(seed)
    expected = transformers_warpers(**options)(torch.zeros(4, 1, dtype=torch.long), scores.clone())
    got = process_logits(scores.clone(), **options)
    assert torch.equal(got, expected)
    assert torch.equal(got.isinf(), expected.isinf())


def test_settings_resolve_like_transformers():
    from transformers import GenerationConfig

    plain = resolve({"do_sample": True}, [GenerationConfig()], prompt_length=3)
    assert (plain.temperature, plain.top_k, plain.top_p) == (DEFAULTS["temperature"], 50, 1.0)
    assert plain.max_new_tokens == 20 - 3   # max_length 20 in all, as transformers' default
    model_config = GenerationConfig(top_k=3, temperature=0.5, eos_token_id=[4, 5], max_new_tokens=9)
    tuned = resolve({"do_sample": True, "temperature": 0.8}, [None, model_config], prompt_length=3)
    assert (tuned.temperature, tuned.top_k, tuned.eos, tuned.max_new_tokens) == (0.8, 3, (4, 5), 9)
    assert tuned.pad == 4   # no pad token: the first EOS pads, as transformers does
    assert resolve({"max_length": 10}, [], prompt_length=4).max_new_tokens == 6


def test_choose_is_greedy_without_sampling_and_seeded_with_it():
    scores = logits()
    greedy = Settings(3, False, 1.0, 50, 1.0, (), 0)
    assert torch.equal(choose(scores, greedy), scores.argmax(-1))
    sample = Settings(3, True, 1.0, 0, 1.0, (), 0)
    first = choose(scores, sample, torch.Generator().manual_seed(5))
    assert torch.equal(first, choose(scores, sample, torch.Generator().manual_seed(5)))
    top1 = Settings(3, True, 1.0, 1, 1.0, (), 0)
    assert torch.equal(choose(scores[[0, 3]], top1, torch.Generator().manual_seed(1)), scores[[0, 3]].argmax(-1))


def test_sampled_generation_is_seeded_and_uses_the_global_rng_like_transformers():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, {"pipeline": []}, {"use_cache": False}, verify=False)
    ids = torch.tensor([[5, 9, 3, 7], [0, 0, 4, 2]])
    mask = (ids != 0).long()
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    seeded = compiled.generate(ids, generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(seeded, compiled.generate(ids, generator=torch.Generator().manual_seed(3), **options))
    assert compiled.generator.mode == "cache"
    torch.manual_seed(11)
    ours = compiled.generate(ids, **options)
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = model.generate(ids, **options)
    assert torch.equal(ours, theirs)   # the same draws from the same distributions
