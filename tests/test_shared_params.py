"""Trained tensors shared by every site of an adapter (AdapterKind.shared_trained): VB-LoRA's vector bank,
TinyLoRA's per-group vector, Uni-LoRA's one vector. One nn.Parameter read by every site, so one storage and
one gradient summing every site's; counted once, saved once and loaded once; each site's merge reads it.
Also the surgeon file layout of shared tensors, frozen ones (VeRA's projections) included."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgeon
from tests.adapters.helpers import KW, NAME, assert_close, compile_kind
from tests.conftest import randomize_adapters
from tests.passes.helpers import logits

BANK = f"adapter_{NAME}.vblora_vector_bank_32x16"
VBLORA = {"rank": 4, "num_vectors": 32, "vector_length": 16}
TARGETS = ["*.q_proj", "*.down_proj"]   # hf_llama: 2 layers, 4 sites


def _shared(module) -> list[str]:
    return sorted(n for n, _ in module.named_parameters() if n.startswith(f"adapter_{NAME}."))


def _loss(module, args) -> torch.Tensor:
    return module(*args).logits.square().mean()


def test_one_parameter_read_by_every_site():
    _, _, compiled = compile_kind("vblora", TARGETS, **VBLORA)
    module, state = compiled.module, compiled.adapters[NAME]
    assert _shared(module) == [BANK]
    assert {site.params["vblora_vector_bank"] for site in state.sites} == {BANK}
    assert len(module.graph.find_nodes(op="get_attr", target=BANK)) == len(state.sites) == 4
    assert module.get_parameter(BANK).requires_grad


def test_the_gradient_sums_every_site_s():
    """Each site's read of the bank, made a parameter of its own in a copy of the graph, gets its own gradient;
    the shared bank's gradient is their sum, and every site contributes."""
    _, args, compiled = compile_kind("vblora", TARGETS, **VBLORA)
    module = compiled.module
    randomize_adapters(module)
    _loss(module, args).backward()
    shared = module.get_parameter(BANK).grad
    split = copy.deepcopy(module)
    split.zero_grad(set_to_none=True)
    reads = split.graph.find_nodes(op="get_attr", target=BANK)
    for i, node in enumerate(reads):
        split.register_parameter(f"bank_read_{i}", torch.nn.Parameter(module.get_parameter(BANK).detach().clone()))
        node.target = f"bank_read_{i}"
    split.recompile()
    _loss(split, args).backward()
    grads = [split.get_parameter(f"bank_read_{i}").grad for i in range(len(reads))]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(shared, torch.stack(grads).sum(0), rtol=1e-5, atol=1e-8)


def test_counted_saved_and_loaded_once(tmp_path):
    model, args, compiled = compile_kind("vblora", TARGETS, **VBLORA)
    state = compiled.adapters[NAME]
    logits_per_site = sum(32 * 4 * (i + o) // 16 for i, o in [(64, 64), (128, 64)] * 2)
    assert state.param_count == logits_per_site + 32 * 16
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == state.param_count
    assert compiled.adapter_bytes()[NAME] == state.param_count * 4
    randomize_adapters(compiled.module, seed=3)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path)
    held = load_file(str(tmp_path / "adapter.safetensors"))
    assert [k for k in held if "vector_bank" in k] == ["@shared.vblora_vector_bank.0"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["shared"] == [
        {"tensor": "@shared.vblora_vector_bank.0", "param": "vblora_vector_bank",
         "modules": [s.path for s in state.sites]}]
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_dir": str(tmp_path)}]}, KW)
    assert _shared(again.module) == [BANK] and torch.equal(logits(again.module, args), expected)


def test_merge_reads_the_bank_at_every_site_and_unmerge_restores_one_parameter():
    _, args, compiled = compile_kind("vblora", TARGETS, **VBLORA)
    randomize_adapters(compiled.module)
    bank = compiled.module.get_parameter(BANK).detach().clone()
    before = logits(compiled.module, args)
    compiled.apply(["merge"])
    assert _shared(compiled.module) == []
    assert_close(logits(compiled.module, args), before)
    compiled.apply(["unmerge"])
    assert _shared(compiled.module) == [BANK] and torch.equal(compiled.module.get_parameter(BANK), bank)
    _loss(compiled.module, args).backward()
    assert compiled.module.get_parameter(BANK).grad is not None


def test_parked_and_activated_again():
    _, args, compiled = compile_kind("vblora", TARGETS, **VBLORA)
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply([{"activate": {"adapters": []}}], verify=False)
    assert _shared(compiled.module) == []
    compiled.set_active(NAME)
    assert _shared(compiled.module) == [BANK] and torch.equal(logits(compiled.module, args), before)


def test_tinylora_shares_one_vector_per_weight_tying_group(tmp_path):
    model, args, compiled = compile_kind("tinylora", TARGETS, rank=2, u=8, weight_tying=0.5)
    state = compiled.adapters[NAME]
    assert _shared(compiled.module) == [f"adapter_{NAME}.tinylora_v_8_g0", f"adapter_{NAME}.tinylora_v_8_g1"]
    assert [s.params["tinylora_v"][-2:] for s in state.sites] == ["g0", "g0", "g1", "g1"]
    assert state.param_count == 16
    randomize_adapters(compiled.module, seed=2)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path)
    assert sorted(k for k in load_file(str(tmp_path / "adapter.safetensors")) if "tinylora_v" in k) == \
        ["@shared.tinylora_v.0", "@shared.tinylora_v.1"]
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_dir": str(tmp_path)}]}, KW)
    assert torch.equal(logits(again.module, args), expected)


