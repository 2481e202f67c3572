"""PVeRA: VeRA's frozen shared projections with a mean / log-variance split; the inference path (z = mu) is
compiled, merged exactly and matched with PEFT; train mode samples z = mu + eps exp(logvar / 2)."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, randomize_adapters


def test_pvera_lifecycle(tmp_path):
    # hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64; a site trains d (2r) and b (out)
    model, args, compiled = compile_kind("pvera", ["*.k_proj", "*.down_proj"], rank=4)
    assert_identity_insert(compiled, model, args)      # b = 0
    assert_param_count(compiled, 2 * ((8 + 32) + (8 + 64)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    model, args, compiled = compile_kind("pvera", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=3)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * ((6 + 96) + (6 + 32)))
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_delta_is_peft_s_inference_update():
    peft = pytest.importorskip("peft")
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.pvera.layer import Linear

    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(10, 24, generator=gen), torch.randn(20, 5, generator=gen)
    base = torch.nn.Linear(24, 20)
    layer = Linear(base, BufferDict({"default": A}), BufferDict({"default": B}), "default", 5,
                   peft.PveraConfig(r=5))
    with torch.no_grad():
        layer.pvera_lambda_d["default"].copy_(torch.randn(10, generator=gen))
        layer.pvera_lambda_b["default"].copy_(torch.randn(20, generator=gen))
    params = {"pvera_A": A, "pvera_B": B, "pvera_lambda_d": layer.pvera_lambda_d["default"].detach(),
              "pvera_lambda_b": layer.pvera_lambda_b["default"].detach()}
    delta = kinds()["pvera"].delta_weight(params, {"rank": 5}, base.weight.detach())
    assert delta.abs().max() > 1e-2
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 24, generator=gen)
    layer.eval()
    torch.testing.assert_close(base(x) + x @ delta.T, layer(x).detach(), rtol=1e-6, atol=1e-6)


def test_train_mode_samples_and_eval_mode_is_the_mean():
    """Eval: deterministic, the mean path. Train: two runs differ (fresh eps), the log-variance half of d
    gets a gradient only there, and eval afterwards gives the eval output again."""
    model, args, compiled = compile_kind("pvera", ["*.q_proj", "*.up_proj"], rank=4)
    randomize_adapters(compiled.module)
    module, site = compiled.module, compiled.adapters[NAME].sites[0]
    d = module.get_parameter(site.params["pvera_lambda_d"])
    evaluated = module(*args).logits
    evaluated.square().mean().backward()
    assert d.grad[:4].abs().sum() > 0 and d.grad[4:].abs().sum() == 0      # eval: logvar unused
    module.zero_grad(set_to_none=True)
    module.train()
    first, second = module(*args).logits, module(*args).logits
    assert not torch.allclose(first, second) and not torch.allclose(first, evaluated)
    first.square().mean().backward()
    assert d.grad[4:].abs().sum() > 0                                       # train: sampled with exp(logvar / 2)
    module.eval()
    assert torch.equal(module(*args).logits, evaluated)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("pvera", ["*.q_proj"], rank=4, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


def test_peft_parity(tmp_path):
    """PEFT's PVeRA in eval (its inference path, the mean) imports with PEFT's outputs, before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.PveraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=6, pvera_dropout=0.1,
                              projection_prng_key=3)
    compiled = peft_parity(config, tmp_path)
    options = compiled.adapters[NAME].spec.options
    assert (options["rank"], options["dropout"], options["projection_seed"]) == (6, 0.1, 3)
    assert compiled.adapters[NAME].sites[0].merged["pvera_A"].shape == (12, 128)   # PEFT's, sized for down_proj


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.PveraConfig(target_modules=["c_attn", "c_fc"], r=4, fan_in_fan_out=True), tmp_path,
                factory=hf_gpt2)


def test_sampling_at_inference_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.PveraConfig(target_modules=["q_proj"], r=4, sample_at_inference=True)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    with pytest.raises(surgeon.SpecError, match="sample_at_inference=True samples in eval mode too"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_peft_export(tmp_path):
    """One layer shape (PEFT shares one pair of projections): PEFT loads surgeon's adapter with its outputs."""
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("pvera", ["*.q_proj", "*.o_proj"], rank=5)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_of_an_import_with_several_shapes(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.PveraConfig(target_modules=["k_proj", "down_proj"], r=4)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "in")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, KW)
    peft_export(compiled, model, args, tmp_path / "out")


def test_export_refuses_projections_of_independent_shapes(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("pvera", ["*.k_proj", "*.down_proj"], rank=4)
    with pytest.raises(surgeon.SpecError, match="not slices of the largest ones"):
        compiled.save_adapter(NAME, tmp_path, format="peft")
