"""OFT: block-diagonal Cayley rotations of the input; exact identity, merge W R^T, PEFT parity."""
from __future__ import annotations

import pytest
import torch

from surgeon.adapters import input_map
from surgeon.adapters.oft import OFT
from tests.adapters.helpers import (assert_identity_insert, assert_merge, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind, peft_export, peft_parity)
from tests.conftest import hf_gpt2

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("neumann", [False, True])
def test_rotation_matches_peft(neumann):
    from peft.tuners.oft.layer import OFTRotationModule

    module = OFTRotationModule(4, 6, 4, 16, use_cayley_neumann=neumann, num_cayley_neumann_terms=5)
    torch.nn.init.normal_(module.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    opts = {"block_size": 4, "block_share": False, "use_cayley_neumann": neumann, "num_cayley_neumann_terms": 5}
    ours = input_map(OFT.forward_input, {"oft_R": module.weight.detach()}, opts, 16)
    torch.testing.assert_close(ours.float(), module.get_weight().detach(), rtol=1e-5, atol=1e-6)
    if not neumann:
        torch.testing.assert_close(ours @ ours.T, torch.eye(16, dtype=torch.float64))   # orthogonal


def test_oft_lifecycle(tmp_path):
    model, args, compiled = compile_kind("oft", ["*.q_proj", "*.down_proj"], block_size=16)
    assert_identity_insert(compiled, model, args)     # Q = 0 gives R = I exactly
    assert_param_count(compiled, 16 * 15 // 2 * 2 * (4 + 8))   # b(b-1)/2 per block, 4 and 8 blocks
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_neumann_series_with_one_shared_block():
    model, args, compiled = compile_kind("oft", ["*.q_proj", "*.down_proj"], block_size=16, block_share=True,
                                         use_cayley_neumann=True)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 16 * 15 // 2 * 4)    # one R per site
    assert_trains(compiled, args)
    assert_merge(compiled, args)                       # not orthogonal: unmerge inverts R^T


def test_oft_on_conv1d_merges_exactly():
    model, args, compiled = compile_kind("oft", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, block_size=8)
    assert_identity_insert(compiled, model, args)
    assert_merge(compiled, args)


def test_peft_parity(tmp_path):
    peft_parity(peft.OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"]), tmp_path)
