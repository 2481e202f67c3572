"""Trainable tokens: chosen rows of an embedding table retrained; exact insert, merge that writes the rows
bit for bit (and unmerge that gives the originals back), a tied lm_head that reads the new rows as PEFT's
does, PEFT import / export with PEFT's outputs before and after merge, and generation over the KV-cache
graphs with PEFT's tokens."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity,
                                    randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits

# hf_llama's first prompt row starts 44, 47, 117: ids the example uses (so their rows get gradients) and 2 it
# does not; hidden 64, so a site trains 5 * 64
IDS = [2, 44, 47, 117, 120]


def tied_llama(seed: int = 0):
    """hf_llama with its lm_head tied to the embedding (one tensor: the head reads the embedding's table)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, (torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed)),)


def test_lifecycle(tmp_path):
    model, args, compiled = compile_kind("trainable_tokens", ["*.embed_tokens"], token_indices=IDS)
    assert [s.path for s in compiled.adapters[NAME].sites] == ["model.embed_tokens.weight"]
    assert_identity_insert(compiled, model, args)   # the rows start as the table's own
    assert_param_count(compiled, 5 * 64)            # ids and original rows are frozen
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_merge_writes_the_rows_bit_for_bit_and_leaves_the_rest():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "trainable_tokens",
                                                           "targets": ["*.embed_tokens"], "token_indices": IDS}]},
                               KW, verify=False)
    site = compiled.adapters[NAME].sites[0]
    table, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    rows = torch.full((5, 64), 1e-9).index_fill_(1, torch.arange(0, 64, 3), -7.5)   # far from the table's values
    with torch.no_grad():
        compiled.module.get_parameter(site.params["trainable_tokens_delta"]).copy_(rows)
    adapted = logits(compiled.module, args)
    compiled.apply(["merge"])
    merged = get_tensor(compiled.module, "model.embed_tokens.weight")
    assert torch.equal(merged[IDS], rows)
    others = [i for i in range(128) if i not in IDS]
    assert torch.equal(merged[others], table[others])
    assert torch.equal(get_tensor(compiled.module, "lm_head.weight"), head)   # untied: PEFT leaves it too
    assert torch.equal(logits(compiled.module, args), adapted)
    compiled.apply(["unmerge"])
    assert torch.equal(get_tensor(compiled.module, "model.embed_tokens.weight"), table)


def test_a_tied_head_reads_the_new_rows_and_stays_tied_through_merge():
    # GPT-2 ties lm_head to transformer.wte: one tensor, read by the lookup and by the head's linear
    model, args, compiled = compile_kind("trainable_tokens", ["*.wte"], factory=hf_gpt2, token_indices=[1, 5, 90])
    site = compiled.adapters[NAME].sites[0]
    assert (site.path, site.weight) == ("transformer.wte.weight", "lm_head.weight")
    with torch.no_grad():
        compiled.module.get_parameter(site.params["trainable_tokens_delta"]).mul_(-2)
    adapted = logits(compiled.module, args)
    # the head scores tokens 1, 5, 90 with their new rows (their logits change even where no input used them)
    base = logits(model, args)
    assert not torch.allclose(adapted[..., [1, 5, 90]], base[..., [1, 5, 90]])
    compiled.apply(["merge"])
    module = compiled.module
    assert module.transformer.wte.weight is module.lm_head.weight   # still one tensor under both names
    assert torch.equal(logits(module, args), adapted)


def test_targets_select_embeddings_only():
    with pytest.raises(surgeon.SpecError, match="select no embedding op"):
        compile_kind("trainable_tokens", ["*.q_proj"], token_indices=[1])


@pytest.mark.parametrize("ids, why", [([3, 3], "repeated ids"), ([1, 128], "outside the embedding's 128 rows"),
                                      (None, "non-empty list of integers")])
def test_bad_token_indices_are_refused(ids, why):
    with pytest.raises(surgeon.PassError, match=why):   # the insert pass names the kind and the ids
        compile_kind("trainable_tokens", ["*.embed_tokens"], token_indices=ids)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("trainable_tokens", ["*.embed_tokens"], token_indices=IDS, init="random")
    assert compiled.report.rows[-1].check == "changes function"


def test_peft_parity_and_export(tmp_path):
    peft = pytest.importorskip("peft")
    compiled = peft_parity(peft.TrainableTokensConfig(token_indices=IDS), tmp_path / "in")
    assert compiled.adapters[NAME].spec.options["token_indices"] == IDS
    compiled.apply(["unmerge"])
    model, args = hf_llama()
    peft_export(compiled, model, args, tmp_path / "out")


def test_peft_parity_with_a_tied_head(tmp_path):
    """PEFT wraps a tied lm_head too (sharing the embedding's rows) and saves its copy: the import checks and
    drops the copy, and the compiled graph's head, reading the same table, matches PEFT before and after merge;
    the export (rows under the embedding only) loads in PEFT with the same outputs."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    compiled = peft_parity(peft.TrainableTokensConfig(token_indices=IDS), tmp_path / "in", factory=tied_llama)
    assert any("lm_head" in key for key in load_file(tmp_path / "in" / "adapter_model.safetensors"))
    assert [s.path for s in compiled.adapters[NAME].sites] == ["model.embed_tokens.weight"]
    compiled.apply(["unmerge"])
    model, args = tied_llama()
    peft_export(compiled, model, args, tmp_path / "out")


def test_a_malformed_checkpoint_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.TrainableTokensConfig(token_indices=IDS), tmp_path,
                                                factory=tied_llama)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key, head = ("base_model.model.model.embed_tokens.trainable_tokens_delta",
                 "base_model.model.lm_head.trainable_tokens_delta")
    spec = {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}
    save_file({**tensors, key: tensors[key][:3], head: tensors[head][:3]}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match=r"module 'lm_head': trainable_tokens_delta of shape \[3, 64\] does "
                                                r"not hold one row for each of the 5 token_indices"):
        surgeon.compile(model, args, spec, KW)
    save_file({**tensors, head: tensors[head] + 1}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="module 'lm_head' is not in target_modules"):
        surgeon.compile(model, args, spec, KW)


def test_generate_matches_peft(tmp_path):
    """Greedy generation over the prefill / decode graphs with the rows inserted (and then merged) gives
    PEFT's tokens, on the tied model, where the new rows also score the next token."""
    peft = pytest.importorskip("peft")
    prompt = torch.tensor([[44, 47, 117, 5], [2, 120, 9, 31]])
    config = peft.TrainableTokensConfig(token_indices=IDS)
    model, args, wrapped = randomized_peft_checkpoint(config, tmp_path, scale=1.0, factory=tied_llama)
    with torch.no_grad():
        want = wrapped.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        base = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(want, base)   # the rows change what is generated
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW,
                               verify=False)
    assert torch.equal(compiled.generate(prompt, max_new_tokens=6, pad_token_id=0), want)
    assert compiled.generator.mode == "cache", compiled.generator.notes
    compiled.apply(["merge"])
    assert torch.equal(compiled.generate(prompt, max_new_tokens=6, pad_token_id=0), want)
