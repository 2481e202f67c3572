"""DEFT: W' = (I - Q_P T^T) W + s Q_P R (relu: Q_P = P, T = relu(P); qr: Q_P = T = qr(P)), PaRa without R;
init R = T^T W / s from the site's weight as PEFT's, merge from W, unmerge by Woodbury (refused for qr),
PEFT import (r capped at out) and export, on Linear and GPT-2 Conv1D sites."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, randomize_adapters
from tests.passes.helpers import logits

DEFT = kinds()["deft"]
DEFAULTS = {name: option.default for name, option in DEFT.options.items()}
# hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64; a site trains r (in + out)
LLAMA_FANS = 2 * ((64 + 32) + (128 + 64))


def test_deft_lifecycle(tmp_path):
    model, args, compiled = compile_kind("deft", ["*.k_proj", "*.down_proj"], rank=4, alpha=8)
    assert_identity_insert(compiled, model, args, exact=False)   # R = T^T W / s: ΔW = 0 up to rounding
    assert_param_count(compiled, 4 * LLAMA_FANS)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)                                  # relu: unmerge inverts I - P relu(P)^T


def test_conv1d_sites_with_qr(tmp_path):
    # hf_gpt2: c_attn 32 -> 96, mlp.c_proj 128 -> 32, stored in x out
    model, args, compiled = compile_kind("deft", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=3,
                                         decomposition="qr")
    assert_identity_insert(compiled, model, args, exact=False)
    assert_param_count(compiled, 3 * 2 * ((32 + 96) + (128 + 32)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=False)
    with pytest.raises(surgeon.SpecError, match="span.*nothing was unmerged"):
        compiled.apply(["unmerge"])


def _peft_layer(base, P, R=None, **config):
    peft = pytest.importorskip("peft")
    from peft.tuners.deft.layer import DeftLinear

    layer = DeftLinear(base, "default", peft.DeftConfig(**config), r=config.get("r", 8))
    with torch.no_grad():
        layer.deft_P["default"].copy_(P)
        if R is not None:
            layer.deft_R["default"].copy_(R)
    return layer


@pytest.mark.parametrize("config", [{"decomposition_method": "relu"}, {"decomposition_method": "qr", "alpha": 4},
                                    {"para": True}])
def test_init_and_delta_match_peft(config):
    """R starts at T^T W / s with PEFT's projection of the same P; the delta (from W) is PEFT's."""
    base = torch.nn.Linear(24, 20)
    opts = {**DEFAULTS, "rank": 5, **{{"decomposition_method": "decomposition"}.get(k, k): v
                                      for k, v in config.items()}}
    fresh = DEFT.init(opts, 24, 20, torch.float32, torch.Generator().manual_seed(0), base.weight.detach())
    layer = _peft_layer(base, fresh["deft_P"], fresh.get("deft_R"), r=5, **config)
    if not opts["para"]:
        _, right = layer._project(fresh["deft_P"], "default")
        assert torch.equal(fresh["deft_R"], (right.T @ base.weight.detach()) / layer.deft_scaling["default"])
    gen = torch.Generator().manual_seed(4)
    params = {name: t + torch.randn(t.shape, generator=gen) * 0.2 for name, t in fresh.items()}
    layer = _peft_layer(base, params["deft_P"], params.get("deft_R"), r=5, **config)
    delta = DEFT.delta_weight(params, opts, base.weight.detach())
    assert delta.abs().max() > 1e-2
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-6)


def test_relu_unmerge_recovers_the_weight():
    """W' = (I - P relu(P)^T) W + s P R is inverted exactly (Woodbury), not by subtracting a delta of W'."""
    opts = {**DEFAULTS, "rank": 4}
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 10, generator=gen, dtype=torch.float64)
    params = {"deft_P": torch.randn(12, 4, generator=gen, dtype=torch.float64),
              "deft_R": torch.randn(4, 10, generator=gen, dtype=torch.float64)}
    merged = weight + DEFT.delta_weight(params, opts, weight)
    torch.testing.assert_close(merged + DEFT.undo_delta(params, opts, merged), weight)


def test_para_removes_a_subspace_and_changes_the_function():
    model, args, compiled = compile_kind("deft", ["*.q_proj"], rank=2, para=True)
    assert compiled.report.rows[-1].check == "changes function"
    assert_param_count(compiled, 2 * 2 * 64)
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)
    site = compiled.adapters[NAME].sites[0]
    P = get_tensor(compiled.module, site.params["deft_P"])
    assert set(site.params) == {"deft_P"} and P.shape == (64, 2)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("deft", ["*.q_proj"], rank=2, init="random", init_scale=5.0)
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("deft", ["*.q_proj", "*.up_proj"], rank=4, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


@pytest.mark.parametrize("options", [
    {"r": 40, "alpha": 16, "deft_dropout": 0.1},           # capped at k_proj's 32 outputs, as PEFT caps it
    {"r": 3, "decomposition_method": "qr"},
    {"r": 2, "para": True},
])
def test_peft_parity(tmp_path, options):
    """A randomized PEFT DEFT checkpoint imports with PEFT's outputs before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.DeftConfig(target_modules=["q_proj", "k_proj", "down_proj"], **options)
    compiled = peft_parity(config, tmp_path)
    ranks = sorted(s.options["rank"] for s in compiled.adapters[NAME].sites)
    assert ranks == ([32, 32, 40, 40, 40, 40] if options["r"] == 40 else [options["r"]] * 6)


def test_peft_parity_on_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.DeftConfig(target_modules=["c_attn", "c_proj"], r=3, fan_in_fan_out=True)
    peft_parity(config, tmp_path, factory=hf_gpt2)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("deft", ["*.q_proj", "*.k_proj", "*.up_proj"], rank=5, alpha=10,
                                         decomposition="qr")
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_on_conv1d(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("deft", ["*.c_attn", "*.mlp.c_fc"], factory=hf_gpt2, rank=2)
    randomize_adapters(compiled.module)
    peft_export(compiled, model, args, tmp_path)


def test_a_malformed_checkpoint_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.DeftConfig(target_modules=["q_proj"], r=4), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("deft_R")}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="do not fit r=4, para=False"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_rank_above_out_is_refused():
    with pytest.raises(surgeon.SpecError, match="at most out = 32"):
        compile_kind("deft", ["*.k_proj"], rank=40)
