"""Super-Tuning: trained values on the k largest (or smallest) |W| entries, optionally plus a LoRA part
(Supra); init equal to PEFT's layer on the same weight, exact merge and unmerge, PEFT import and export."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits


def _site(compiled, path):
    return next(s for s in compiled.adapters[NAME].sites if s.path == path)


def _peft_layer(base, **config):
    """PEFT's own Super-Tuning layer around `base` (a Linear)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.supertuning.layer import Linear

    return Linear(base, "default", peft.SupertuningConfig(**config))


def test_supertuning_lifecycle(tmp_path):
    model, args, compiled = compile_kind("supertuning", ["*.q_proj", "*.down_proj"], sparsity=0.98)
    assert_identity_insert(compiled, model, args)      # values = 0
    # k = int(out * in * 0.02): q_proj 64 x 64 -> 81, down_proj 64 x 128 -> 163, two layers
    assert_param_count(compiled, 2 * (int(4096 * (1 - 0.98)) + int(8192 * (1 - 0.98))))
    indices = get_tensor(compiled.module, _site(compiled, "model.layers.0.mlp.down_proj").params["supertuning_indices"])
    assert indices.dtype == torch.int64 and not indices.requires_grad and indices.unique().numel() == indices.numel()
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)
    # the merged delta touches exactly the support
    site = _site(compiled, "model.layers.1.self_attn.q_proj")
    compiled.apply(["merge"])
    changed = (compiled.module.get_parameter(site.weight) != model.model.layers[1].self_attn.q_proj.weight).flatten()
    assert set(changed.nonzero().flatten().tolist()) <= set(site.merged["supertuning_indices"].tolist())


def test_supra_lifecycle(tmp_path):
    model, args, compiled = compile_kind("supertuning", ["*.k_proj", "*.up_proj"], sparsity=0.99, rank=3, alpha=5,
                                         select_top=False)
    assert_identity_insert(compiled, model, args)      # values = 0 and B = 0
    # k_proj 64 -> 32 (GQA), up_proj 64 -> 128; plus r (in + out)
    assert_param_count(compiled, 2 * (int(2048 * 0.01) + int(8192 * 0.01) + 3 * (64 + 32) + 3 * (64 + 128)))
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_bottom_selection_keeps_the_smallest_entries_of_conv1d_weights():
    # hf_gpt2: c_attn 32 -> 96, stored in x out; the support is over the out x in view
    model, args, compiled = compile_kind("supertuning", ["*.c_attn"], factory=hf_gpt2, sparsity=0.95,
                                         select_top=False, rank=2)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * (int(3072 * (1 - 0.95)) + 2 * (32 + 96)))
    site = _site(compiled, "transformer.h.0.attn.c_attn")
    flat = get_tensor(compiled.module, site.params["supertuning_indices"])
    magnitudes = model.transformer.h[0].attn.c_attn.weight.detach().t().abs().flatten()
    assert magnitudes[flat].max() <= magnitudes[~torch.isin(torch.arange(magnitudes.numel()), flat)].min()
    assert_trains(compiled, args)
    assert_merge(compiled, args)


