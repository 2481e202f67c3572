"""Hydra: parallel (on x) and sequential (on W x) low-rank branches; exact merge, bias untouched."""
from __future__ import annotations

import torch

import surgeon
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, spec)
from tests.conftest import hf_gpt2, randomize_adapters


def test_hydra_lifecycle(tmp_path):
    model, args, compiled = compile_kind("hydra", ["*.q_proj", "*.down_proj"], rank=4, alpha=8)
    assert_identity_insert(compiled, model, args)     # B1 = B2 = 0
    # rank * (in + out) + 2 * rank * out: q_proj 64 -> 64, down_proj 128 -> 64, two layers
    assert_param_count(compiled, 2 * (4 * 128 + 2 * 4 * 64 + 4 * 192 + 2 * 4 * 64))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)                       # W + s B1 A1 + s B2 A2 W, and back


def test_conv1d_sites_with_bias_merge_into_the_weight_only():
    model, args = hf_gpt2()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    compiled = surgeon.compile(model, args, spec("hydra", ["*.c_attn", "*.mlp.c_fc"], rank=4), KW)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * (4 * (32 + 96) + 2 * 4 * 96 + 4 * (32 + 128) + 2 * 4 * 128))
    assert_merge(compiled, args)
    randomize_adapters(compiled.module)
    compiled.apply(["merge"])
    site = next(s for s in compiled.adapters[NAME].sites if s.path == "transformer.h.0.attn.c_attn")
    assert torch.equal(compiled.module.get_parameter("transformer.h.0.attn.c_attn.bias"),
                       model.transformer.h[0].attn.c_attn.bias)
    assert site.merged["hydra_B2"].abs().sum() > 0
