"""DeLoRA: y + B Ξ A (w ⊙ x) with Ξ = diag(λ / r / (‖a_i‖ ‖b_i‖)) and w the base weight's frozen column
norms; exact merge and unmerge (ΔW does not depend on W), PEFT import (rank_pattern, module_dropout) and
export."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from surgeon.graph import get_tensor
from tests.adapters.helpers import (assert_merge_checkpoint_matches, KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2
from tests.passes.helpers import logits

# hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64; a site trains r (in + out) + 1 (λ)
LLAMA_FANS = 2 * ((64 + 32) + (128 + 64))


def test_delora_lifecycle(tmp_path):
    model, args, compiled = compile_kind("delora", ["*.k_proj", "*.down_proj"], rank=4)
    assert_identity_insert(compiled, model, args)      # B = 0: the branch adds exact zeros
    assert_param_count(compiled, 4 * LLAMA_FANS + 4)   # w_norm is frozen: not counted, not trained
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_weight_norms_are_the_base_columns_and_frozen():
    model, args, compiled = compile_kind("delora", ["*.down_proj"], rank=4, **{"lambda": 3.0})
    site = compiled.adapters[NAME].sites[0]
    weight = dict(model.named_parameters())[f"{site.path}.weight"]
    norms = get_tensor(compiled.module, site.params["delora_w_norm"])
    assert torch.equal(norms, torch.linalg.vector_norm(weight.detach(), 2, dim=0))
    assert not compiled.module.get_parameter(site.params["delora_w_norm"]).requires_grad
    assert get_tensor(compiled.module, site.params["delora_lambda"]).tolist() == [3.0]


def test_conv1d_sites(tmp_path):
    # hf_gpt2: c_attn 32 -> 96, mlp.c_proj 128 -> 32 (stored in x out: the norms are over W's out x in columns)
    model, args, compiled = compile_kind("delora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=3)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 3 * 2 * ((32 + 96) + (128 + 32)) + 4)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_delta_and_init_match_peft():
    """Surgeon's delta is PEFT's get_delta_weight; its init takes PEFT's w_norm from the same weight."""
    peft = pytest.importorskip("peft")
    from peft.tuners.delora.layer import DeloraLinear

    delora = kinds()["delora"]
    base = torch.nn.Linear(24, 20)
    layer = DeloraLinear(base, "default", peft.DeloraConfig(r=5, init_weights=False), r=5, delora_lambda=2.5)
    params = {name: getattr(layer, name)["default"].detach() for name in
              ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")}
    opts = {"rank": 5, "lambda": 2.5, "init": "default", "dropout": 0.0}
    delta = delora.delta_weight(params, opts, base.weight.detach())
    assert delta.dtype == torch.float32 and delta.abs().max() > 1e-2    # merge_dtype of a float32 weight
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-6, atol=1e-7)
    exact = delora.delta_weight(params, opts, base.weight.detach().double())
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, delta.double(), rtol=1e-6, atol=1e-7)
    fresh = delora.init(opts, 24, 20, torch.float32, torch.Generator().manual_seed(0), base.weight.detach())
    assert torch.equal(fresh["delora_w_norm"], params["delora_w_norm"])
    assert fresh["delora_lambda"].tolist() == [2.5] and not fresh["delora_B"].any()


def test_update_norm_is_bounded_by_lambda():
    """The point of DeLoRA: however large A and B grow, ‖B Ξ A‖_F <= λ (each normalized rank-one term
    has norm λ / r) before the input scaling by w."""
    delora = kinds()["delora"]
    gen = torch.Generator().manual_seed(1)
    params = {"delora_A": torch.randn(4, 16, generator=gen) * 100, "delora_B": torch.randn(12, 4, generator=gen) * 100,
              "delora_lambda": torch.tensor([0.7]), "delora_w_norm": torch.ones(16)}
    delta = delora.delta_weight(params, {"rank": 4}, torch.zeros(12, 16, dtype=torch.float64))
    assert torch.linalg.matrix_norm(delta) <= 0.7 + 1e-9


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("delora", ["*.q_proj"], rank=2, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("delora", ["*.q_proj", "*.up_proj"], rank=4, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


def test_peft_parity(tmp_path):
    """A randomized PEFT DeLoRA checkpoint (per-module ranks, lambda, module dropout) imports with PEFT's
    outputs before and after merge; it exports back with its rank_pattern."""
    peft = pytest.importorskip("peft")
    config = peft.DeloraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=6, rank_pattern={"down_proj": 2},
                               delora_lambda=4, module_dropout=0.1)
    compiled = peft_parity(config, tmp_path / "in")
    state = compiled.adapters[NAME]
    assert state.spec.options["rank"] == 6 and state.spec.options["lambda"] == 4.0
    assert state.spec.options["dropout"] == 0.1
    assert sorted(s.options["rank"] for s in state.sites) == [2, 2, 6, 6, 6, 6]
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "again")
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    peft_export(again, model, args, tmp_path / "out")   # the per-module ranks go out as rank_pattern


def test_merge_checkpoint_on_disk_equals_the_in_memory_merge(tmp_path):
    """merge-checkpoint reads the saved norms (not the base weight's current ones) and writes, tensor by
    tensor, what the merge pass writes in memory."""
    peft = pytest.importorskip("peft")
    config = peft.DeloraConfig(target_modules=["q_proj", "down_proj"], r=4, rank_pattern={"down_proj": 2})
    assert_merge_checkpoint_matches(config, tmp_path)


def test_a_checkpoint_without_weight_norms_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.DeloraConfig(target_modules=["q_proj"], r=2), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("delora_w_norm")},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="needs a one-element delora_lambda and delora_w_norm"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("delora", ["*.q_proj", "*.k_proj", "*.up_proj"], rank=5, **{"lambda": 2.0})
    peft_export(compiled, model, args, tmp_path)


def test_rank_above_min_in_out_is_accepted():
    """PEFT bounds no DeLoRA rank: r = 48 on k_proj (64 -> 32) is a valid config, accepted and exact."""
    model, args, compiled = compile_kind("delora", ["*.k_proj"], rank=48)
    assert_identity_insert(compiled, model, args)
