"""Uni-LoRA: every site's LoRA factors gather one trained vector theta through fixed indices and 1/sqrt(uses)
scales (one balanced index stream over all sites); exact merge, PEFT import (save_indices=True) and export on
LLaMA and GPT-2."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from surgeon.adapters.unilora import stream
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity,
                                    randomized_peft_checkpoint)
from tests.conftest import hf_gpt2
from tests.passes.helpers import logits


def test_unilora_lifecycle(tmp_path):
    model, args, compiled = compile_kind("unilora", ["*.k_proj", "*.down_proj"], rank=4, theta_length=64)
    assert compiled.report.rows[-1].check == "changes function"   # PEFT's init: B A != 0
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)
    assert_param_count(compiled, 64)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    model, args, compiled = compile_kind("unilora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=2,
                                         theta_length=100, init="normal")
    assert_param_count(compiled, 100)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_the_sites_cut_one_balanced_stream():
    """Sites in module order take consecutive slices (A then B) of one stream of D = sum r (in + out) indices;
    each theta entry is used floor(D / d) or ceil(D / d) times and scaled by 1 / sqrt(its uses)."""
    _, _, compiled = compile_kind("unilora", ["*.q_proj", "*.down_proj"], rank=4, theta_length=100)
    sites = compiled.adapters[NAME].sites
    total = sum(4 * (s.in_features + s.out_features) for s in sites)
    assert [s.options["offset"] for s in sites] == [0, 512, 1280, 1792]
    assert {s.options["total"] for s in sites} == {total}
    get = compiled.module.get_parameter
    indices = torch.cat([get(s.params[p]).flatten() for s in sites for p in ("unilora_indices_A", "unilora_indices_B")])
    scales = torch.cat([get(s.params[p]).flatten() for s in sites for p in ("unilora_scales_A", "unilora_scales_B")])
    assert torch.equal(indices, stream(total, 100, 42)[0])
    uses = torch.bincount(indices, minlength=100)
    assert set(uses.tolist()) == {total // 100, total // 100 + 1}
    torch.testing.assert_close(scales, uses[indices].float().rsqrt())


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("unilora", ["*.q_proj"], rank=4, theta_length=64, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


def test_peft_parity(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.UniLoraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=4, theta_d_length=64,
                                save_indices=True, unilora_dropout=0.1, proj_seed=3)
    compiled = peft_parity(config, tmp_path)
    options = compiled.adapters[NAME].spec.options
    assert (options["rank"], options["theta_length"], options["projection_seed"], options["dropout"]) == (4, 64, 3, 0.1)


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.UniLoraConfig(target_modules=["c_attn", "c_fc"], r=4, theta_d_length=64, save_indices=True,
                                   fan_in_fan_out=True), tmp_path, factory=hf_gpt2)


def test_delta_is_peft_s(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.UniLoraConfig(target_modules=["k_proj", "up_proj"], r=4, theta_d_length=64)
    _, _, wrapped = randomized_peft_checkpoint(config, tmp_path)
    theta = wrapped.base_model.unilora_theta_d["default"].detach()
    for name, module in wrapped.named_modules():
        if not hasattr(module, "unilora_indices_A") or "default" not in module.unilora_indices_A:
            continue
        params = {f"unilora_{p}": getattr(module, f"unilora_{p}")["default"]
                  for p in ("indices_A", "indices_B", "scales_A", "scales_B")}
        delta = kinds()["unilora"].delta_weight({**params, "unilora_theta_d": theta}, {},
                                                module.get_base_layer().weight)
        torch.testing.assert_close(delta, module.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-7, msg=name)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("unilora", ["*.q_proj", "*.down_proj"], rank=4, theta_length=64)
    peft_export(compiled, model, args, tmp_path)


def test_import_without_indices_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.UniLoraConfig(target_modules=["q_proj"], r=4, theta_d_length=64)   # save_indices=False
    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    with pytest.raises(surgeon.SpecError, match="save_indices=True"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
