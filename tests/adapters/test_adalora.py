"""AdaLoRA: y + alpha / (ranknum + 1e-5) · B (A ⊙ E) x; exact merge and unmerge, PEFT import (including
checkpoints whose rank_pattern pruned ranks, by PEFT's own masking path) and export, with PEFT's outputs
before and after merge."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_edited_checkpoint_refused,
                                    assert_close, assert_dropout_in_training_only, assert_identity_insert,
                                    assert_merge, assert_param_count, assert_round_trip, assert_trains, compile_kind,
                                    peft_export, peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2
from tests.passes.helpers import logits

# hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64; a site trains r (in + out + 1)
LLAMA_FANS = 2 * ((64 + 32 + 1) + (128 + 64 + 1))


def test_adalora_lifecycle(tmp_path):
    model, args, compiled = compile_kind("adalora", ["*.k_proj", "*.down_proj"], rank=4, alpha=16)
    assert_identity_insert(compiled, model, args)      # E = 0: A ⊙ E is exact zeros
    assert_param_count(compiled, 4 * LLAMA_FANS)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    # hf_gpt2: c_attn 32 -> 96, mlp.c_proj 128 -> 32 (stored in x out)
    model, args, compiled = compile_kind("adalora", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=3)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 3 * 2 * ((32 + 96 + 1) + (128 + 32 + 1)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def _peft_layer(in_features=24, out_features=20, rank=5, alpha=16, fan_in_fan_out=False):
    """A PEFT SVDLinear with random A, E and B (E nonzero, as after training)."""
    import peft
    from peft.tuners.adalora.layer import SVDLinear

    base = torch.nn.Linear(in_features, out_features)
    config = peft.AdaLoraConfig(init_r=rank, lora_alpha=alpha, total_step=10, init_lora_weights=False)
    layer = SVDLinear(base, "default", config, r=rank, lora_alpha=alpha)
    params = {f"adalora_{n}": getattr(layer, f"lora_{n}")["default"].detach() for n in "AEB"}
    return base, layer, params


def test_delta_and_forward_match_peft():
    """The delta is PEFT's get_delta_weight and the branch PEFT's forward (ranknum + 1e-5 included)."""
    pytest.importorskip("peft")
    adalora = kinds()["adalora"]
    base, layer, params = _peft_layer()
    opts = {"rank": 5, "alpha": 16, "ranknum": None, "dropout": 0.0}
    delta = adalora.delta_weight(params, opts, base.weight.detach())
    assert delta.dtype == torch.float32 and delta.abs().max() > 1e-2
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-6, atol=1e-7)
    exact = adalora.delta_weight(params, opts, base.weight.detach().double())
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, delta.double(), rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(base(x) + x @ delta.T, layer(x), rtol=1e-5, atol=1e-6)


def test_init_is_peft_init():
    """E = 0 and A, B ~ N(0, 0.02), as PEFT's init_lora_weights=True."""
    adalora = kinds()["adalora"]
    fresh = adalora.init({"rank": 64, "alpha": 8.0, "ranknum": None}, 256, 128, torch.float32,
                         torch.Generator().manual_seed(0), torch.zeros(128, 256))
    assert not fresh["adalora_E"].any() and fresh["adalora_E"].shape == (64, 1)
    for name, shape in (("adalora_A", (64, 256)), ("adalora_B", (128, 64))):
        assert fresh[name].shape == shape and abs(fresh[name].std().item() - 0.02) < 1e-3


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("adalora", ["*.q_proj", "*.up_proj"], rank=4, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


def test_peft_parity_and_export(tmp_path):
    """A randomized PEFT AdaLoRA checkpoint (init_r, lora_alpha, lora_dropout) imports with PEFT's outputs
    before and after merge, and exports back."""
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(target_modules=["q_proj", "k_proj", "down_proj"], init_r=6, lora_alpha=16,
                                lora_dropout=0.1, total_step=10)
    compiled = peft_parity(config, tmp_path / "in")
    state = compiled.adapters[NAME]
    assert state.spec.options == {"rank": 6, "alpha": 16.0, "ranknum": 6, "dropout": 0.1}
    assert sorted(s.options["rank"] for s in state.sites) == [6] * 6
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "again")
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    peft_export(again, model, args, tmp_path / "out")


