"""ETHER / ETHER+: hyperplane reflections of the weight; bounded distance, exact merge, ETHER+ identity init."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters.ether import _output_matrix
from tests.adapters.helpers import (assert_identity_insert, assert_merge, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind, logits, spec)
from tests.conftest import hf_gpt2, hf_llama


def test_ether_reflections_are_orthogonal_involutive_and_bounded():
    u = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    H = _output_matrix({"ether_u": u}, {"blocks": 4}, 32)
    eye = torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(H @ H.T, eye)                       # orthogonal
    torch.testing.assert_close(H @ H, eye)                         # its own inverse: unmerge applies it again
    assert torch.count_nonzero(H[:8, 8:]) == 0                     # block-diagonal, 4 blocks of 8
    W = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.linalg.matrix_norm(H @ W - W) <= 2 * torch.linalg.matrix_norm(W) + 1e-12


def test_ether_plus_starts_at_the_identity_and_is_not_orthogonal():
    u, v = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(_output_matrix({"ether_u": u, "ether_v": u}, {"blocks": 2}, 16), eye)
    H = _output_matrix({"ether_u": u, "ether_v": v}, {"blocks": 2}, 16)
    assert not torch.allclose(H @ H.T, eye)


def test_ether_lifecycle(tmp_path):
    model, args, compiled = compile_kind("ether", ["*.q_proj", "*.down_proj"], blocks=4)
    row = compiled.report.rows[-1]
    assert row.name == "insert" and row.matches == 4 and row.check == "changes function"   # a reflection is never I
    assert not torch.allclose(logits(compiled.module, args), model(*args, use_cache=False).logits)
    assert_param_count(compiled, 2 * (64 + 64))                    # one u per output row: q_proj 64, down_proj 64
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=True)                     # H H = I: unmerge is exact


def test_ether_on_a_biased_conv1d_site_holds_the_bias_out():
    """y' = H (y - b) + b is W' x + b with W' = H W: GPT-2's c_attn has a bias, stored in x out."""
    model, args, compiled = compile_kind("ether", ["*.c_attn"], factory=hf_gpt2, blocks=2)
    assert_merge(compiled, args, unmerge=True)


def test_ether_plus_lifecycle_and_unmerge_refusal(tmp_path):
    model, args, compiled = compile_kind("ether_plus", ["*.q_proj", "*.down_proj"], blocks=2)
    assert_identity_insert(compiled, model, args, exact=False)     # v = u: H+ = I up to rounding
    assert_param_count(compiled, 2 * (2 * (64 + 64) + 2 * (128 + 64)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=False)
    with pytest.raises(surgeon.SpecError, match="not orthogonal"):
        compiled.apply(["unmerge"])


def test_blocks_that_do_not_divide_the_site_are_refused():
    model, args = hf_llama()
    with pytest.raises(Exception, match="blocks 5 does not divide"):
        surgeon.compile(model, args, spec("ether", ["*.q_proj"], blocks=5), {"use_cache": False})
