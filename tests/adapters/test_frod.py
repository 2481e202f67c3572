"""FRoD: W' = U (S + diag λ) V^T with V a basis from the base weights, U = W V^-T normalized, S sparse on
seeded off-diagonal positions; exact merge (unmerge refused), PEFT import (V and positions read from the
checkpoint, U recomputed as PEFT does) and export, on linear and Conv1D sites."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from surgeon.adapters.frod import role, sparse_count
from tests.adapters.helpers import (assert_merge_checkpoint_matches, KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits


def test_frod_lifecycle(tmp_path):
    # hf_llama: k_proj 64 -> 32 (out < in: V from an SVD), down_proj 128 -> 64; 2 layers each
    model, args, compiled = compile_kind("frod", ["*.k_proj", "*.down_proj"], sparse_rate=0.02)
    assert_identity_insert(compiled, model, args, exact=False)   # W' = U Λ0 V^T = W up to rounding
    assert compiled.report.rows[-1].check.startswith("rel err")
    assert_param_count(compiled, 2 * (64 + sparse_count(64, 0.02)) + 2 * (128 + sparse_count(128, 0.02)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=False)
    with pytest.raises(Exception, match="U was computed from that W"):
        compiled.apply(["unmerge"])


def test_conv1d_sites(tmp_path):
    # hf_gpt2: c_attn 32 -> 96 (QR basis), mlp.c_proj 128 -> 32 (SVD basis), stored in x out
    model, args, compiled = compile_kind("frod", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, sparse_rate=0.05)
    assert_identity_insert(compiled, model, args, exact=False)
    assert_param_count(compiled, 2 * (32 + sparse_count(32, 0.05)) + 2 * (128 + sparse_count(128, 0.05)))
    assert_trains(compiled, args)
    assert_merge(compiled, args, unmerge=False)


@pytest.mark.parametrize("target", ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"])
def test_basis_positions_and_delta_are_peft_s(target):
    """For a role with one module, V, S's positions, Λ0 and U are PEFT's bit for bit, ΔW is its
    get_delta_weight and the forward its layer's (k_proj: out < in, V from an SVD and U's extra columns
    rounding noise; up_proj: V from the QR path)."""
    peft = pytest.importorskip("peft")
    from surgeon.adapters import EagerBranch
    from surgeon.adapters.frod import frod_u, output_basis

    model, _ = hf_llama()
    config = peft.FrodConfig(target_modules=[target], sparse_rate=0.05, projection_prng_key=3, init_weights=False,
                             progressbar=False)
    layer = peft.get_peft_model(copy.deepcopy(model), config).base_model.model.get_submodule(target)
    weight = layer.get_base_layer().weight.detach()
    opts = {"sparse_rate": 0.05, "projection_seed": 3, "regularization": 1e-3, "init": "default", "dropout": 0.0}
    frod = kinds()["frod"]
    fresh = frod.init(opts, weight.shape[1], weight.shape[0], torch.float32, torch.Generator(), weight)
    assert torch.equal(fresh["frod_V"], layer.frod_V["default"])
    assert torch.equal(fresh["frod_s_indices"], layer.frod_s_indices["default"])
    assert torch.equal(output_basis(weight, fresh["frod_V"])[0], layer.frod_U["default"])
    assert torch.equal(frod_u(weight, fresh["frod_V"], False), layer.frod_U["default"])
    params = {"frod_lambda_l": layer.frod_lambda_l["default"].detach(), "frod_V": layer.frod_V["default"],
              "frod_lambda_s_values": layer.frod_lambda_s_values["default"].detach(),
              "frod_s_indices": layer.frod_s_indices["default"]}
    want = layer.get_delta_weight("default").detach()
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(frod.delta_weight(params, opts, weight), want, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    got = frod.forward(EagerBranch((weight.shape[1], weight.shape[0]), weight), x, x @ weight.T, params, opts)
    torch.testing.assert_close(got, layer(x).detach(), rtol=1e-5, atol=1e-6)


def test_roles_are_peft_s():
    pytest.importorskip("peft")
    from peft.tuners.frod.model import _category_from_key

    for path in ("model.layers.3.self_attn.q_proj", "transformer.h.0.attn.c_attn", "layers.0.7", "lm_head",
                 "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"):
        assert role(path) == _category_from_key(path), path


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("frod", ["*.q_proj"], init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("frod", ["*.q_proj", "*.up_proj"], sparse_rate=0.02, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


def test_peft_export_one_module_per_role(tmp_path):
    """PEFT loads the export, rebuilds U from the saved V and matches surgeon's outputs."""
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("frod", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                                  "model.layers.1.self_attn.k_proj"], sparse_rate=0.03,
                                         projection_seed=4)
    peft_export(compiled, model, args, tmp_path)


def test_export_refuses_a_role_with_per_module_bases(tmp_path):
    model, args, compiled = compile_kind("frod", ["*.q_proj"])
    with pytest.raises(surgeon.SpecError, match="share PEFT's module role 'self_attn_q_proj'"):
        compiled.save_adapter(NAME, tmp_path, format="peft")


def test_save_projection_false_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.FrodConfig(target_modules=["q_proj"], save_projection=False, progressbar=False)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    with pytest.raises(surgeon.SpecError, match="save_projection=False: the checkpoint holds no frod_V"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_peft_parity(tmp_path):
    """A randomized PEFT FRoD checkpoint (roles over two layers: PEFT's joint bases; dropout) imports with
    PEFT's outputs before and after merge, and exports back."""
    peft = pytest.importorskip("peft")
    config = peft.FrodConfig(target_modules=["q_proj", "k_proj", "down_proj"], sparse_rate=0.03,
                             projection_prng_key=5, frod_dropout=0.1, progressbar=False)
    compiled = peft_parity(config, tmp_path / "in", scale=0.05)
    state = compiled.adapters[NAME]
    assert state.spec.options["projection_seed"] == 5 and state.spec.options["dropout"] == 0.1
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "again", scale=0.05)
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    peft_export(again, model, args, tmp_path / "out")


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.FrodConfig(target_modules=["c_attn", "c_fc"], sparse_rate=0.05, progressbar=False), tmp_path,
                scale=0.05, factory=hf_gpt2)


def test_malformed_basis_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.FrodConfig(target_modules=["q_proj"], progressbar=False),
                                                tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.frod_V.self_attn_q_proj"] = tensors["base_model.frod_V.self_attn_q_proj"][:, :10].contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="role 'self_attn_q_proj'\\): frod_V must be 64 x 64"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_merge_checkpoint_on_disk_equals_the_in_memory_merge(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.FrodConfig(target_modules=["q_proj", "down_proj"], sparse_rate=0.02, progressbar=False)
    assert_merge_checkpoint_matches(config, tmp_path, scale=0.05)
