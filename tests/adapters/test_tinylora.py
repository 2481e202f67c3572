"""TinyLoRA: LoRA-XS's frozen SVD factors with R = sum_i v_i P_i, v a tiny trained vector shared per
weight-tying group; PEFT's factors and projections drawn at insert, PEFT import (layers read from the
projections) and export on LLaMA and GPT-2."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits


def _vectors(module) -> list[str]:
    return sorted(n for n, _ in module.named_parameters() if "tinylora_v" in n)


@pytest.mark.parametrize("tying,groups", [(0.0, 4), (0.5, 2), (1.0, 1)])
def test_tinylora_lifecycle(tying, groups, tmp_path):
    # 4 sites (q_proj 64 -> 64, down_proj 128 -> 64, two layers): G = round(4 (1 - tying)) vectors of u = 8
    model, args, compiled = compile_kind("tinylora", ["*.q_proj", "*.down_proj"], rank=2, u=8, weight_tying=tying)
    assert_identity_insert(compiled, model, args)     # v = 0
    assert len(_vectors(compiled.module)) == groups
    assert_param_count(compiled, 8 * groups)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    model, args, compiled = compile_kind("tinylora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=3, u=4)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 4 * 4)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_uniform_init_changes_the_function():
    model, args, compiled = compile_kind("tinylora", ["*.q_proj"], rank=2, u=8, init="uniform")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("tinylora", ["*.q_proj", "*.down_proj"], rank=2, u=8, init="uniform",
                                     dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


def test_factors_and_projections_are_peft_s():
    """At insert surgeon computes PEFT's A and B (the SVD, singular values split) and draws PEFT's P: the layer
    index is the site's place in module order, as PEFT numbers its targets, and the groups follow."""
    peft = pytest.importorskip("peft")
    model, args = hf_llama()
    targets = ["q_proj", "k_proj", "down_proj"]
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.TinyLoraConfig(target_modules=targets, r=2, u=8,
                                                                           weight_tying=0.5, projection_seed=3))
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "tinylora", "rank": 2, "u": 8,
                                                           "weight_tying": 0.5, "projection_seed": 3,
                                                           "targets": [f"*.{t}" for t in targets]}]}, KW)
    for site in compiled.adapters[NAME].sites:
        layer = wrapped.base_model.model.get_submodule(site.path)
        for name in ("tinylora_A", "tinylora_B", "tinylora_P"):
            ours = compiled.module.get_parameter(site.params[name])
            torch.testing.assert_close(ours, getattr(layer, name)["default"], rtol=1e-5, atol=1e-6,
                                       msg=f"{site.path}.{name}")
        assert layer._tinylora_v_key["default"] == str(site.options["group"])


@pytest.mark.parametrize("tying", [0.0, 0.5, 1.0])
def test_peft_parity(tying, tmp_path):
    """A randomized PEFT checkpoint imports with PEFT's outputs, before and after merge; each module's layer (and
    so its group's v) is read from its projections."""
    peft = pytest.importorskip("peft")
    config = peft.TinyLoraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=2, u=8, weight_tying=tying,
                                 tinylora_dropout=0.1, projection_seed=5)
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert [s.options["layer"] for s in state.sites] == list(range(6))
    assert state.spec.options["dropout"] == 0.1 and state.spec.options["projection_seed"] == 5


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.TinyLoraConfig(target_modules=["c_attn", "c_fc"], r=3, u=4, weight_tying=0.3,
                                    fan_in_fan_out=True), tmp_path, factory=hf_gpt2)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("tinylora", ["*.q_proj", "*.k_proj", "*.down_proj"], rank=2, u=8,
                                         weight_tying=0.4)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_of_an_import(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.TinyLoraConfig(target_modules=["k_proj", "up_proj"], r=4, u=6, weight_tying=0.5)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "in")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, KW)
    peft_export(compiled, model, args, tmp_path / "out")


def test_export_refuses_groups_peft_would_not_make(tmp_path):
    from surgeon.adapter_io import save_peft_dir

    _, _, compiled = compile_kind("tinylora", ["*.q_proj", "*.down_proj"], rank=2, u=8, weight_tying=0.5)
    state = compiled.adapters[NAME]
    site_options = {s.path: {"layer": s.options["layer"], "group": s.options["group"]} for s in state.sites}
    site_options[state.sites[1].path]["group"] = 1
    with pytest.raises(surgeon.SpecError, match="but PEFT gives the module at that place"):
        save_peft_dir(tmp_path, state.spec.options, compiled.adapter_weights(NAME), set(), kind="tinylora",
                      site_options=site_options)


def test_import_without_projections_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.TinyLoraConfig(target_modules=["q_proj"], r=2, u=4, save_projection=False)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    with pytest.raises(surgeon.SpecError, match="save_projection=False"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
