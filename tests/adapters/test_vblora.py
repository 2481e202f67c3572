"""VB-LoRA: LoRA factors mixed from one trained vector bank shared by all sites (top-k of each sub-vector's
logits); exact merge, PEFT import (full logits and save_only_topk_weights) and export on LLaMA and GPT-2,
and the bank's gradient equal to PEFT's."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.adapters import EagerBranch, kinds
from surgeon.adapters.vblora import factors
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity, spec)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits

SMALL = {"rank": 4, "num_vectors": 32, "vector_length": 16}


def _count(rank: int, count: int, length: int, fans) -> int:
    return sum(count * rank * (i + o) // length for i, o in fans) + count * length


def test_vblora_lifecycle(tmp_path):
    # k_proj 64 -> 32 (GQA), down_proj 128 -> 64: every size a multiple of the vector length 16
    model, args, compiled = compile_kind("vblora", ["*.k_proj", "*.down_proj"], topk=3, **SMALL)
    assert compiled.report.rows[-1].check == "changes function"   # PEFT's init: B A != 0
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)
    assert_param_count(compiled, _count(4, 32, 16, [(64, 32), (128, 64)] * 2))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    model, args, compiled = compile_kind("vblora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, **SMALL)
    assert_param_count(compiled, _count(4, 32, 16, [(32, 96), (128, 32)] * 2))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_factors_mix_the_top_k_bank_vectors():
    """A sub-vector is sum_j softmax(top-k logits)_j V[index_j], written out with loops."""
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    logits_A = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)    # r = 2, in = 12
    logits_B = torch.randn(2, 2, 6, generator=gen, dtype=torch.float64)    # out = 8
    opts = {"rank": 2, "topk": 2}
    A, B = factors(EagerBranch((12, 8)), {"vblora_logits_A": logits_A, "vblora_logits_B": logits_B,
                                          "vblora_vector_bank": bank}, opts)

    def mixed(logits):
        top = logits.topk(2)
        return sum(w * bank[i] for w, i in zip(top.values.softmax(-1), top.indices))
    for i in range(2):
        for t in range(3):
            torch.testing.assert_close(A[i, 4 * t:4 * t + 4], mixed(logits_A[i, t]))
        for t in range(2):
            torch.testing.assert_close(B[4 * t:4 * t + 4, i], mixed(logits_B[t, i]))


@pytest.mark.parametrize("options,message", [
    ({**SMALL, "vector_length": 24}, "vector_length 24 must divide the site's 64 input and 32 output"),
    ({**SMALL, "topk": 40}, "topk 40 exceeds num_vectors 32"),
])
def test_refusals(options, message):
    model, args = hf_llama()
    with pytest.raises(Exception, match=message):
        surgeon.compile(model, args, spec("vblora", ["*.k_proj"], **options), KW)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("vblora", ["*.q_proj"], dropout=0.5, **SMALL)
    assert_dropout_in_training_only(compiled, args)


@pytest.mark.parametrize("topk_only", [False, True])
def test_peft_parity(topk_only, tmp_path):
    """A randomized PEFT checkpoint (one bank for three module shapes) imports with PEFT's outputs, before and
    after merge; save_only_topk_weights' top-k indices and weights rebuild logits that pick the same vectors."""
    peft = pytest.importorskip("peft")
    config = peft.VBLoRAConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=4, num_vectors=32,
                               vector_length=16, topk=3, vblora_dropout=0.1, save_only_topk_weights=topk_only)
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert state.spec.options == {**SMALL, "topk": 3, "init_bank_bound": 0.02, "init_logits_std": 0.1,
                                  "dropout": 0.1}
    assert len({s.merged["vblora_vector_bank"].data_ptr() for s in state.sites}) == 1   # one bank, kept once
    if topk_only:   # the rebuilt logits are finite, so the import saves and loads as surgeon's own
        compiled.apply(["unmerge"])
        assert all(torch.isfinite(t).all() for ps in compiled.adapter_weights(NAME).values() for t in ps.values())


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.VBLoRAConfig(target_modules=["c_attn", "c_fc"], r=4, num_vectors=32, vector_length=16,
                                  fan_in_fan_out=True), tmp_path, factory=hf_gpt2)


def test_the_bank_gradient_is_peft_s(tmp_path):
    """Every site feeds the one bank: after an import, a backward gives PEFT's gradient of its bank."""
    peft = pytest.importorskip("peft")
    from tests.adapters.helpers import randomized_peft_checkpoint

    config = peft.VBLoRAConfig(target_modules=["q_proj", "down_proj"], r=4, num_vectors=32, vector_length=16)
    model, args, wrapped = randomized_peft_checkpoint(config, tmp_path)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
    wrapped(*args, **KW).logits.square().mean().backward()
    compiled.module(*args).logits.square().mean().backward()
    ours = compiled.module.get_parameter(f"adapter_{NAME}.vblora_vector_bank_32x16").grad
    torch.testing.assert_close(ours, wrapped.base_model.vblora_vector_bank["default"].grad, rtol=1e-4, atol=1e-7)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("vblora", ["*.q_proj", "*.down_proj"], **SMALL)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_of_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    model, args, compiled = compile_kind("vblora", ["*.c_attn"], factory=hf_gpt2, **SMALL)
    peft_export(compiled, model, args, tmp_path)
    assert peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).peft_config["default"].fan_in_fan_out


def test_delta_is_peft_s(tmp_path):
    peft = pytest.importorskip("peft")
    from tests.adapters.helpers import randomized_peft_checkpoint

    config = peft.VBLoRAConfig(target_modules=["k_proj", "up_proj"], r=4, num_vectors=32, vector_length=16)
    _, _, wrapped = randomized_peft_checkpoint(config, tmp_path)
    bank = wrapped.base_model.vblora_vector_bank["default"].detach()
    for name, module in wrapped.named_modules():
        if not hasattr(module, "vblora_logits_A") or "default" not in module.vblora_logits_A:
            continue
        params = {"vblora_logits_A": module.vblora_logits_A["default"].detach(),
                  "vblora_logits_B": module.vblora_logits_B["default"].detach(), "vblora_vector_bank": bank}
        delta = kinds()["vblora"].delta_weight(params, {"rank": 4, "topk": 2}, module.get_base_layer().weight)
        torch.testing.assert_close(delta, module.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-7, msg=name)