@pytest.mark.parametrize("select_top, alpha", [(True, None), (False, 4.0)])
def test_init_and_delta_match_peft(select_top, alpha):
    """The support is PEFT's (same positions, same order) on the same weight; with PEFT's trained values
    and factors the delta is PEFT's get_delta_weight (alpha None: PEFT's 2 r)."""
    kind = kinds()["supertuning"]
    base = torch.nn.Linear(24, 20)
    layer = _peft_layer(base, sparsity=0.9, select_top=select_top, r=3, lora_alpha=alpha, init_weights=False)
    opts = {"sparsity": 0.9, "select_top": select_top, "rank": 3, "alpha": alpha, "dropout": 0.0, "init": "default"}
    fresh = kind.init(opts, 24, 20, torch.float32, torch.Generator().manual_seed(0), base.weight.detach())
    assert torch.equal(fresh["supertuning_indices"], layer.supertuning_indices["default"].long())
    assert not fresh["supertuning_values"].any() and not fresh["supertuning_B"].any()
    assert fresh["supertuning_A"].shape == layer.supertuning_lora_A["default"].weight.shape
    params = {"supertuning_values": layer.supertuning_values["default"].detach(),
              "supertuning_indices": layer.supertuning_indices["default"],
              "supertuning_A": layer.supertuning_lora_A["default"].weight.detach(),
              "supertuning_B": layer.supertuning_lora_B["default"].weight.detach()}
    delta = kind.delta_weight(params, opts, base.weight.detach())
    assert delta.dtype == torch.float32 and delta.abs().max() > 0.1
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(base(x) + x @ delta.t(), layer(x), rtol=1e-5, atol=1e-5)


def test_peft_parity_super(tmp_path):
    """A randomized PEFT Super checkpoint imports with PEFT's support and outputs, before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.SupertuningConfig(target_modules=["q_proj", "k_proj", "down_proj"], sparsity=0.97)
    compiled = peft_parity(config, tmp_path)
    wrapped = peft.PeftModel.from_pretrained(hf_llama()[0], tmp_path)
    for site in compiled.adapters[NAME].sites:       # merged by peft_parity: the params sit in site.merged
        layer = wrapped.base_model.model.get_submodule(site.path)
        assert torch.equal(site.merged["supertuning_indices"], layer.supertuning_indices["default"].long())
        assert torch.equal(site.merged["supertuning_values"], layer.supertuning_values["default"].detach())


def test_peft_parity_supra(tmp_path):
    """Supra (r, lora_alpha, lora_dropout, bottom selection) imports with PEFT's outputs, before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.SupertuningConfig(target_modules=["q_proj", "up_proj"], sparsity=0.95, select_top=False, r=4,
                                    lora_alpha=6, lora_dropout=0.1)
    compiled = peft_parity(config, tmp_path)
    options = compiled.adapters[NAME].spec.options
    assert (options["rank"], options["alpha"], options["dropout"], options["select_top"]) == (4, 6.0, 0.1, False)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("supertuning", ["*.v_proj", "*.down_proj"], sparsity=0.9)
    peft_export(compiled, model, args, tmp_path / "super")
    model, args, compiled = compile_kind("supertuning", ["*.k_proj"], sparsity=0.9, rank=2, alpha=3,
                                         select_top=False)
    peft_export(compiled, model, args, tmp_path / "supra")


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("supertuning", ["*.q_proj", "*.up_proj"], rank=4, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("supertuning", ["*.q_proj"], sparsity=0.9, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_a_sparsity_that_leaves_no_entry_is_refused():
    with pytest.raises(surgeon.SurgeonError, match="leaves no trainable entry"):
        compile_kind("supertuning", ["*.k_proj"], sparsity=0.9999)


def test_checkpoint_without_indices_recomputes_them(tmp_path):
    """save_precomputed_indices=False: no indices in the file; insertion re-scores the base weight as PEFT's
    load does, and the outputs are PEFT's before and after merge."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    config = peft.SupertuningConfig(target_modules=["q_proj", "down_proj"], sparsity=0.9, select_top=False,
                                    save_precomputed_indices=False)
    compiled = peft_parity(config, tmp_path)
    assert not [k for k in load_file(tmp_path / "adapter_model.safetensors") if "indices" in k]
    assert all(s.merged["supertuning_indices"].numel() == s.merged["supertuning_values"].numel()
               for s in compiled.adapters[NAME].sites)


def test_checkpoint_with_mismatched_tensors_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.SupertuningConfig(target_modules=["q_proj"], sparsity=0.9),
                                                tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors = {k: v[:-1] if k.endswith("supertuning_indices") else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="of one length"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