def test_gpt2_conv1d_peft_parity(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(target_modules=["c_attn", "c_proj"], init_r=3, lora_alpha=6, total_step=10,
                                fan_in_fan_out=True)
    peft_parity(config, tmp_path, factory=hf_gpt2)


def _masked_checkpoint(tmp_path, masks: list[list[bool]]):
    """(model, args, PEFT model reloaded from disk): a randomized AdaLoRA on q_proj and down_proj of both layers
    (init_r 4), its ranks masked by PEFT's own RankAllocator.mask_using_rank_pattern with `masks` (one per
    module, in PEFT's parameter order), the pattern recorded in the config as training does, saved."""
    import peft

    config = peft.AdaLoraConfig(target_modules=["q_proj", "down_proj"], init_r=4, target_r=2, lora_alpha=12,
                                total_step=10)
    model, args, wrapped = randomized_peft_checkpoint(config, tmp_path / "unmasked")
    names = [n for n, _ in wrapped.base_model.model.named_parameters() if ".lora_E." in n]
    pattern = dict(zip(names, masks, strict=True))
    wrapped.base_model.rankallocator.mask_using_rank_pattern(wrapped.base_model.model, pattern)
    wrapped.peft_config["default"].rank_pattern = pattern
    expected = logits(wrapped, args)
    wrapped.save_pretrained(tmp_path / "masked")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "masked").eval()
    assert_close(logits(reloaded, args), expected)   # PEFT's own round trip: the pruned ranks are gone
    return model, args, reloaded


def test_pruned_rank_pattern_imports_with_peft_outputs(tmp_path):
    """A checkpoint whose rank_pattern pruned ranks (one module entirely) holds only the kept ranks; each
    site gets its kept rank and keeps init_r as its divisor, and the outputs are PEFT's before and after
    merge. The export writes the pattern back and PEFT loads it with the same outputs."""
    pytest.importorskip("peft")
    masks = [[True, False, True, False], [False] * 4, [True] * 4, [False, False, False, True]]
    model, args, reloaded = _masked_checkpoint(tmp_path, masks)
    saved = json.loads((tmp_path / "masked" / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted(map(sum, saved.values())) == [0, 1, 2, 4]
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "masked")}]}, KW)
    state = compiled.adapters[NAME]
    ranks = {s.path: s.options["rank"] for s in state.sites}
    assert ranks == {key.removesuffix(".lora_E"): sum(mask) for key, mask in saved.items() if any(mask)}
    assert len(ranks) == 3 and all(s.options["ranknum"] == 4 for s in state.sites)
    assert_close(logits(compiled.module, args), logits(reloaded, args))
    peft_export(compiled, model, args, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted(map(sum, exported.values())) == [1, 2]   # the full-rank module needs no mask
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "masked")}]}, KW)
    again.apply(["merge"])
    assert_close(logits(again.module, args), logits(reloaded.merge_and_unload(), args))


