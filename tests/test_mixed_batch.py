"""Mixed batches: one adapter per row (`adapter_names=[...]`, PEFT's convention) in the compiled module's
forward and in generate, against PEFT's own mixed-batch inference on the same adapters (tiny LLaMA with
grouped-query heads and GPT-2), two adapters with different targets, ranks and scales (one rsLoRA);
`__base__` rows equal to the base model; a batch of one adapter equal to `set_active` of it; the other
kinds that join (LoRA-XS, VeRA, IA3 on output and input) row by row against `set_active`; the refusals.
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.errors import SurgeonError
from tests.conftest import hf_gpt2, hf_llama, peft_lora_checkpoint, randomize_adapters

peft = pytest.importorskip("peft")
KW = {"use_cache": False}
NEW = 6
CASES = {   # two adapters each: different module sets (one shared), ranks, alphas, and rsLoRA on one
    "llama": (hf_llama, dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
              dict(target_modules=["v_proj", "o_proj", "down_proj"], r=8, lora_alpha=4, use_rslora=True)),
    "gpt2": (hf_gpt2, dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
             dict(target_modules=["c_attn", "c_fc"], r=2, lora_alpha=6, use_rslora=True, fan_in_fan_out=True)),
}


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def setup(case, tmp_path):
    """The base model, its example, PEFT with adapters a and b loaded, and surgeon's compile of both."""
    factory, a, b = CASES[case]
    model, args = factory()
    for name, options, seed in (("a", a, 7), ("b", b, 11)):
        config = peft.LoraConfig(lora_dropout=0.0, **options)
        peft_lora_checkpoint(model, config, tmp_path / name, scale=0.3, seed=seed)
    both = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a", adapter_name="a").eval()
    both.load_adapter(tmp_path / "b", adapter_name="b")
    spec = {"adapters": [{"name": n, "from_peft": str(tmp_path / n)} for n in ("a", "b")]}
    compiled = surgeon.compile(model, args, spec, KW, verify=False)
    return model, both, compiled


