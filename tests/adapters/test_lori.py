"""LoRI: frozen random A, B trained only on a sparse mask fixed at insert (only the masked values are
parameters); identity insert, exact merge, parameter count k, file round trip, option checks."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from tests.adapters.helpers import (NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, spec)
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters

TARGETS = ["*.q_proj", "*.v_proj"]   # hf_llama: q_proj 64 -> 64, v_proj 64 -> 32 (GQA), two layers


def _site(compiled, path):
    return next(s for s in compiled.adapters[NAME].sites if s.path == path)


def _count(rank, density, fan_out):
    """The trained entries of B (out x r): k = round(density * out * r), at least one."""
    return max(1, round(density * fan_out * rank))


def _params(compiled, site):
    return {name: get_tensor(compiled.module, target).detach().clone() for name, target in site.params.items()}


def test_lori_lifecycle(tmp_path):
    model, args, compiled = compile_kind("lori", TARGETS, rank=4, alpha=8, density=0.25)
    assert_identity_insert(compiled, model, args)          # B's values start at 0: bit for bit
    # q_proj: round(0.25 * 64 * 4) = 64 values; v_proj: round(0.25 * 32 * 4) = 32; A takes no gradient
    assert _count(4, 0.25, 64) == 64 and _count(4, 0.25, 32) == 32
    assert_param_count(compiled, 2 * (64 + 32))
    site = _site(compiled, "model.layers.1.self_attn.v_proj")
    before = _params(compiled, site)
    A, indices = before["lori_A"], before["lori_indices"]
    assert A.shape == (4, 64) and A.abs().min() > 0 and not compiled.module.get_parameter(site.params["lori_A"]).requires_grad
    assert indices.dtype == torch.int64 and indices.shape == (2, 32) and not indices.requires_grad
    assert int(indices[0].max()) < 32 and int(indices[1].max()) < 4          # (row, column) of the 32 x 4 B
    assert (indices[0] * 4 + indices[1]).unique().numel() == 32
    assert_trains(compiled, args)                           # only the masked values of B
    after = _params(compiled, site)
    assert torch.equal(after["lori_A"], A) and torch.equal(after["lori_indices"], indices)   # frozen
    assert not torch.equal(after["lori_values"], before["lori_values"])
    assert_round_trip(compiled, model, args, tmp_path)       # A travels in the file: outputs are bit for bit
    assert_merge(compiled, args, unmerge=True)


def test_merge_adds_s_times_masked_B_times_A():
    """The merged weight is W + (alpha / r) (M ⊙ B) A, computed here from the parameters by hand; the
    update's rows lie in the row space of the frozen A (rank <= r)."""
    model, args, compiled = compile_kind("lori", TARGETS, rank=4, alpha=2, density=0.5)
    randomize_adapters(compiled.module, seed=4)
    site = _site(compiled, "model.layers.0.self_attn.q_proj")
    p = {name: t.double() for name, t in _params(compiled, site).items()}
    B = torch.zeros(64, 4, dtype=torch.float64)
    rows, cols = p["lori_indices"].long()
    B[rows, cols] = p["lori_values"]
    assert (B != 0).sum() == 128                            # half of the 64 x 4 entries, the rest held at zero
    base = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    expected = base + 0.5 * B @ p["lori_A"]
    compiled.apply(["merge"])
    merged = compiled.module.get_parameter(site.weight).detach().double()
    assert_close(merged, expected)
    assert (merged - expected).abs().max() < 1e-6
    assert torch.linalg.matrix_rank(merged - base, atol=1e-5) <= 4


def test_gpt2_conv1d_sites_and_a_seeded_mask():
    """Same spec, same A and mask (the spec's seeded generator); GPT-2's in x out Conv1D merges exactly."""
    drawn = []
    for _ in range(2):
        model, args, compiled = compile_kind("lori", ["*.c_attn"], factory=hf_gpt2, rank=4, density=0.1)
        drawn.append(_params(compiled, _site(compiled, "transformer.h.1.attn.c_attn")))
    assert torch.equal(drawn[0]["lori_A"], drawn[1]["lori_A"])
    assert torch.equal(drawn[0]["lori_indices"], drawn[1]["lori_indices"])
    assert drawn[0]["lori_A"].shape == (4, 32) and drawn[0]["lori_indices"].shape == (2, round(0.1 * 96 * 4))
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * _count(4, 0.1, 96))
    assert_merge(compiled, args, unmerge=True)


@pytest.mark.parametrize("key, value, message", [
    ("density", 0.0, "must be positive"), ("density", -0.5, "must be positive"),
    ("density", 1.01, r"must be in \[0, 1\]"), ("rank", 0, "must be positive"), ("rank", -1, "must be positive"),
])
def test_bad_options_are_refused_naming_the_option(key, value, message):
    model, args = hf_llama(layers=1)
    options = {"rank": 4, "density": 0.1, key: value}
    with pytest.raises(surgeon.SpecError, match=rf"adapters\[0\]\.{key}: {message}"):
        surgeon.compile(model, args, spec("lori", TARGETS, **options), {"use_cache": False})
