"""RandLoRA: y + (alpha / r) B_flat (Λ ⊙ A ⊙ Γ)_flat x over n = ceil(min(in, out) / r) frozen random bases
shared per shape; exact merge, PEFT's bases drawn from the seed, PEFT import and export on LLaMA (GQA) and
GPT-2 (Conv1D)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import surgeon
from surgeon.adapter_io import save_peft_dir
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits


def _count(rank: int, fans: list[tuple[int, int]]) -> int:
    """n (r + m) per site, m = min(in, out), n = ceil(m / r)."""
    return sum(math.ceil(min(i, o) / rank) * (rank + min(i, o)) for i, o in fans)


def _bases(module) -> list[str]:
    return sorted(n for n, _ in module.named_parameters() if n.startswith(f"adapter_{NAME}."))


@pytest.mark.parametrize("basis", ["dense", "sparse", "very_sparse"])
def test_randlora_lifecycle(basis, tmp_path):
    # k_proj 64 -> 32 (in > out: B first), up_proj 64 -> 128 (in < out: the scaled A first); rank 6 does not
    # divide m = 32 or 64, so the last basis overhangs (n = 6 and 11)
    model, args, compiled = compile_kind("randlora", ["*.k_proj", "*.up_proj"], rank=6, alpha=12.0, basis=basis)
    assert_identity_insert(compiled, model, args)     # Λ = 0
    assert _bases(compiled.module) == [f"adapter_{NAME}.randlora_A_6x1x32", f"adapter_{NAME}.randlora_A_6x1x64",
                                       f"adapter_{NAME}.randlora_B_128x11x6", f"adapter_{NAME}.randlora_B_64x6x6"]
    assert_param_count(compiled, 2 * _count(6, [(64, 32), (64, 128)]))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)
    assert len(_bases(compiled.module)) == 4           # unmerge brought the shared bases back


def test_conv1d_sites(tmp_path):
    model, args, compiled = compile_kind("randlora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=4,
                                         alpha=8.0)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * _count(4, [(32, 96), (128, 32)]))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("randlora", ["*.q_proj"], rank=8, alpha=16.0, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("randlora", ["*.q_proj", "*.down_proj"], rank=8, alpha=16.0, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


@pytest.mark.parametrize("basis", ["dense", "sparse", "very_sparse"])
def test_bases_are_peft_s(basis):
    """For targets of one shape, surgeon draws PEFT's bases from the seed, bit for bit."""
    peft = pytest.importorskip("peft")
    model, args = hf_llama()
    config = peft.RandLoraConfig(target_modules=["q_proj", "o_proj"], r=6, projection_prng_key=3,
                                 sparse=basis == "sparse", very_sparse=basis == "very_sparse")
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    opts = {"rank": 6, "projection_seed": 3, "basis": basis, "init": "identity", "alpha": 640.0, "dropout": 0.0}
    params = kinds()["randlora"].init(opts, 64, 64, torch.float32, torch.Generator().manual_seed(0), None)
    assert torch.equal(params["randlora_A"], wrapped.base_model.randlora_A["default"])
    assert torch.equal(params["randlora_B"], wrapped.base_model.randlora_B["default"])
    layer = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(params["randlora_lambda"], layer.randlora_lambda["default"])
    assert torch.equal(params["randlora_gamma"], layer.randlora_gamma["default"])


def test_delta_is_peft_s(tmp_path):
    """Surgeon's delta (in the merge dtype: float32 here) is PEFT's get_delta_weight on every module, both orientations."""
    pytest.importorskip("peft")
    import peft

    config = peft.RandLoraConfig(target_modules=["k_proj", "up_proj", "down_proj"], r=6, randlora_alpha=12)
    _, _, wrapped = randomized_peft_checkpoint(config, tmp_path)
    randlora = kinds()["randlora"]
    opts = {"rank": 6, "alpha": 12.0}
    for name, module in wrapped.named_modules():
        if not hasattr(module, "randlora_lambda") or "default" not in module.randlora_lambda:
            continue
        params = {"randlora_A": module.randlora_A["default"], "randlora_B": module.randlora_B["default"],
                  "randlora_lambda": module.randlora_lambda["default"].detach(),
                  "randlora_gamma": module.randlora_gamma["default"].detach()}
        weight = module.get_base_layer().weight.detach()
        want = module.get_delta_weight("default").detach().double()
        torch.testing.assert_close(randlora.delta_weight(params, opts, weight).double(), want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sparse", [False, True])
def test_peft_parity(sparse, tmp_path):
    """A randomized PEFT RandLoRA checkpoint (three shapes, one shared pair of bases) imports with PEFT's
    outputs, before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.RandLoraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=8, randlora_alpha=16,
                                 randlora_dropout=0.1, projection_prng_key=5, sparse=sparse)
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert state.spec.options == {"rank": 8, "alpha": 16.0, "projection_seed": 5,
                                  "basis": "sparse" if sparse else "dense", "init": "identity", "dropout": 0.1}
    assert len(state.sites) == 6
    # one A and B for all, sized for the largest target (64 x 128: m = 64, M = 128, n = 8), read as leading parts
    assert {s.merged["randlora_A"].shape for s in state.sites} == {(8, 1, 64)}
    assert {s.merged["randlora_B"].shape for s in state.sites} == {(128, 8, 8)}


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.RandLoraConfig(target_modules=["c_attn", "c_fc"], r=4, randlora_alpha=8, fan_in_fan_out=True)
    peft_parity(config, tmp_path, factory=hf_gpt2)


def test_peft_export(tmp_path):
    """Sites of one shape (q_proj, o_proj: 64 -> 64) go out with their bases; PEFT loads surgeon's outputs."""
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("randlora", ["*.q_proj", "*.o_proj"], rank=6, alpha=12.0)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_of_an_import_with_several_shapes(tmp_path):
    """An imported adapter holds PEFT's one pair of bases for every site: it goes back out as that pair."""
    peft = pytest.importorskip("peft")
    config = peft.RandLoraConfig(target_modules=["k_proj", "up_proj", "down_proj"], r=8, randlora_alpha=16)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "in")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, KW)
    peft_export(compiled, model, args, tmp_path / "out")


def test_peft_export_of_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": NAME, "type": "randlora", "targets": ["*.c_attn"], "rank": 4, "alpha": 8.0}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    peft_export(compiled, model, args, tmp_path)
    assert peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).peft_config["default"].fan_in_fan_out


def test_export_of_independent_bases_is_refused(tmp_path):
    """Surgeon draws each shape's bases on its own; PEFT needs them to be slices of one pair."""
    _, _, compiled = compile_kind("randlora", ["*.k_proj", "*.up_proj"], rank=6, alpha=12.0)
    state = compiled.adapters[NAME]
    with pytest.raises(surgeon.SpecError, match="not slices of the largest"):
        save_peft_dir(tmp_path, state.spec.options, compiled.adapter_weights(NAME), set(), kind="randlora")


def test_import_without_bases_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.RandLoraConfig(target_modules=["q_proj"], r=8, save_projection=False)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    with pytest.raises(surgeon.SpecError, match="save_projection=False"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
