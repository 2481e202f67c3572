"""GraLoRA: k x k low-rank blocks from per-chunk projections A_n and per-chunk outputs B_j (plus an optional
hybrid LoRA), scale alpha / (r + h); exact merge, PEFT import and export on LLaMA and GPT-2 (Conv1D)."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.adapter_io import save_peft_dir
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, spec)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits

# hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64
LLAMA_FANS = 2 * ((64 + 32) + (128 + 64))
# hf_gpt2: 2 layers, c_attn 32 -> 96, mlp.c_proj 128 -> 32
GPT2_FANS = 2 * ((32 + 96) + (128 + 32))


@pytest.mark.parametrize("hybrid", [0, 2])
def test_gralora_lifecycle(hybrid, tmp_path):
    model, args, compiled = compile_kind("gralora", ["*.k_proj", "*.down_proj"], rank=4, blocks=2,
                                         hybrid_rank=hybrid)
    assert_identity_insert(compiled, model, args)      # every B = 0
    assert_param_count(compiled, (4 + hybrid) * LLAMA_FANS)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    model, args, compiled = compile_kind("gralora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=4, blocks=4)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 4 * GPT2_FANS)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def _reference_delta(A, B, k):
    """ΔW block by block, from the definition: block (j, n) = B_j[n-th r/k rows]^T A_n[:, j-th r/k columns]^T."""
    _, chunk_in, rank = A.shape
    chunk_out, sub = B.shape[2], rank // k
    delta = torch.zeros(k * chunk_out, k * chunk_in, dtype=torch.float64)
    for j in range(k):
        for n in range(k):
            delta[j * chunk_out:(j + 1) * chunk_out, n * chunk_in:(n + 1) * chunk_in] = \
                B[j, n * sub:(n + 1) * sub].double().T @ A[n, :, j * sub:(j + 1) * sub].double().T
    return delta


@pytest.mark.parametrize("k,hybrid", [(2, 0), (4, 3)])
def test_delta_is_peft_s_and_the_block_definition(k, hybrid):
    peft = pytest.importorskip("peft")
    from peft.tuners.gralora.layer import Linear

    gralora = kinds()["gralora"]
    base = torch.nn.Linear(24, 16)
    config = peft.GraloraConfig(r=8, gralora_k=k, hybrid_r=hybrid, alpha=12, init_weights=False)
    layer = Linear(base, "default", "m", config, r=8)
    params = {"gralora_A": layer.gralora_A["default"].detach(), "gralora_B": layer.gralora_B["default"].detach()}
    if hybrid:
        params.update(gralora_A_general=layer.gralora_A_general["default"].weight.detach(),
                      gralora_B_general=layer.gralora_B_general["default"].weight.detach())
    opts = {"rank": 8, "alpha": 12.0, "blocks": k, "hybrid_rank": hybrid, "init": "default", "dropout": 0.0}
    delta = gralora.delta_weight(params, opts, base.weight.detach())
    assert delta.dtype == torch.float32 and delta.abs().max() > 1e-2    # merge_dtype of a float32 weight
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-6, atol=1e-7)
    exact = gralora.delta_weight(params, opts, base.weight.detach().double())   # float64 for a float64 weight
    expected = _reference_delta(params["gralora_A"], params["gralora_B"], k)
    if hybrid:
        expected += params["gralora_B_general"].double() @ params["gralora_A_general"].double()
    torch.testing.assert_close(exact, expected * 12 / (8 + hybrid), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options,message", [
    ({"rank": 6, "blocks": 4}, "blocks 4 must divide the rank 6"),
    ({"rank": 6, "blocks": 3}, "blocks 3 must divide the rank 6 and the site's 64 input and 32 output"),
    ({"rank": 4, "hybrid_rank": -1}, "must be in"),
])
def test_refusals(options, message):
    model, args = hf_llama()
    with pytest.raises(Exception, match=message):
        surgeon.compile(model, args, spec("gralora", ["*.k_proj"], **options), KW)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("gralora", ["*.q_proj"], rank=2, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("gralora", ["*.q_proj", "*.up_proj"], rank=4, hybrid_rank=2, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


@pytest.mark.parametrize("k,hybrid", [(2, 0), (4, 4)])
def test_peft_parity(k, hybrid, tmp_path):
    """A randomized PEFT GraLoRA checkpoint imports with PEFT's outputs, before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.GraloraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=8, gralora_k=k, hybrid_r=hybrid,
                                alpha=16, gralora_dropout=0.1)
    compiled = peft_parity(config, tmp_path)
    options = compiled.adapters[NAME].spec.options
    assert (options["rank"], options["blocks"], options["hybrid_rank"], options["alpha"], options["dropout"]) == \
        (8, k, hybrid, 16.0, 0.1)


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.GraloraConfig(target_modules=["c_attn", "c_fc"], r=4, gralora_k=2, hybrid_r=2,
                                   fan_in_fan_out=True), tmp_path, factory=hf_gpt2)


@pytest.mark.parametrize("hybrid", [0, 3])
def test_peft_export(hybrid, tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("gralora", ["*.q_proj", "*.k_proj", "*.up_proj"], rank=4, blocks=2,
                                         hybrid_rank=hybrid, alpha=6.0)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_of_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    model, args, compiled = compile_kind("gralora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=4)
    peft_export(compiled, model, args, tmp_path)
    assert peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).peft_config["default"].fan_in_fan_out


def test_export_refuses_per_module_options(tmp_path):
    opts = {"rank": 2, "alpha": 4.0, "blocks": 2, "hybrid_rank": 0, "init": "default", "dropout": 0.0}
    params = kinds()["gralora"].init(opts, 8, 8, torch.float32, torch.Generator().manual_seed(0), torch.zeros(8, 8))
    with pytest.raises(surgeon.SpecError, match="holds one r, alpha, gralora_k and hybrid_r"):
        save_peft_dir(tmp_path, opts, {"a.q": params, "a.v": params}, set(), kind="gralora",
                      site_options={"a.v": {"alpha": 8.0}})
