"""GLoRA: y + (W0 ⊙ A + B) x + (b0 ⊙ D + E + W0 C), each of A .. E a lora / vector / constant / none path;
bias terms only where the site has a bias; exact merge of the weight and (D, E) bias terms, W0 C refused;
unmerge refused where 1 + A or 1 + D has a zero; PEFT import, export and parity before and after merge."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import surgeon
from surgeon.adapter_io import save_peft_dir
from tests.adapters.helpers import (NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, main_output, peft_export,
                                    peft_parity)
from tests.conftest import hf_bert, hf_gpt2, randomize_adapters

# hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64, no biases: A and B only, 2 r (in + out) a site
LLAMA_FANS = 2 * ((64 + 32) + (128 + 64))


class Tiny(nn.Module):
    """A linear with a bias (GLoRA's C, D, E apply) feeding one without (they do not)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(12, 10), nn.Linear(10, 6, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def with_biases(model, *rest):
    """The model with random biases: transformers makes them 0, and b0 ⊙ D would be 0 whatever D is."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return (model, *rest)


def tiny():
    return Tiny().eval(), (torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(1)),)


def test_glora_lifecycle(tmp_path):
    model, args, compiled = compile_kind("glora", ["*.k_proj", "*.down_proj"], rank=3)
    assert {p for s in compiled.adapters[NAME].sites for p in s.params} == \
        {"glora_A_Xd", "glora_A_Xu", "glora_B_Xd", "glora_B_Xu"}   # no bias: no C, D, E
    assert_identity_insert(compiled, model, args)   # every Xd = 0: A = B = 0, the branch adds exact zeros
    assert_param_count(compiled, 2 * 3 * LLAMA_FANS)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites_merge_weight_and_bias(tmp_path):
    """GPT-2's Conv1D (addmm, weight stored in x out) has biases: D and E merge into them (c: none)."""
    model, args, compiled = compile_kind("glora", ["*.c_attn", "*.mlp.c_proj"], factory=lambda: with_biases(*hf_gpt2()),
                                         rank=2, a_b="vector", c="none", d_e="vector")
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * (2 * 96 + 2 * 96) + 2 * (2 * 32 + 2 * 32))   # A, B: out x 1; D, E: out
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    biases = {n: p.clone() for n, p in compiled.module.named_parameters() if n.endswith(".bias")}
    assert_merge(compiled, args)
    compiled.apply(["merge"])
    changed = {n for n, p in compiled.module.named_parameters() if n in biases and not torch.equal(p, biases[n])}
    assert changed == {n for n in biases if n.endswith(("c_attn.bias", "mlp.c_proj.bias"))} and len(changed) == 4


def test_coupling_term_is_refused_at_merge():
    """W0 C needs the base weight where the bias is rewritten: refused with the reason, before any change."""
    model, args = tiny()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "glora", "targets": ["up", "down"],
                                                           "c": "vector"}]})
    randomize_adapters(compiled.module)
    before = main_output(compiled.module, args, {})
    with pytest.raises(surgeon.SpecError, match="bias term W0 C needs the base weight"):
        compiled.apply(["merge"])
    assert compiled.adapters[NAME].status == "inserted"
    assert torch.equal(main_output(compiled.module, args, {}), before)


@pytest.mark.parametrize("path, why", [("glora_A_X", "1 \\+ A is 0"), ("glora_D_X", "1 \\+ D is 0")])
def test_unmerge_is_refused_where_the_base_is_lost(path, why):
    """W0 ⊙ (1 + A) with an entry of 1 + A = 0 (or b0 ⊙ (1 + D)) forgets the base value there."""
    model, args = tiny()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "glora", "targets": ["up"],
                                                           "a_b": "constant", "c": "none", "d_e": "constant"}]})
    randomize_adapters(compiled.module)
    with torch.no_grad():
        compiled.module.get_parameter(compiled.adapters[NAME].sites[0].params[path]).fill_(-1.0)
    compiled.apply(["merge"])
    with pytest.raises(surgeon.SurgeonError, match=why):
        compiled.apply(["unmerge"])


def test_random_init_changes_the_function():
    model, args = tiny()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "glora", "targets": ["up", "down"],
                                                           "init": "random"}]})
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(main_output(compiled.module, args, {}), model(*args))


def test_no_parameters_at_a_site_is_refused():
    model, args = tiny()
    with pytest.raises(surgeon.SurgeonError, match="leave the adapter no parameters"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "glora", "targets": ["down"],
                                                    "a_b": "none"}]})


def _peft_tiny(config, tmp_path):
    """(model, args, PEFT model) on Tiny, adapter weights moved off their init, saved to tmp_path."""
    import peft

    model, args = tiny()
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(tmp_path)
    return model, args, wrapped


@pytest.mark.parametrize("a_b, c, d_e", [("lora", "lora", "constant"), ("vector", "vector", "vector"),
                                         ("constant", "none", "vector"), ("none", "lora", "constant"),
                                         ("lora", "none", "none"), ("constant", "vector", "none")])
