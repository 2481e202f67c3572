"""SHiRA: trained values on a fixed sparse support of W (indices frozen, stored with the adapter)."""
from __future__ import annotations

import torch

from surgeon.graph import get_tensor
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind)
from tests.conftest import hf_gpt2


def _site(compiled, path):
    return next(s for s in compiled.adapters[NAME].sites if s.path == path)


def test_shira_lifecycle(tmp_path):
    model, args, compiled = compile_kind("shira", ["*.q_proj", "*.down_proj"], fraction=0.02)
    assert_identity_insert(compiled, model, args)      # values = 0
    # k = round(0.02 * out * in): q_proj 64 x 64 -> 82, down_proj 64 x 128 -> 164, two layers
    assert_param_count(compiled, 2 * (82 + 164))
    indices = get_tensor(compiled.module, _site(compiled, "model.layers.0.mlp.down_proj").params["shira_indices"])
    assert indices.dtype == torch.int64 and not indices.requires_grad
    assert indices.unique().numel() == 164 and int(indices.max()) < 64 * 128
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)
    # the merged delta touches exactly the support
    site = _site(compiled, "model.layers.1.self_attn.q_proj")
    compiled.apply(["merge"])
    changed = (compiled.module.get_parameter(site.weight) != model.model.layers[1].self_attn.q_proj.weight).flatten()
    assert set(changed.nonzero().flatten().tolist()) <= set(site.merged["shira_indices"].tolist())


def test_magnitude_mask_on_conv1d_sites():
    model, args, compiled = compile_kind("shira", ["*.c_attn"], factory=hf_gpt2, fraction=0.05, mask="magnitude")
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * round(0.05 * 32 * 96))
    site = _site(compiled, "transformer.h.0.attn.c_attn")
    indices = get_tensor(compiled.module, site.params["shira_indices"])
    weight = model.transformer.h[0].attn.c_attn.weight.detach().t()    # Conv1D stores in x out
    magnitudes = weight.abs().flatten()
    assert magnitudes[indices].min() >= magnitudes[~torch.isin(torch.arange(magnitudes.numel()), indices)].max()
    assert_merge(compiled, args)