def batch(vocab: int, rows: int = 5, length: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def prompts(vocab: int, lengths=(3, 6, 4, 5, 2), seed: int = 5):
    """A left-padded batch of prompts (pad id 0) and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(1, vocab, (length,), generator=gen)
        mask[row, width - length:] = 1
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_peft_mixed_batch(case, tmp_path):
    model, both, compiled = setup(case, tmp_path)
    ids = batch(model.config.vocab_size)
    names = ["a", "__base__", "b", "a", "b"]
    code = compiled.module.code
    with torch.no_grad():
        expected = both(ids, adapter_names=names).logits
        got = logits(compiled.module(ids, adapter_names=names))
        base = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], base[0], atol=1e-3) and not torch.allclose(expected[2], base[2], atol=1e-3)
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)   # the __base__ row: the base model
    assert compiled.module.code == code   # the user's graph is left as it was
    with torch.no_grad():   # without adapter_names (or None): the plain call, both adapters active as before
        assert torch.equal(logits(compiled.module(ids, adapter_names=None)), logits(compiled.module(ids)))


@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_matches_peft_mixed_batch(case, tmp_path):
    model, both, compiled = setup(case, tmp_path)
    ids, mask = prompts(model.config.vocab_size)
    names = ["b", "a", "__base__", "b", "a"]
    with torch.no_grad():
        expected = both.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, adapter_names=names)
        base = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, adapter_names=names)
    assert compiled.generator.mode == "cache", compiled.generator.notes
    assert torch.equal(got, expected)
    assert torch.equal(got[2], base[2])
    assert not torch.equal(expected[[0, 1, 3, 4]], base[[0, 1, 3, 4]]), "the adapters should change the tokens"


def test_every_row_one_adapter_equals_set_active(tmp_path):
    model, both, compiled = setup("llama", tmp_path)
    ids = batch(model.config.vocab_size, rows=3)
    with torch.no_grad():
        mixed_b = logits(compiled.module(ids, adapter_names=["b"] * 3))
        base = logits(compiled.module(ids, adapter_names=["__base__"] * 3))
        compiled.set_active("b")
        assert torch.equal(mixed_b, logits(compiled.module(ids)))
        compiled.set_active()
        assert torch.equal(base, logits(compiled.module(ids)))
        torch.testing.assert_close(base, model(ids).logits, rtol=1e-5, atol=1e-5)
        # the mixed graph follows the adapters' states: with b parked it still serves b's rows
        again = logits(compiled.module(ids, adapter_names=["b", "__base__", "a"]))
    compiled.set_active("a", "b")
    with torch.no_grad():
        expected = both(ids, adapter_names=["b", "__base__", "a"]).logits
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_other_kinds_join_row_by_row():
    """LoRA-XS, VeRA, IA3 (output and input scale) and LoRA in one batch: each row equals its adapter alone."""
    model, (ids,) = hf_llama()
    spec = {"adapters": [{"name": "xs", "type": "lora-xs", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
                         {"name": "vera", "type": "vera", "targets": ["*.q_proj", "*.up_proj"], "rank": 8},
                         {"name": "scale", "type": "ia3", "targets": ["*.k_proj", "*.v_proj"]},
                         {"name": "ff", "type": "ia3", "targets": ["*.down_proj"], "on": "input"},
                         {"name": "lora", "type": "lora", "targets": ["*.v_proj"], "rank": 2, "alpha": 4}]}
    compiled = surgeon.compile(model, (ids,), spec, KW, verify=False)
    randomize_adapters(compiled.module)
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad and p.dim() == 1:   # IA3 and VeRA scales around 1, not 0
                p.add_(1.0)
    names = ["ff", "xs", "__base__", "vera", "scale", "lora", "xs"]
    x = batch(128, rows=len(names), length=5)
    with torch.no_grad():
        got = logits(compiled.module(x, adapter_names=names))
        for name in ("xs", "vera", "scale", "ff", "lora"):
            compiled.set_active(name)
            alone = logits(compiled.module(x))
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(got[rows], alone[rows], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(alone[rows], model(x).logits[rows], atol=1e-3)
        torch.testing.assert_close(got[2], model(x).logits[2], rtol=1e-5, atol=1e-5)


def _two_lora(extra: dict | None = None, pipeline=None):
    model, (ids,) = hf_llama()
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 4},
                         {"name": "b", "type": "lora", "targets": ["*.v_proj"], "rank": 2},
                         *([extra] if extra else [])]}
    if pipeline:
        spec["pipeline"] = pipeline
    return surgeon.compile(model, (ids,), spec, KW, verify=False), ids


def test_refuses_unknown_names_and_wrong_length():
    compiled, ids = _two_lora()
    with pytest.raises(SurgeonError, match=r"no adapter named 'c'.*'__base__', 'a', 'b'"):
        compiled.module(ids, adapter_names=["a", "c"])
    with pytest.raises(SurgeonError, match="3 names but the batch has 2 rows"):
        compiled.module(ids, adapter_names=["a", "b", "a"])
    with pytest.raises(SurgeonError, match="one per row"):
        compiled.module(ids, adapter_names="a")
    with pytest.raises(SurgeonError, match="1 names but the batch has 2 rows"):
        compiled.generate(ids, max_new_tokens=2, adapter_names=["a"])


def test_refuses_kinds_and_states_that_cannot_join():
    compiled, ids = _two_lora({"name": "d", "type": "dora", "targets": ["*.k_proj"], "rank": 2})
    with pytest.raises(SurgeonError, match=r"adapter 'd' \(dora, inserted\) cannot join a mixed batch: a 'dora' "
                                           r"adapter is not a per-row"):
        compiled.module(ids, adapter_names=["a", "d"])
    with torch.no_grad():   # a kind that cannot join may sit in the model: rows not naming it never see it
        compiled.module(ids, adapter_names=["a", "b"])
    compiled.module.train()
    with pytest.raises(SurgeonError, match="eval mode only"):
        compiled.module(ids, adapter_names=["a", "b"])
    compiled.module.eval()
    compiled.apply([{"merge": {"adapters": ["b"]}}])
    with pytest.raises(SurgeonError, match=r"adapter 'b' \(lora, merged\).*merged into the base weights.*"
                                           r"'__base__' rows"):
        compiled.module(ids, adapter_names=["a", "__base__"])
    with pytest.raises(SurgeonError, match=r"adapter 'b' \(lora, merged\) cannot join"):
        compiled.generate(ids, max_new_tokens=2, adapter_names=["a", "b"])


def test_refuses_a_base_rewriting_init():
    compiled, ids = _two_lora({"name": "p", "type": "lora", "targets": ["*.k_proj"], "rank": 2, "init": "pissa"})
    with pytest.raises(SurgeonError, match=r"adapter 'p'.*pissa init rewrote the base weight"):
        compiled.module(ids, adapter_names=["a", "b"])
