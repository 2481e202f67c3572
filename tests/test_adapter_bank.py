"""The run-time adapter bank: `compiled.load_adapter(path, name)` / `unload_adapter(name)` without recapture.

A loaded adapter (PEFT's folder or surgeon's) equals the same adapter given in the compile's spec, in plain
calls once active, in mixed batches against PEFT's, and in generate (whose cache graphs get it too);
loading leaves plain calls as they were (the adapter is parked, as PEFT's load_adapter); unloading takes
its parameters out; the bank's memory is reported; refusals change nothing.
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.errors import SpecError
from tests.conftest import hf_llama, peft_lora_checkpoint, randomize_adapters

peft = pytest.importorskip("peft")
KW = {"use_cache": False}


def folders(model, tmp_path):
    """Two PEFT LoRA folders with random weights: a on q/v (r 4), b on v/o/down (r 8, rsLoRA)."""
    for name, options, seed in (("a", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8), 7),
                                ("b", dict(target_modules=["v_proj", "o_proj", "down_proj"], r=8, lora_alpha=4,
                                           use_rslora=True), 11)):
        peft_lora_checkpoint(model, peft.LoraConfig(lora_dropout=0.0, **options), tmp_path / name, scale=0.3,
                             seed=seed)


def test_loaded_adapters_equal_compiled_ones_and_peft(tmp_path):
    model, args = hf_llama()
    folders(model, tmp_path)
    (ids,) = args
    bare = surgeon.compile(model, args, {"pipeline": []}, KW)
    with torch.no_grad():
        base = bare.module(ids).logits
        bare.load_adapter(tmp_path / "a", "a")
        bare.load_adapter(tmp_path / "b", "b")
        # loaded, not switched on: plain calls are the base model's
        assert {n: s.status for n, s in bare.adapters.items()} == {"a": "inactive", "b": "inactive"}
        assert torch.equal(bare.module(ids).logits, base)
        both = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a", adapter_name="a").eval()
        both.load_adapter(tmp_path / "b", adapter_name="b")
        rows = torch.randint(1, 128, (4, 6), generator=torch.Generator().manual_seed(2))
        names = ["b", "__base__", "a", "b"]
        expected = both(input_ids=rows, adapter_names=names).logits
        torch.testing.assert_close(bare.module(rows, adapter_names=names).logits, expected, rtol=1e-5, atol=1e-5)
        for name in ("a", "b"):   # switched on: the same as the adapter given in the compile's spec
            given = surgeon.compile(model, args, {"adapters": [{"name": name, "from_peft": str(tmp_path / name)}]},
                                    KW)
            bare.set_active(name)
            assert torch.equal(bare.module(ids).logits, given.module(ids).logits)
    sizes = bare.adapter_bytes()
    a_params = sum(4 * (64 + out) for out in (64, 32)) * 2          # q (64->64), v (64->32); 2 layers
    b_params = sum(8 * (inp + out) for inp, out in ((64, 32), (64, 64), (128, 64))) * 2
    assert sizes == {"a": a_params * 4, "b": b_params * 4}


def test_generate_sees_loaded_and_unloaded_adapters(tmp_path):
    model, args = hf_llama()
    folders(model, tmp_path)
    compiled = surgeon.compile(model, args, {"pipeline": []}, KW)
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    before = compiled.generate(prompt, max_new_tokens=6)        # builds the cache graphs
    compiled.load_adapter(tmp_path / "a", "a", active=True)
    with_a = compiled.generate(prompt, max_new_tokens=6)
    given = surgeon.compile(model, args, {"adapters": [{"name": "a", "from_peft": str(tmp_path / "a")}]}, KW)
    assert torch.equal(with_a, given.generate(prompt, max_new_tokens=6))
    assert not torch.equal(with_a, before)
    compiled.unload_adapter("a")
    assert compiled.adapters["a"].status == "removed" and compiled.adapter_bytes() == {"a": 0}
    assert not [n for n, _ in compiled.module.named_parameters() if "adapter_a" in n]
    assert torch.equal(compiled.generate(prompt, max_new_tokens=6), before)


def test_unloading_a_parked_adapter_and_the_refusals(tmp_path):
    model, args = hf_llama()
    folders(model, tmp_path)
    (ids,) = args
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "d", "type": "dora", "targets": ["*.q_proj"],
                                                           "rank": 2}]}, KW)
    randomize_adapters(compiled.module)
    with torch.no_grad():
        expected = compiled.module(ids).logits
    compiled.load_adapter(tmp_path / "b", "b")
    compiled.unload_adapter("b")          # parked when unloaded: taken out all the same
    assert compiled.adapters["b"].status == "removed" and compiled.adapters["d"].status == "inserted"
    with torch.no_grad():
        assert torch.equal(compiled.module(ids).logits, expected)
    with pytest.raises(SpecError, match="already in this compile"):
        compiled.load_adapter(tmp_path / "a", "b")
    with pytest.raises(SpecError, match="identifier"):
        compiled.load_adapter(tmp_path / "a", "__base__")
    with pytest.raises(SpecError, match="adapter_config.json|does not exist|no such|missing"):
        compiled.load_adapter(tmp_path / "nowhere", "c")
    compiled.save_adapter("d", tmp_path / "dora")
    with pytest.raises(SpecError, match="'dora' adapter, which cannot join a mixed batch"):
        compiled.load_adapter(tmp_path / "dora", "d2")
    with pytest.raises(SpecError, match="only an inserted or inactive adapter"):
        compiled.unload_adapter("b")
    assert set(compiled.adapters) == {"d", "b"}
    with torch.no_grad():
        assert torch.equal(compiled.module(ids).logits, expected)


def test_stacked_banks_follow_the_bank(tmp_path):
    """The mixed graph's stacked banks (surgeon.serving.SiteBank) follow load_adapter / unload_adapter and
    in-place updates, and are not rebuilt between calls that change nothing."""
    from surgeon import serving

    model, args = hf_llama()
    folders(model, tmp_path)
    compiled = surgeon.compile(model, args, {"pipeline": []}, KW)
    compiled.load_adapter(tmp_path / "a", "a")
    rows = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(5))

    def banks():
        mixed = serving.mixed_graph(compiled.module, serving.serving_ctx(compiled.module))
        return {name: (site._names, site._site_bank and site._site_bank[1]) for name, site in mixed.named_children()
                if isinstance(site, serving.MixedSite)}

    def alone(name):
        compiled.set_active(name)
        out = compiled.module(rows).logits
        compiled.set_active()
        return out

    with torch.no_grad():
        first = compiled.module(rows, adapter_names=["a", "__base__", "a"]).logits
        held = banks()
        assert held and all(names == ("a",) and bank is not None for names, bank in held.values())
        compiled.module(rows, adapter_names=["a", "__base__", "a"])
        assert banks() == held                                       # the same banks: nothing rebuilt
        compiled.load_adapter(tmp_path / "b", "b")                   # a new bank, with b's slots
        got = compiled.module(rows, adapter_names=["a", "b", "__base__"]).logits
        assert {names for names, _ in banks().values()} == {("a",), ("a", "b"), ("b",)}
        torch.testing.assert_close(got[0], first[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], alone("b")[1], rtol=1e-5, atol=1e-5)
        before = banks()
        for site in compiled.adapters["a"].sites:                     # a's (parked) tensors, updated in place
            for tensor in site.parked.values():
                tensor.mul_(2.0)
        changed = compiled.module(rows, adapter_names=["a", "b", "__base__"]).logits
        assert all(banks()[site][1] is not bank for site, (names, bank) in before.items() if "a" in names)
        torch.testing.assert_close(changed[0], alone("a")[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(changed[0], got[0], atol=1e-4)
        compiled.unload_adapter("a")                                  # a's slots gone
        after = compiled.module(rows, adapter_names=["b", "b", "__base__"]).logits
        assert {names for names, _ in banks().values()} == {("b",)}
        torch.testing.assert_close(after[1], got[1], rtol=1e-5, atol=1e-5)
