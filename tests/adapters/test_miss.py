"""MiSS (formerly Bone): one r-wide block shared across the input's chunks (balance, mini) or applied
to W's r x r tiles (bat); exact merge and unmerge, PEFT import and export on LLaMA (GQA), surgeon's own
merge on GPT-2's Conv1D (PEFT's MiSS takes only nn.Linear)."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity, spec)
from tests.conftest import hf_gpt2
from tests.passes.helpers import logits

# hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64
MODES = {  # options, parameter count on k_proj + down_proj of both layers
    "balance": ({"mode": "balance", "rank": 8}, 2 * 8 * (32 + 64)),
    "balance-padded": ({"mode": "balance", "rank": 6}, 2 * 6 * (32 + 64)),   # 6 divides neither 64 nor 128
    "bat": ({"mode": "bat", "rank": 8}, 2 * 8 * (32 + 64)),                   # (out / r) r x r tiles: out r
    "mini": ({"mode": "mini", "rank": 8, "mini_rank": 4}, 2 * 2 * 8 * 4),
}


@pytest.mark.parametrize("case", list(MODES))
def test_miss_lifecycle(case, tmp_path):
    options, count = MODES[case]
    model, args, compiled = compile_kind("miss", ["*.k_proj", "*.down_proj"], **options)
    assert_identity_insert(compiled, model, args)      # the block starts at 0 in every mode
    assert_param_count(compiled, count)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)                       # bat's unmerge solves (W' - D)(I + D)^-1


@pytest.mark.parametrize("mode", ["balance", "bat"])
def test_conv1d_sites(mode, tmp_path):
    # c_attn 32 -> 96, mlp.c_proj 128 -> 32
    model, args, compiled = compile_kind("miss", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=8, mode=mode)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * 8 * (96 + 32))
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


@pytest.mark.parametrize("mode,rank", [(True, 8), (True, 6), ("bat", 4), ("mini", 4)])
def test_merged_weight_is_peft_s(mode, rank):
    """W + surgeon's delta is PEFT's merged weight in every mode, and the undo is PEFT's unmerge."""
    peft = pytest.importorskip("peft")
    from peft.tuners.miss.layer import MissLinear

    miss = kinds()["miss"]
    base = torch.nn.Linear(20, 24)
    config = peft.MissConfig(r=rank, init_weights=mode, mini_r=3)
    layer = MissLinear(base, "default", config, r=rank)
    with torch.no_grad():
        layer.miss_block["default"].copy_(torch.randn(layer.miss_block["default"].shape,
                                                      generator=torch.Generator().manual_seed(0)) * 0.3)
    block = layer.miss_block["default"].detach()
    opts = {"rank": rank, "mode": {True: "balance"}.get(mode, mode), "mini_rank": 3, "init": "zeros", "dropout": 0.0}
    W = base.weight.detach().clone()
    if mode == "bat":
        theirs = W + layer.get_delta_weight("default", W.clone())
        back = layer.get_delta_weight("default", theirs.clone(), reverse=True)
    else:
        theirs = layer.get_delta_weight_miss("default", W.clone())
        back = layer.get_delta_weight_miss("default", theirs.clone(), reverse=True)
    ours = W.double() + miss.delta_weight({"miss_block": block}, opts, W)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)
    undone = theirs.double() + miss.undo_delta({"miss_block": block}, opts, theirs)
    torch.testing.assert_close(undone, back.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(undone, W.double(), rtol=1e-5, atol=1e-5)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("miss", ["*.q_proj"], rank=8, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


@pytest.mark.parametrize("options,message", [
    ({"mode": "bat", "rank": 6}, "mode bat needs rank 6 to divide"),
    ({"mode": "bat", "rank": 8, "dropout": 0.1}, "mode bat applies no dropout"),
    ({"mode": "mini", "rank": 8, "mini_rank": 5}, "mini_rank 5 must divide the site's 32 output"),
    ({"rank": 65}, "rank 65 exceeds what a miss adapter takes"),   # PEFT: r <= in
])
def test_refusals(options, message):
    from tests.conftest import hf_llama

    model, args = hf_llama()
    with pytest.raises(Exception, match=message):
        surgeon.compile(model, args, spec("miss", ["*.k_proj"], **options), KW)


def test_bat_unmerge_refused_for_a_singular_tile():
    miss = kinds()["miss"]
    block = torch.zeros(2, 2, 2)
    block[1] = -torch.eye(2)                        # I + D_1 = 0
    opts = {"rank": 2, "mode": "bat", "mini_rank": 1, "init": "zeros", "dropout": 0.0}
    with pytest.raises(ValueError, match="singular"):
        miss.undo_delta({"miss_block": block}, opts, torch.ones(4, 4))


@pytest.mark.parametrize("init,rank,extra", [(True, 8, {"miss_dropout": 0.1}), (True, 6, {}), (False, 8, {}),
                                             ("bat", 8, {}), ("mini", 8, {"mini_r": 4})])
def test_peft_parity(init, rank, extra, tmp_path):
    """A randomized PEFT MiSS checkpoint imports with PEFT's outputs before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.MissConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=rank, init_weights=init, **extra)
    compiled = peft_parity(config, tmp_path)
    options = compiled.adapters[NAME].spec.options
    assert options["mode"] == {True: "balance", False: "balance"}.get(init, init) and options["rank"] == rank
    assert options["dropout"] == extra.get("miss_dropout", 0.0) and options["mini_rank"] == extra.get("mini_r", 1)


def test_bat_drops_peft_s_unused_dropout(tmp_path):
    """PEFT's bat forward never applies miss_dropout, so the import has none (the same function)."""
    peft = pytest.importorskip("peft")
    config = peft.MissConfig(target_modules=["v_proj"], r=8, init_weights="bat", miss_dropout=0.2)
    compiled = peft_parity(config, tmp_path)
    assert compiled.adapters[NAME].spec.options["dropout"] == 0.0


@pytest.mark.parametrize("options", [{"mode": "balance", "rank": 6, "dropout": 0.1}, {"mode": "bat", "rank": 8},
                                     {"mode": "mini", "rank": 4, "mini_rank": 8}])
def test_peft_export(options, tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("miss", ["*.q_proj", "*.k_proj", "*.up_proj"], **options)
    peft_export(compiled, model, args, tmp_path)
