"""BOFT: butterfly products of block rotations plus an output scale; the butterfly matches PEFT's."""
from __future__ import annotations

import pytest
import torch

from surgeon.adapters import input_map
from surgeon.adapters.boft import BOFT
from tests.adapters.helpers import (assert_identity_insert, assert_merge, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind, peft_export, peft_parity)
from tests.conftest import hf_gpt2

peft = pytest.importorskip("peft")


def _peft_butterfly(raw: torch.Tensor, in_features: int) -> torch.Tensor:
    """PEFT's construction: M = B_{N-1} ... B_0, B_i = P_i blockdiag(cayley(R_i)) P_i^T."""
    from peft.tuners.boft.layer import BOFTLayer

    factors, blocks, size, _ = raw.shape
    skew = 0.5 * (raw - raw.transpose(-1, -2))
    eye = torch.eye(size, dtype=raw.dtype).expand_as(skew)
    rotations = torch.linalg.solve(eye + skew, eye - skew, left=False)
    total = torch.eye(in_features, dtype=raw.dtype)
    for i in range(factors):
        perm = BOFTLayer.block_butterfly_perm(None, in_features, blocks // 2 ** i, size // 2, factors - 1)
        P = BOFTLayer.perm2mat(None, perm).to(raw.dtype)
        total = P @ torch.block_diag(*rotations[i]) @ P.T @ total
    return total


@pytest.mark.parametrize("factors,size,in_features", [(1, 8, 64), (3, 4, 64), (2, 8, 128)])
def test_butterfly_matches_peft(factors, size, in_features):
    raw = torch.randn(factors, in_features // size, size, size, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64) * 0.3
    params = {"boft_R": raw, "boft_s": torch.ones(8, dtype=torch.float64)}
    ours = input_map(BOFT.forward_input, params, {"block_size": size, "butterfly_factor": factors}, in_features)
    torch.testing.assert_close(ours, _peft_butterfly(raw, in_features))


def test_boft_lifecycle(tmp_path):
    model, args, compiled = compile_kind("boft", ["*.q_proj", "*.down_proj"], block_size=4, butterfly_factor=3)
    assert_identity_insert(compiled, model, args)     # R = I and s = 1
    assert_param_count(compiled, 2 * (3 * 16 * 16 + 64) + 2 * (3 * 32 * 16 + 64))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_boft_with_bias_on_conv1d_merges_exactly():
    model, args, compiled = compile_kind("boft", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, block_size=4,
                                         butterfly_factor=2)
    assert_identity_insert(compiled, model, args)
    assert_merge(compiled, args)


def test_peft_parity_and_export(tmp_path):
    # PEFT without its CUDA extension runs one butterfly factor (plain block-diagonal), so parity is there
    peft_parity(peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]), tmp_path / "in")
    model, args, compiled = compile_kind("boft", ["*.q_proj", "*.down_proj"], block_size=8)
    peft_export(compiled, model, args, tmp_path / "out")
