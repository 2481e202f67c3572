"""RoAd: 2-D rotations (with scales) of output feature pairs; its three variants, exact merge (W' = R W,
and b' = R b where the site has a bias), PEFT import and export."""
from __future__ import annotations

import copy

import pytest
import torch

from safetensors.torch import load_file

import surgeon
from surgeon.adapters import kinds
from surgeon.merge_checkpoint import merge_checkpoint
from tests.adapters.helpers import (KW, NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, main_output, peft_export,
                                    peft_parity, spec)
from tests.conftest import hf_bert, hf_gpt2, randomize_adapters
from tests.passes.helpers import logits

PER_FEATURE = {"road_1": 1, "road_2": 2, "road_4": 4}   # theta + alpha entries per output feature


def with_biases(model, *rest):
    """The model with random biases (transformers initializes them to 0, which any merge maps to 0)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return (model, *rest) if rest else model


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_lifecycle(variant, tmp_path):
    # k_proj is 64 -> 32 (GQA), down_proj 128 -> 64; groups of 16 (pairs i, i + 8)
    model, args, compiled = compile_kind("road", ["*.k_proj", "*.down_proj"], variant=variant, group_size=16)
    assert_identity_insert(compiled, model, args)      # theta = 0, alpha = 1: y * 1 + swapped * 0
    assert_param_count(compiled, 2 * PER_FEATURE[variant] * (32 + 64))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)                       # LLaMA has no biases: W' = R W, unmerge inverts R


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_merged_weight_is_peft_rotation_times_w(variant):
    """R W from surgeon's elementwise form equals PEFT's dense R (its merge matrix) times W."""
    from peft.tuners.road.layer import _get_delta_weight

    road = kinds()["road"]
    gen = torch.Generator().manual_seed(0)
    out, group = 32, 8
    size = out * PER_FEATURE[variant] // 2
    params = {"road_theta": torch.randn(size, generator=gen), "road_alpha": torch.randn(size, generator=gen)}
    opts = {"variant": variant, "group_size": group, "init": "identity"}
    W = torch.randn(out, 12, dtype=torch.float64, generator=gen)
    R = _get_delta_weight(variant, group, params["road_theta"].double(), params["road_alpha"].double())
    torch.testing.assert_close(W + road.delta_weight(params, opts, W), R @ W, rtol=1e-12, atol=1e-12)
    merged = R @ W
    torch.testing.assert_close(merged + road.undo_delta(params, opts, merged), W, rtol=1e-9, atol=1e-9)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("road", ["*.q_proj"], group_size=16, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_group_size_must_divide_the_output():
    model, args = hf_gpt2()
    with pytest.raises(Exception, match="group_size 64 must be even and divide the site's 32 output"):
        surgeon.compile(model, args, spec("road", ["*.mlp.c_proj"], group_size=64), KW)


def test_biased_sites_merge_with_the_bias_rotated(tmp_path):
    """GPT-2's c_attn and c_proj (Conv1D addmm, with a bias): the whole output is rotated, so the merge
    writes R W and R b; unmerge maps both back."""
    model, args, compiled = compile_kind("road", ["*.c_attn", "*.mlp.c_proj"], factory=lambda: with_biases(*hf_gpt2()),
                                         group_size=16, variant="road_2")
    assert_identity_insert(compiled, model, args)
    assert_round_trip(compiled, model, args, tmp_path)
    biases = {n: p.clone() for n, p in compiled.module.named_parameters() if n.endswith(".bias")}
    assert_merge(compiled, args)
    compiled.apply(["merge"])
    changed = {n for n, p in compiled.module.named_parameters() if n in biases and not torch.equal(p, biases[n])}
    assert changed == {n for n in biases if n.endswith(("c_attn.bias", "mlp.c_proj.bias"))} and len(changed) == 4


def test_peft_parity_on_a_biased_bert(tmp_path):
    """PEFT's RoAd on BERT's biased linears: surgeon's import gives PEFT's outputs (the bias rotated)."""
    peft = pytest.importorskip("peft")
    model, args, kwargs = hf_bert()
    with_biases(model)
    config = peft.RoadConfig(target_modules=["query", "intermediate.dense"], group_size=16, variant="road_4")
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(tmp_path / "peft")
    expected = main_output(wrapped, args, kwargs)
    assert not torch.allclose(expected, main_output(model, args, kwargs), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, kwargs)
    assert_close(main_output(compiled.module, args, kwargs), expected)
    assert {s.options["variant"] for s in compiled.adapters[NAME].sites} == {"road_4"}
    compiled.apply(["merge"])
    assert_close(main_output(compiled.module, args, kwargs), expected)
    merged = wrapped.merge_and_unload()        # PEFT's own merge rotates the biases as well
    ours = dict(compiled.module.named_parameters())
    for name in ("encoder.layer.0.attention.self.query.bias", "encoder.layer.1.intermediate.dense.bias"):
        assert_close(ours[name], dict(merged.named_parameters())[name])
    base = tmp_path / "base"                   # and merge-checkpoint on disk gives the in-memory merge, bit for bit
    model.save_pretrained(base)
    merge_checkpoint(base, tmp_path / "peft", tmp_path / "merged")
    on_disk = load_file(tmp_path / "merged" / "model.safetensors")
    for name, tensor in on_disk.items():
        if name in ours:
            assert torch.equal(tensor, ours[name]), name


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_peft_parity(variant, tmp_path):
    """A randomized PEFT RoAd checkpoint imports with PEFT's outputs, before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.RoadConfig(target_modules=["q_proj", "k_proj", "down_proj"], group_size=8, variant=variant)
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert state.spec.options["variant"] == variant and state.spec.options["group_size"] == 8


@pytest.mark.parametrize("variant", ["road_1", "road_4"])
def test_peft_export(variant, tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("road", ["*.q_proj", "*.k_proj", "*.up_proj"], variant=variant,
                                         group_size=32)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_through_save_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model, args, compiled = compile_kind("road", ["*.o_proj"], variant="road_2", group_size=16)
    randomize_adapters(compiled.module, seed=5)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "peft", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    assert_close(logits(loaded, args), expected)
