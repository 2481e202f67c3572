"""LN tuning: a trained copy of each targeted norm's weight (and bias) stands in for it; exact insert,
merge that writes the copy into the base bit for bit and unmerge that gives the original back, PEFT
import / export with PEFT's outputs before and after merge (LLaMA's RMSNorm, BERT's LayerNorm with bias)."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, main_output, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_bert, hf_llama, randomize_adapters

# hf_llama: hidden 64; an RMSNorm has one 64-vector (captured as HF's `weight * x` decomposition)
LLAMA_NORMS = ["*.input_layernorm", "*.norm"]   # 2 layers' input norms and the final norm


def test_rmsnorm_lifecycle(tmp_path):
    model, args, compiled = compile_kind("ln_tuning", LLAMA_NORMS)
    assert [s.path for s in compiled.adapters[NAME].sites] == [
        "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"]
    assert_identity_insert(compiled, model, args)   # the copy equals the weight: bit for bit
    assert_param_count(compiled, 3 * 64)             # the frozen original is not counted
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_merge_writes_the_copy_and_unmerge_the_original_bit_for_bit():
    """Merge is a write, not an approximate add: even a copy far from the weight (1e-8 where the weight is
    ~1, where float32 arithmetic on W + (copy - W) would lose it) lands exactly."""
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "ln_tuning", "targets": ["*.norm"]}]},
                               KW, verify=False)
    site = compiled.adapters[NAME].sites[0]
    original = model.model.norm.weight.detach().clone()
    copy_ = torch.full_like(original, 1e-8).index_fill_(0, torch.arange(0, 64, 2), -3.25)
    with torch.no_grad():
        compiled.module.get_parameter(site.params["ln_tuning"]).copy_(copy_)
    adapted = main_output(compiled.module, args, {})
    compiled.apply(["merge"])
    assert torch.equal(get_tensor(compiled.module, "model.norm.weight"), copy_)
    assert torch.equal(main_output(compiled.module, args, {}), adapted)
    compiled.apply(["unmerge"])
    assert torch.equal(get_tensor(compiled.module, "model.norm.weight"), original)


def test_layernorm_weight_and_bias_are_sites(tmp_path):
    # hf_bert: every LayerNorm (hidden 32) has a weight and a bias, each a site of its own
    model, args, kwargs = hf_bert()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "ln_tuning",
                                                           "targets": ["*.LayerNorm"]}]}, kwargs)
    paths = [s.path for s in compiled.adapters[NAME].sites]
    assert len(paths) == 10 and paths[:2] == ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    assert compiled.report.rows[-1].check == "exact"
    assert torch.equal(main_output(compiled.module, args, kwargs), main_output(model, args, kwargs))
    assert compiled.adapters[NAME].param_count == 10 * 32
    randomize_adapters(compiled.module)
    before = main_output(compiled.module, args, kwargs)
    compiled.apply(["merge"])
    assert_close(main_output(compiled.module, args, kwargs), before)


def test_a_module_with_a_matrix_weight_is_no_norm():
    with pytest.raises(surgeon.SpecError, match="select no norm op"):
        compile_kind("ln_tuning", ["*.q_proj"])


def test_peft_parity_rmsnorm(tmp_path):
    peft = pytest.importorskip("peft")
    compiled = peft_parity(peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
                           tmp_path / "in")
    assert len(compiled.adapters[NAME].sites) == 4
    compiled.apply(["unmerge"])   # PEFT's merge is a swap; surgeon's unmerge gives the base back as exactly
    model, args, _ = randomized_peft_checkpoint(peft.LNTuningConfig(target_modules=["norm"]), tmp_path / "again")
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    peft_export(again, model, args, tmp_path / "out")


def _bert_peft(config, folder):
    """BERT (attention_mask kwarg) wrapped by PEFT, its copies moved off the base by seeded noise, saved."""
    import peft

    model, args, kwargs = hf_bert()
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(folder)
    return model, args, kwargs, wrapped


def test_peft_parity_layernorm_with_bias(tmp_path):
    peft = pytest.importorskip("peft")
    model, args, kwargs, wrapped = _bert_peft(peft.LNTuningConfig(target_modules=["LayerNorm"]), tmp_path / "in")
    expected = main_output(wrapped, args, kwargs)
    assert not torch.allclose(expected, main_output(model, args, kwargs), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, kwargs)
    assert len(compiled.adapters[NAME].sites) == 10   # 5 LayerNorms, weight and bias
    assert_close(main_output(compiled.module, args, kwargs), expected)
    compiled.apply(["merge"])
    assert_close(main_output(compiled.module, args, kwargs), main_output(wrapped.merge_and_unload(), args, kwargs))
    compiled.apply(["unmerge"])   # and export (helpers.peft_export calls without BERT's attention_mask)
    randomize_adapters(compiled.module, seed=5)
    ours = main_output(compiled.module, args, kwargs)
    from surgeon.adapter_io import save_peft_dir

    save_peft_dir(tmp_path / "out", {}, compiled.adapter_weights(NAME), set(), kind="ln_tuning")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    assert_close(main_output(loaded, args, kwargs), ours)


def test_malformed_checkpoints_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, kwargs, _ = _bert_peft(peft.LNTuningConfig(target_modules=["LayerNorm"]), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.embeddings.LayerNorm.ln_tuning_layers.weight"
    save_file({**tensors, key: tensors[key].reshape(4, 8)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match=r"module 'embeddings.LayerNorm': ln_tuning_layers.weight has shape"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, kwargs)
    save_file({k: v for k, v in tensors.items() if not k.endswith("embeddings.LayerNorm.ln_tuning_layers.bias")},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="no weights for module 'embeddings.LayerNorm.bias'"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, kwargs)


def test_exclude_names_the_module():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "ln_tuning", "targets": ["*norm"],
                                                           "exclude": ["*.post_attention_layernorm", "model.norm"]}]},
                               KW, verify=False)
    assert [s.path for s in compiled.adapters[NAME].sites] == ["model.layers.0.input_layernorm.weight",
                                                               "model.layers.1.input_layernorm.weight"]
