"""RoSA: low-rank plus sparse (W + s B A + S, S on a support fixed at insert); identity insert, exact merge,
parameter count r (in + out) + k, file round trip, option checks."""
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


def _count(rank, density, fan_in, fan_out):
    """The paper's budget: a rank-r LoRA plus k = round(density * out * in) sparse entries (at least one)."""
    return rank * (fan_in + fan_out) + max(1, round(density * fan_in * fan_out))


def test_rosa_lifecycle(tmp_path):
    model, args, compiled = compile_kind("rosa", TARGETS, rank=2, alpha=4, density=0.02)
    assert_identity_insert(compiled, model, args)          # B = 0 and S = 0: bit for bit
    # q_proj: 2 * 128 + round(0.02 * 4096) = 256 + 82; v_proj: 2 * 96 + round(0.02 * 2048) = 192 + 41
    assert _count(2, 0.02, 64, 64) == 338 and _count(2, 0.02, 64, 32) == 233
    assert_param_count(compiled, 2 * (338 + 233))
    site = _site(compiled, "model.layers.0.self_attn.v_proj")
    indices = get_tensor(compiled.module, site.params["rosa_indices"])
    assert indices.dtype == torch.int64 and not indices.requires_grad and indices.shape == (2, 41)
    assert int(indices[0].max()) < 32 and int(indices[1].max()) < 64          # (row, column) of the 32 x 64 W
    assert (indices[0] * 64 + indices[1]).unique().numel() == 41
    # the default mask is the k largest |W| entries of the base weight
    weight = model.model.layers[0].self_attn.v_proj.weight.detach()
    chosen = torch.zeros(weight.numel(), dtype=torch.bool)
    chosen[indices[0] * 64 + indices[1]] = True
    assert weight.abs().flatten()[chosen].min() >= weight.abs().flatten()[~chosen].max()
    assert_trains(compiled, args)                           # A, B and the sparse values; indices stay fixed
    assert torch.equal(get_tensor(compiled.module, site.params["rosa_indices"]), indices)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=True)


def test_merge_adds_s_BA_plus_the_scattered_values():
    """The merged weight is W + (alpha / r) B A + S, computed here from the parameters by hand."""
    model, args, compiled = compile_kind("rosa", TARGETS, rank=2, alpha=6, density=0.05, mask="random")
    randomize_adapters(compiled.module, seed=4)
    site = _site(compiled, "model.layers.1.self_attn.q_proj")
    p = {name: get_tensor(compiled.module, target).detach().double() for name, target in site.params.items()}
    rows, cols = p["rosa_indices"].long()
    S = torch.zeros(64, 64, dtype=torch.float64)
    S[rows, cols] = p["rosa_values"]
    base = model.model.layers[1].self_attn.q_proj.weight.detach().double()
    expected = base + 3.0 * p["rosa_B"] @ p["rosa_A"] + S
    compiled.apply(["merge"])
    merged = compiled.module.get_parameter(site.weight).detach()
    assert_close(merged, expected)
    assert (merged.double() - expected).abs().max() < 1e-6


def test_the_sparse_part_acts_only_on_its_support():
    """With B = 0 the adapter is S alone: it changes the output, and merging it changes W only on the support."""
    model, args, compiled = compile_kind("rosa", ["*.q_proj"], rank=2, density=0.03, mask="random")
    randomize_adapters(compiled.module, seed=2)
    with torch.no_grad():
        for name, p in compiled.module.named_parameters():
            if name.endswith("rosa_B"):
                p.zero_()
    with torch.no_grad():
        assert not torch.allclose(compiled.module(*args).logits, model(*args, use_cache=False).logits)
    site = _site(compiled, "model.layers.0.self_attn.q_proj")
    rows, cols = get_tensor(compiled.module, site.params["rosa_indices"])
    compiled.apply(["merge"])
    changed = compiled.module.get_parameter(site.weight) != model.model.layers[0].self_attn.q_proj.weight
    assert set(changed.flatten().nonzero().flatten().tolist()) == set((rows * 64 + cols).tolist())


def test_random_mask_is_seeded_and_gpt2_conv1d_merges():
    """mask: random draws from the spec's seeded generator (same spec, same support); GPT-2's in x out
    Conv1D weight is seen out x in."""
    supports = []
    for _ in range(2):
        model, args, compiled = compile_kind("rosa", ["*.c_attn"], factory=hf_gpt2, rank=2, density=0.05,
                                             mask="random")
        site = _site(compiled, "transformer.h.0.attn.c_attn")
        supports.append(get_tensor(compiled.module, site.params["rosa_indices"]))
    assert torch.equal(*supports)
    assert supports[0].shape == (2, round(0.05 * 96 * 32)) and int(supports[0][0].max()) < 96
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * _count(2, 0.05, 32, 96))
    assert_merge(compiled, args, unmerge=True)


def test_full_density_is_allowed():
    model, args, compiled = compile_kind("rosa", ["*.v_proj"], rank=1, density=1.0)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * (1 * (64 + 32) + 64 * 32))


@pytest.mark.parametrize("key, value, message", [
    ("density", 0.0, "must be positive"), ("density", -0.1, "must be positive"),
    ("density", 1.5, r"must be in \[0, 1\]"), ("rank", 0, "must be positive"), ("rank", -2, "must be positive"),
    ("mask", "gradient", "must be one of"),
])
def test_bad_options_are_refused_naming_the_option(key, value, message):
    model, args = hf_llama(layers=1)
    options = {"rank": 2, "density": 0.01, key: value}
    with pytest.raises(surgeon.SpecError, match=rf"adapters\[0\]\.{key}: {message}"):
        surgeon.compile(model, args, spec("rosa", TARGETS, **options), {"use_cache": False})
