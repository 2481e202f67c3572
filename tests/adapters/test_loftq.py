"""LoRA's `init: loftq` (LoftQ): the base becomes its quantized round trip Q (NF4 or row-wise int8,
simulated in float32) and the LoRA holds the rank-r SVD fit of what the quantization lost, W - Q.

PEFT 0.21 runs LoftQ only through bitsandbytes on a GPU, so these tests check the quantizers against
their definitions (brute force, value by value), the factors against an SVD of W - Q, and the PEFT
config keys (init_lora_weights "loftq" + loftq_config) both ways."""
from __future__ import annotations

import json

import pytest
import torch

import surgeon
from surgeon.adapters.loftq import NF4_LEVELS, int8_round_trip, loftq_base, loftq_factors, nf4_round_trip
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_merge, assert_param_count, assert_round_trip, assert_trains,
                                    compile_kind, spec)
from tests.conftest import assert_untouched, hf_llama, snapshot
from tests.passes.helpers import logits

TARGETS = ["*.q_proj", "*.down_proj"]   # hf_llama: q_proj 64 -> 64, down_proj 128 -> 64, two layers
RANK, ALPHA, SCALE = 4, 8, 2.0


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_nf4_round_trip_is_the_nearest_level_times_each_64_block_absmax():
    weight = torch.randn(10, 50, generator=_gen())   # 500 values: 7 full blocks and a 52-value tail, across rows
    got = nf4_round_trip(weight)
    flat, levels = weight.reshape(-1), torch.tensor(NF4_LEVELS)
    for start in range(0, flat.numel(), 64):
        block = flat[start:start + 64]
        absmax = block.abs().max()
        nearest = levels[(block[:, None] / absmax - levels[None, :]).abs().argmin(dim=1)]
        torch.testing.assert_close(got.reshape(-1)[start:start + 64], nearest * absmax, rtol=0, atol=0)
    assert got.unique().numel() <= 16 * 8          # at most 16 levels per block
    zeros = nf4_round_trip(torch.zeros(3, 64))      # an all-zero block stays zero (no division by 0)
    assert torch.equal(zeros, torch.zeros(3, 64))


def test_int8_round_trip_scales_each_row_to_127():
    weight = torch.randn(6, 40, generator=_gen(1))
    weight[2] = 0.0
    absmax = weight.abs().amax(dim=1, keepdim=True)
    want = torch.where(absmax > 0, torch.round(weight / absmax * 127) * absmax / 127, torch.zeros_like(weight))
    torch.testing.assert_close(int8_round_trip(weight), want, rtol=1e-6, atol=1e-7)
    assert (int8_round_trip(weight) - weight).abs().max() <= absmax.max() / 254 + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_factors_fit_what_the_quantization_lost(bits):
    weight = torch.randn(48, 80, generator=_gen(2))
    A, B = loftq_factors(weight, RANK, SCALE, bits, 1)
    Q = loftq_base(weight, RANK, bits, 1)
    torch.testing.assert_close(Q, (nf4_round_trip if bits == 4 else int8_round_trip)(weight))
    U, S, Vh = torch.linalg.svd((weight - Q).double())
    best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
    torch.testing.assert_close((SCALE * B @ A).double(), best, rtol=1e-4, atol=1e-5)   # the scale is divided out
    assert (weight - Q - SCALE * B @ A).norm() < (weight - Q).norm()


def test_more_iterations_leave_less_error():
    weight = torch.randn(64, 96, generator=_gen(3))
    errors = []
    for iterations in (1, 2, 4):
        A, B = loftq_factors(weight, 8, 1.0, 4, iterations)
        errors.append((weight - loftq_base(weight, 8, 4, iterations) - B @ A).norm().item())
    assert errors[0] > errors[1] > errors[2], errors


def test_bad_bits_and_iterations_are_refused():
    with pytest.raises(surgeon.SpecError, match="4 bits .NF4. or 8 bits"):
        loftq_factors(torch.randn(4, 4), 2, 1.0, 3, 1)
    model, args = hf_llama()
    with pytest.raises(surgeon.SpecError, match="loftq_bits"):
        surgeon.compile(model, args, spec("lora", TARGETS, init="loftq", loftq_bits=2), KW)
    with pytest.raises(surgeon.SpecError, match="loftq_iter"):
        surgeon.compile(model, args, spec("lora", TARGETS, init="loftq", loftq_iter=0), KW)


def test_insert_quantizes_the_base_and_the_adapter_recovers_the_loss(tmp_path):
    model, args = hf_llama()
    before = snapshot(model)
    compiled = surgeon.compile(model, args, spec("lora", TARGETS, rank=RANK, alpha=ALPHA, init="loftq"), KW)
    assert_untouched(model, before)   # the user's weights stay full precision
    sites = compiled.adapters[NAME].sites
    assert len(sites) == 4 and compiled.report.rows[-1].matches == 4
    for site in sites:
        W = model.get_submodule(site.path).weight.detach()
        base = get_tensor(compiled.module, site.weight).detach()
        A, B = (get_tensor(compiled.module, site.params[p]).detach() for p in ("lora_A", "lora_B"))
        torch.testing.assert_close(base, nf4_round_trip(W), rtol=0, atol=1e-6)   # W + (Q - W), rounded once
        assert not torch.equal(base, W)
        U, S, Vh = torch.linalg.svd((W - nf4_round_trip(W)).double())   # s B A: the best rank-r fit of W - Q
        torch.testing.assert_close((SCALE * B @ A).double(), (U[:, :RANK] * S[:RANK]) @ Vh[:RANK], rtol=1e-4,
                                   atol=1e-6)
    # the function: closer to the original model than the quantized base alone
    want = logits(model, args)
    with_adapter = logits(compiled.module, args)
    compiled.set_active()
    quantized_only = logits(compiled.module, args)
    assert (with_adapter - want).abs().max() < (quantized_only - want).abs().max()


def test_lifecycle_trains_counts_round_trips_and_merges(tmp_path):
    model, args, compiled = compile_kind("lora", TARGETS, rank=RANK, alpha=ALPHA, init="loftq", loftq_bits=8,
                                         loftq_iter=2)
    assert_param_count(compiled, RANK * 2 * ((64 + 64) + (128 + 64)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)   # the quantized base is recomputed from W on load
    assert_merge(compiled, args)


def test_peft_config_keys_both_ways(tmp_path):
    model, args, compiled = compile_kind("lora", TARGETS, rank=RANK, alpha=ALPHA, init="loftq", loftq_iter=2)
    compiled.save_adapter(NAME, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq"
    assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    again = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_peft": str(tmp_path / "peft")}]}, KW)
    options = again.adapters["again"].spec.options
    assert (options["init"], options["loftq_bits"], options["loftq_iter"]) == ("loftq", 4, 2)
    assert torch.equal(logits(again.module, args), logits(compiled.module, args))
    del config["loftq_config"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(surgeon.SpecError, match="loftq_config"):
        surgeon.compile(model, args, {"adapters": [{"name": "x", "from_peft": str(tmp_path / "peft")}]}, KW)


def test_a_loftq_adapter_cannot_join_a_mixed_batch():
    model, args, compiled = compile_kind("lora", TARGETS, rank=RANK, init="loftq")
    with pytest.raises(surgeon.SurgeonError, match="loftq init rewrote the base weight"):
        compiled.module(*args, adapter_names=[NAME] * args[0].shape[0])
