"""BEFT: a trained output bias; merged into the base bias (refused where the layer has none, as in PEFT),
PEFT import with PEFT's outputs before and after merge, export back."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, main_output, peft_export,
                                    randomized_peft_checkpoint)
from tests.conftest import hf_bert, hf_gpt2, randomize_adapters
from tests.passes.helpers import logits


def _biased_bert():
    """hf_bert with random biases (transformers initializes them to 0)."""
    model, args, kwargs = hf_bert()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, args, kwargs


def test_beft_on_bias_free_llama_layers_refuses_to_merge(tmp_path):
    model, args, compiled = compile_kind("beft", ["*.k_proj", "*.down_proj"])
    assert_identity_insert(compiled, model, args)      # Δb = 0
    assert_param_count(compiled, 2 * (32 + 64))        # out per site
    assert {s.options["biased"] for s in compiled.adapters[NAME].sites} == {False}
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    with pytest.raises(surgeon.SpecError, match="needs a bias in the base layer"):
        compiled.apply(["merge"])


def test_conv1d_sites_merge_into_the_bias():
    # hf_gpt2: c_attn 32 -> 96 and mlp.c_proj 128 -> 32, both with a bias
    model, args, compiled = compile_kind("beft", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * (96 + 32))
    assert_merge(compiled, args)
    randomize_adapters(compiled.module)
    weights = {n: p.detach().clone() for n, p in compiled.module.named_parameters() if n.endswith(".weight")}
    before = logits(compiled.module, args)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), before)
    merged = dict(compiled.module.named_parameters())
    assert all(torch.equal(merged[n], w) for n, w in weights.items())    # the weights are untouched
    site = next(s for s in compiled.adapters[NAME].sites if s.path == "transformer.h.1.attn.c_attn")
    assert torch.equal(merged["transformer.h.1.attn.c_attn.bias"],
                       (model.transformer.h[1].attn.c_attn.bias.double()
                        + site.merged["beft_bias"].double()).float())


def test_init_and_merge_match_peft():
    """Zero init as PEFT's layer; with PEFT's trained bias the forward and the merged bias are PEFT's."""
    peft = pytest.importorskip("peft")
    from peft.tuners.beft.layer import Linear

    beft = kinds()["beft"]
    base = torch.nn.Linear(12, 10)
    layer = Linear(copy.deepcopy(base), "default", peft.BeftConfig())
    fresh = beft.init({"init": "default"}, 12, 10, torch.float32, torch.Generator().manual_seed(0), base.weight)
    assert torch.equal(fresh["beft_bias"], layer.beft_bias["default"].detach().reshape(-1))
    with torch.no_grad():
        layer.beft_bias["default"].normal_()
    params = {"beft_bias": layer.beft_bias["default"].detach().reshape(-1)}
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(base(x) + params["beft_bias"], layer(x))
    assert not beft.delta_weight(params, {}, base.weight.detach()).any()
    new_bias = beft.bias_map(params, {"biased": True}, base.bias.detach().double(), False)
    layer.merge()
    torch.testing.assert_close(new_bias.float(), layer.get_base_layer().bias.detach())
    torch.testing.assert_close(beft.bias_map(params, {}, new_bias, True), base.bias.detach().double())


def test_peft_parity_on_biased_bert(tmp_path):
    """A randomized PEFT BEFT checkpoint on BERT's biased linears imports with PEFT's outputs, before and after
    merge (PEFT's merge_and_unload gives the same biases), and exports back."""
    peft = pytest.importorskip("peft")
    model, args, kwargs = _biased_bert()
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.BeftConfig(target_modules=["value", "output.dense"]))
    wrapped.eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(tmp_path / "peft")
    expected = main_output(wrapped, args, kwargs)
    assert not torch.allclose(expected, main_output(model, args, kwargs), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]},
                               kwargs)
    assert len(compiled.adapters[NAME].sites) == 6      # value, attention.output.dense, output.dense per layer
    assert_close(main_output(compiled.module, args, kwargs), expected)
    compiled.apply(["merge"])
    assert_close(main_output(compiled.module, args, kwargs), expected)
    peft_merged = dict(wrapped.merge_and_unload().named_parameters())
    for name, tensor in compiled.module.named_parameters():
        if name.endswith(".bias") and name in peft_merged:
            assert_close(tensor, peft_merged[name])
    compiled.apply(["unmerge"])
    randomize_adapters(compiled.module, seed=5)
    ours = main_output(compiled.module, args, kwargs)
    compiled.save_adapter(NAME, tmp_path / "out", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    assert_close(main_output(loaded, args, kwargs), ours)


def test_peft_import_and_export_on_llama(tmp_path):
    """On LLaMA's bias-free layers PEFT runs the adapter but cannot merge it; surgeon matches and refuses."""
    peft = pytest.importorskip("peft")
    model, args, wrapped = randomized_peft_checkpoint(peft.BeftConfig(target_modules=["v_proj", "up_proj"]),
                                                      tmp_path / "peft")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, KW)
    assert_close(logits(compiled.module, args), logits(wrapped, args))
    with pytest.raises(ValueError, match="no bias"):
        wrapped.merge_and_unload()
    with pytest.raises(surgeon.SpecError, match="cannot merge"):
        compiled.apply(["merge"])
    peft_export(compiled, model, args, tmp_path / "out")


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("beft", ["*.q_proj"], init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_a_malformed_bias_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.BeftConfig(target_modules=["q_proj"]), tmp_path)
    tensors = {k: v.reshape(8, -1) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match=r"needs a beft_bias of shape \[1, out\]"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