def test_every_parameterization_matches_peft(a_b, c, d_e, tmp_path):
    """Each of PEFT's path kinds, on a layer with a bias and one without: import gives PEFT's outputs;
    the merge gives PEFT's merge_and_unload (or is refused with W0 C); export loads back in PEFT."""
    peft = pytest.importorskip("peft")
    targets = ["up"] if a_b == "none" else ["up", "down"]   # a_b none leaves the bias-less `down` nothing
    config = peft.GloraConfig(target_modules=targets, r=3, config_A_B=a_b, config_C=c, config_D_E=d_e)
    model, args, wrapped = _peft_tiny(config, tmp_path / "peft")
    expected = main_output(wrapped, args, {})
    assert not torch.allclose(expected, main_output(model, args, {}), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]})
    assert_close(main_output(compiled.module, args, {}), expected)
    state = compiled.adapters[NAME]
    biased = {"up": True, "down": False} if "down" in targets else {"up": True}
    assert {s.path: s.options["biased"] for s in state.sites} == biased
    _export_to_peft(compiled, model, args, tmp_path / "out")
    if c != "none":
        with pytest.raises(surgeon.SpecError, match="bias term W0 C"):
            compiled.apply(["merge"])
        return
    compiled.apply(["merge"])
    merged = wrapped.merge_and_unload()
    assert_close(main_output(compiled.module, args, {}), main_output(merged, args, {}))
    ours = dict(compiled.module.named_parameters())
    for name, tensor in merged.named_parameters():
        assert_close(ours[name], tensor)   # the same weights and bias, not only the same outputs
    compiled.apply(["unmerge"])
    assert_close(main_output(compiled.module, args, {}), expected)


def _export_to_peft(compiled, model, args, directory):
    import peft

    state = compiled.adapters[NAME]
    expected = main_output(compiled.module, args, {})
    save_peft_dir(directory, state.spec.options, compiled.adapter_weights(NAME), set(), kind="glora",
                  site_options={s.path: {"biased": s.options["biased"]} for s in state.sites})
    with warnings.catch_warnings(record=True) as caught:   # PEFT lists any zeros buffer we could not size
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    missing = [key for w in caught if "missing adapter keys" in str(w.message)
               for key in re.findall(r"'([^']+)'", str(w.message))]
    assert all(key.endswith(".zeros") for key in missing), missing
    assert_close(main_output(loaded, args, {}), expected)


def test_peft_parity_on_llama(tmp_path):
    """PEFT's default GLoRA on LLaMA (no biases: C, D, E are PEFT's zero buffers) imports with PEFT's outputs
    before and after merge, and exports back."""
    peft = pytest.importorskip("peft")
    config = peft.GloraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=3)
    compiled = peft_parity(config, tmp_path / "in")
    assert {s.options["biased"] for s in compiled.adapters[NAME].sites} == {False}
    model, args, again = compile_kind("glora", ["*.k_proj", "*.up_proj"], rank=2)
    peft_export(again, model, args, tmp_path / "out")


def test_peft_parity_on_a_biased_bert(tmp_path):
    """BERT's biased linears: PEFT's default (c: lora) imports with its outputs and refuses to merge; with
    c: none the merge gives PEFT's merged weights and biases, and merge-checkpoint writes the same on disk."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from surgeon.merge_checkpoint import merge_checkpoint

    model, args, kwargs = with_biases(*hf_bert())
    for c in ("lora", "none"):
        config = peft.GloraConfig(target_modules=["query", "intermediate.dense"], r=2, config_C=c,
                                  config_D_E="vector")
        wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
        randomize_adapters(wrapped, seed=7)
        wrapped.save_pretrained(tmp_path / c)
        expected = main_output(wrapped, args, kwargs)
        compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / c)}]},
                                   kwargs)
        assert_close(main_output(compiled.module, args, kwargs), expected)
        if c == "lora":
            with pytest.raises(surgeon.SpecError, match="bias term W0 C"):
                compiled.apply(["merge"])
    compiled.apply(["merge"])
    merged, ours = dict(wrapped.merge_and_unload().named_parameters()), dict(compiled.module.named_parameters())
    for name in ("encoder.layer.0.attention.self.query.bias", "encoder.layer.1.intermediate.dense.weight"):
        assert_close(ours[name], merged[name])
    model.save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "none", tmp_path / "merged")
    on_disk = load_file(tmp_path / "merged" / "model.safetensors")
    changed = [n for n, t in on_disk.items() if n in ours and not torch.equal(t, model.state_dict()[n])]
    assert len(changed) == 8   # 4 sites: weight and bias each
    for name in changed:
        assert torch.equal(on_disk[name], ours[name]), name


def test_malformed_checkpoints_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = _peft_tiny(peft.GloraConfig(target_modules=["up", "down"], r=2), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    zeros = "base_model.model.down.glora_D.zeros"
    for change, message in [({zeros: torch.ones_like(tensors[zeros])}, "glora_D.zeros .* is not zero"),
                            ({"base_model.model.up.glora_A.Xu": None}, "module 'up': glora_A is a lora path of r=2"),
                            ({"base_model.model.up.glora_E.X": None}, "holds GLoRA bias paths"),
                            ({"base_model.model.up.glora_C.Xd": torch.zeros(12, 5)}, "glora_C is a lora path")]:
        broken = {k: v for k, v in {**tensors, **change}.items() if v is not None}
        save_file(broken, file)
        with pytest.raises(surgeon.SpecError, match=message):
            surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