def test_merge_checkpoint_of_a_pruned_adapter_equals_the_in_memory_merge(tmp_path):
    """merge-checkpoint reads the rank_pattern masks (kept ranks, init_r divisor) and writes, tensor by tensor,
    what the merge pass writes in memory."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from surgeon.merge_checkpoint import merge_checkpoint

    model, args, _ = _masked_checkpoint(tmp_path, [[True, False, True, True], [False] * 4, [True] * 4, [True] * 4])
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "masked")}]}, KW)
    compiled.apply(["merge"])
    model.save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "masked", tmp_path / "merged")
    on_disk, ours = load_file(tmp_path / "merged" / "model.safetensors"), dict(compiled.module.named_parameters())
    base = model.state_dict()
    changed = [name for name, tensor in on_disk.items() if name in ours and not torch.equal(tensor, base[name])]
    assert len(changed) == 3   # the module with no rank left is unchanged
    for name in changed:
        assert torch.equal(on_disk[name], ours[name]), name


def test_zero_alpha_scales_by_each_modules_rank(tmp_path):
    """lora_alpha <= 0: PEFT's scaling is the module's own rank (the kept one for a pruned module)."""
    peft = pytest.importorskip("peft")
    model, args, _ = _masked_checkpoint(tmp_path, [[True, False, True, False], [True] * 4, [True] * 4, [True] * 4])
    config_path = tmp_path / "masked" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "lora_alpha": 0}))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "masked").eval()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "masked")}]}, KW)
    assert sorted(s.options["alpha"] for s in compiled.adapters[NAME].sites) == [2.0, 4.0, 4.0, 4.0]
    assert_close(logits(compiled.module, args), logits(reloaded, args))


def test_rank_allocator_budget_imports_with_peft_outputs(tmp_path):
    """PEFT's RankAllocator itself prunes to the target budget (importance scores from a real backward,
    then the final forced mask); the saved checkpoint imports with PEFT's outputs."""
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(target_modules=["q_proj", "down_proj"], init_r=4, target_r=2, lora_alpha=12,
                                total_step=10, tinit=0, tfinal=2)
    model, args, wrapped = randomized_peft_checkpoint(config, tmp_path / "unmasked")
    wrapped.train()
    wrapped(*args, labels=args[0]).loss.backward()
    wrapped.base_model.update_and_allocate(4)   # importance scores, a budget step
    wrapped.base_model.update_and_allocate(8)   # total_step - tfinal: the final mask at target_r per module
    wrapped.eval()
    wrapped.save_pretrained(tmp_path / "allocated")
    kept = [sum(m) for m in json.loads((tmp_path / "allocated" / "adapter_config.json").read_text())
            ["rank_pattern"].values()]
    assert sum(kept) == 2 * 4 and min(kept) < 4
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "allocated")}]},
                               KW)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "allocated").eval()
    assert_close(logits(compiled.module, args), logits(wrapped, args))
    assert_close(logits(compiled.module, args), logits(reloaded, args))
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), logits(reloaded.merge_and_unload(), args))


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("adalora", ["*.q_proj", "*.k_proj", "*.up_proj"], rank=5, alpha=10.0)
    peft_export(compiled, model, args, tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: c.update(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False]}),
     r"rank_pattern\['model.layers.0.self_attn.q_proj.lora_E'\] must be a list of init_r=4 booleans"),
    (lambda c, t: c.update(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True]}),
     r"module 'model.layers.0.self_attn.q_proj' needs lora_A \(3 x in\), lora_B \(out x 3\) and lora_E \(3 x 1\)"),
    (lambda c, t: c.update(rank_pattern={"model.layers.0.mlp.up_proj.lora_E": [True] * 4}),
     "rank_pattern names module 'model.layers.0.mlp.up_proj', which the checkpoint holds no tensors for"),
    (lambda c, t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_E"),
     r"module 'model.layers.1.self_attn.q_proj' needs lora_A \(4 x in\)"),
])
def test_a_malformed_checkpoint_is_refused(tmp_path, edit, message):
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(target_modules=["q_proj"], init_r=4, total_step=10)
    assert_edited_checkpoint_refused(config, tmp_path, edit, message)


def test_rank_above_min_in_out_is_accepted():
    """PEFT bounds no AdaLoRA init_r: r = 48 on k_proj (64 -> 32) is accepted and exact."""
    model, args, compiled = compile_kind("adalora", ["*.k_proj"], rank=48)
    assert_identity_insert(compiled, model, args)
