"""LoRA's `init: corda` (CorDA, IPM and KPM): factors from the SVD of W times the covariance of the site's
inputs over the compile's example inputs, the base keeping the residual.

Checked against PEFT 0.21's own preprocess_corda + get_peft_model on the same model and the same batch-1
calibration input: the covariances (surgeon.calibration against PEFT's forward hook), A, B and the
residual base weights, and the function; then the lifecycle (trains, merges, round trip with the
residual recomputed from the same example inputs) and the refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import surgeon
from surgeon.adapters.corda import corda_components, corda_factors
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_close, assert_merge, assert_param_count, assert_trains, spec)
from tests.conftest import assert_untouched, hf_gpt2, hf_llama, snapshot
from tests.passes.helpers import logits

peft = pytest.importorskip("peft")
TARGETS = ["*.q_proj", "*.down_proj"]   # hf_llama: q_proj 64 -> 64, down_proj 128 -> 64
RANK, ALPHA, SCALE = 4, 8, 2.0


def _batch_one():
    model, args = hf_llama()
    return model, (args[0][:1],)   # PEFT's CorDA hook takes a batch-1 call's input as its rows


def _peft_corda(model, args, mode: str, targets=("q_proj", "down_proj")):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    wrapped = copy.deepcopy(model)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))
    with torch.no_grad():
        preprocess_corda(wrapped, config, run_model=lambda: wrapped(*args, **KW))
    return peft.get_peft_model(wrapped, config).eval()


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_factors_and_residual_equal_peft(mode):
    model, args = _batch_one()
    before = snapshot(model)
    compiled = surgeon.compile(model, args, spec("lora", TARGETS, rank=RANK, alpha=ALPHA, init="corda",
                                                 corda_mode=mode), KW)
    assert_untouched(model, before)
    wrapped = _peft_corda(model, args, mode)
    sites = compiled.adapters[NAME].sites
    assert len(sites) == 4 and compiled.report.rows[-1].matches == 4
    for site in sites:
        layer = wrapped.base_model.model.get_submodule(site.path)
        for ours, theirs in (("lora_A", layer.lora_A["default"].weight), ("lora_B", layer.lora_B["default"].weight)):
            torch.testing.assert_close(get_tensor(compiled.module, site.params[ours]), theirs.detach(),
                                       rtol=1e-4, atol=1e-5, msg=f"{site.path} {ours}")
        torch.testing.assert_close(get_tensor(compiled.module, site.weight), layer.base_layer.weight.detach(),
                                   rtol=1e-4, atol=1e-5)
    assert_close(logits(compiled.module, args), logits(model, args))   # residual + s B A == W up to rounding
    assert_close(logits(wrapped, args), logits(model, args))


def test_ipm_takes_the_largest_and_kpm_the_smallest_components():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 32, generator=gen), torch.randn(200, 32, generator=gen)
    cov = x.T @ x / 200
    U, S, V = corda_components(weight, cov)
    torch.testing.assert_close(U * S @ V.T, weight, rtol=1e-4, atol=1e-4)   # W = U S V^T exactly (up to rounding)
    for mode, pick in (("ipm", slice(0, 3)), ("kpm", slice(21, 24))):
        A, B = corda_factors(weight, cov, 3, SCALE, mode)
        torch.testing.assert_close(SCALE * B @ A, (U[:, pick] * S[pick]) @ V[:, pick].T, rtol=1e-4, atol=1e-5)
    assert S[0] > S[-1]


def test_gpt2_conv1d_sites_equal_peft():
    model, args = hf_gpt2()
    args = (args[0][:1],)
    compiled = surgeon.compile(model, args, spec("lora", ["*.c_attn"], rank=RANK, alpha=ALPHA, init="corda"), KW)
    wrapped = _peft_corda(model, args, "ipm", targets=("c_attn",))
    for site in compiled.adapters[NAME].sites:
        layer = wrapped.base_model.model.get_submodule(site.path)
        torch.testing.assert_close(get_tensor(compiled.module, site.params["lora_A"]),
                                   layer.lora_A["default"].weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(get_tensor(compiled.module, site.weight), layer.base_layer.weight.detach(),
                                   rtol=1e-4, atol=1e-5)


def test_lifecycle_and_round_trip_with_the_same_calibration_inputs(tmp_path):
    model, args = _batch_one()
    compiled = surgeon.compile(model, args, spec("lora", TARGETS, rank=RANK, alpha=ALPHA, init="corda",
                                                 corda_mode="kpm"), KW)
    assert_param_count(compiled, RANK * 2 * ((64 + 64) + (128 + 64)))
    assert_trains(compiled, args)
    torch.manual_seed(0)
    for site in compiled.adapters[NAME].sites:
        get_tensor(compiled.module, site.params["lora_B"]).data.add_(0.05)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "saved")
    again = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_dir": str(tmp_path / "saved")}]}, KW)
    assert torch.equal(logits(again.module, args), expected)   # the residual recomputed from W and the same inputs
    compiled.save_adapter(NAME, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "corda" and config["corda_config"] == {"corda_method": "kpm"}
    imported = surgeon.compile(model, args, {"adapters": [{"name": "x", "from_peft": str(tmp_path / "peft")}]}, KW)
    assert imported.adapters["x"].spec.options["corda_mode"] == "kpm"
    torch.testing.assert_close(logits(imported.module, args), expected, rtol=1e-5, atol=1e-5)
    assert_merge(compiled, args)


def test_refusals_name_the_reason():
    model, args = _batch_one()
    with pytest.raises(surgeon.SpecError, match="corda_mode"):
        surgeon.compile(model, args, spec("lora", TARGETS, init="corda", corda_mode="bogus"), KW)
    with pytest.raises(surgeon.SpecError, match="only a compile with example inputs"):
        corda_factors(torch.randn(4, 4), None, 2, 1.0, "ipm")
    compiled = surgeon.compile(model, args, spec("lora", TARGETS, rank=RANK, init="corda"), KW)
    with pytest.raises(surgeon.SurgeonError, match="corda init rewrote the base weight"):
        compiled.module(*args, adapter_names=[NAME])