def test_a_loaded_adapter_whose_sites_hold_different_banks_is_refused(tmp_path):
    model, args, compiled = compile_kind("vblora", TARGETS, **VBLORA)
    compiled.save_adapter(NAME, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    held = load_file(str(tmp_path / "adapter.safetensors"))
    held["@shared.vblora_vector_bank.1"] = held["@shared.vblora_vector_bank.0"] + 1
    modules = config["shared"][0]["modules"]
    second = {"tensor": "@shared.vblora_vector_bank.1", "param": "vblora_vector_bank", "modules": modules[2:]}
    config["shared"] = [{**config["shared"][0], "modules": modules[:2]}, second]
    save_file(held, str(tmp_path / "adapter.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="shared parameter 'vblora_vector_bank' .* differs"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_dir": str(tmp_path)}]}, KW)


def test_frozen_shared_projections_are_saved_once_and_the_per_site_layout_still_loads(tmp_path):
    """VeRA's projections of one shape go to the file once; a folder written before (one copy per site) loads."""
    model, args, compiled = compile_kind("vera", ["*.q_proj", "*.o_proj"], rank=4)
    randomize_adapters(compiled.module)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "new")
    held = load_file(str(tmp_path / "new" / "adapter.safetensors"))
    assert sorted(k for k in held if k.startswith("@shared")) == ["@shared.vera_A.0", "@shared.vera_B.0"]
    assert len(held) == 2 + 2 * 4   # A, B once; d and b per site
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    per_site = {f"{path}.{p}": t.contiguous().clone() for path, params in compiled.adapter_weights(NAME).items()
                for p, t in params.items()}
    save_file(per_site, str(old / "adapter.safetensors"))
    (old / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "shared"}))
    for folder in (tmp_path / "new", old):
        again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_dir": str(folder)}]}, KW)
        assert torch.equal(logits(again.module, args), expected)


@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
@pytest.mark.parametrize("kind,options", [("vblora", VBLORA), ("tinylora", {"rank": 2, "u": 8, "weight_tying": 0.5}),
                                          ("unilora", {"rank": 4, "theta_length": 64})])
def test_merge_checkpoint_hands_the_shared_tensor_to_every_site(kind, options, fmt, tmp_path):
    """merge-checkpoint on a saved adapter (the shared tensor stored once) writes the merge pass's weights."""
    import surgeon.merge_checkpoint as mc
    from tests.conftest import hf_llama
    from tests.test_merge_checkpoint import merged_in_memory, read_all, write_checkpoint

    model, args = hf_llama()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_checkpoint(state, tmp_path / "base", shards=1)
    spec = {"adapters": [{"name": "a", "type": kind, "targets": TARGETS, **options}]}
    merged, _ = merged_in_memory(model, args, spec, KW, tmp_path / "adapter", fmt)
    mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    out = read_all(tmp_path / "out")
    assert len(merged) == 4
    for name, tensor in merged.items():
        assert torch.equal(out[name], tensor), name


def test_a_quantized_adapter_keeps_the_bank_in_float_and_saves(tmp_path):
    """quantize-adapters leaves a shared tensor in float; its folder (one copy per site there) loads back."""
    model, args, compiled = compile_kind("vblora", TARGETS, **VBLORA)
    randomize_adapters(compiled.module)
    compiled.apply([{"quantize-adapters": {"bits": 4}}])
    assert _shared(compiled.module) == [BANK]
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path)
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_dir": str(tmp_path)}]}, KW)
    assert _shared(again.module) == [BANK]
    assert_close(logits(again.module, args), expected)
