"""SHiRA: trained values on a fixed sparse support of W (indices frozen, stored with the adapter);
PEFT import (indices as PEFT built them) and export."""
from __future__ import annotations

import copy

import pytest
import torch

from surgeon.errors import SpecError
from surgeon.graph import get_tensor
from tests.adapters.helpers import (NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_parity)
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import logits


def _site(compiled, path):
    return next(s for s in compiled.adapters[NAME].sites if s.path == path)


def test_shira_lifecycle(tmp_path):
    model, args, compiled = compile_kind("shira", ["*.q_proj", "*.down_proj"], fraction=0.02)
    assert_identity_insert(compiled, model, args)      # values = 0
    # k = round(0.02 * out * in): q_proj 64 x 64 -> 82, down_proj 64 x 128 -> 164, two layers
    assert_param_count(compiled, 2 * (82 + 164))
    indices = get_tensor(compiled.module, _site(compiled, "model.layers.0.mlp.down_proj").params["shira_indices"])
    assert indices.dtype == torch.int64 and not indices.requires_grad and indices.shape == (2, 164)
    assert int(indices[0].max()) < 64 and int(indices[1].max()) < 128      # (row, column) of the 64 x 128 W
    assert (indices[0] * 128 + indices[1]).unique().numel() == 164
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)
    # the merged delta touches exactly the support
    site = _site(compiled, "model.layers.1.self_attn.q_proj")
    compiled.apply(["merge"])
    changed = (compiled.module.get_parameter(site.weight) != model.model.layers[1].self_attn.q_proj.weight).flatten()
    rows, cols = site.merged["shira_indices"]
    assert set(changed.nonzero().flatten().tolist()) <= set((rows * 64 + cols).tolist())


def test_magnitude_mask_on_conv1d_sites():
    model, args, compiled = compile_kind("shira", ["*.c_attn"], factory=hf_gpt2, fraction=0.05, mask="magnitude")
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * round(0.05 * 32 * 96))
    site = _site(compiled, "transformer.h.0.attn.c_attn")
    rows, cols = get_tensor(compiled.module, site.params["shira_indices"])
    weight = model.transformer.h[0].attn.c_attn.weight.detach().t()    # Conv1D stores in x out
    magnitudes, indices = weight.abs().flatten(), rows * 32 + cols
    assert magnitudes[indices].min() >= magnitudes[~torch.isin(torch.arange(magnitudes.numel()), indices)].max()
    assert_merge(compiled, args)


def test_magnitude_mask_adapter_reloads_from_its_folder(tmp_path):
    """Loading checks shapes with a meta weight; the magnitude mask's `.cpu()` then failed
    ("Cannot copy out of meta tensor"), so a saved magnitude-mask SHiRA could not be loaded."""
    model, args, compiled = compile_kind("shira", ["*.q_proj"], fraction=0.05, mask="magnitude")
    randomize_adapters(compiled.module)
    assert_round_trip(compiled, model, args, tmp_path)


def test_peft_parity(tmp_path):
    """PEFT's SHiRA (k = r * (in + out), its own seeded masks) imports with PEFT's exact support."""
    peft = pytest.importorskip("peft")
    config = peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], random_seed=11)
    compiled = peft_parity(config, tmp_path)
    wrapped = peft.PeftModel.from_pretrained(hf_llama()[0], tmp_path)
    for site in compiled.adapters[NAME].sites:       # merged by peft_parity: the params sit in site.merged
        layer = wrapped.base_model.model.get_submodule(site.path)
        assert torch.equal(site.merged["shira_indices"], layer.shira_indices["default"].long())
        assert torch.equal(site.merged["shira_values"], layer.shira_weight["default"].detach())
        assert site.merged["shira_values"].numel() == 2 * (site.in_features + site.out_features)


def test_peft_export(tmp_path):
    peft = pytest.importorskip("peft")
    model, args, compiled = compile_kind("shira", ["*.q_proj", "*.down_proj"], rank=3, mask="magnitude")
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * 3 * (128 + 192))
    randomize_adapters(compiled.module, seed=5)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "peft", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    assert_close(logits(loaded, args), expected)
    again = compile_kind("shira", ["*.q_proj"], fraction=0.1)[2]
    with pytest.raises(SpecError, match="sized by fraction"):
        again.save_adapter(NAME, tmp_path / "none", format="peft")
