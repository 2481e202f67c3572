"""MoSA (mosa_modules / mosa_seed on lora and bottleneck): a fixed partition of each trained parameter into
N sparse modules, one sampled module per training forward, the dense adapter in eval."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters.mosa import mask_name, partition
from surgeon.errors import SpecError
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_trains, compile_kind, spec)
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import logits

PARAMS = {"lora": ("lora_A", "lora_B"), "bottleneck": ("adapter_down", "adapter_up")}


def llama():
    return hf_llama(layers=1)


def site_tensors(compiled, site):
    return {p: compiled.module.get_parameter(t) for p, t in site.params.items()}


def test_partition_is_disjoint_covering_and_balanced():
    for shape, modules in (((4, 64), 3), ((32, 4), 7), ((5,), 5), ((2, 3, 4), 24)):
        ids = partition(shape, modules, seed=1)
        assert tuple(ids.shape) == shape and not ids.is_floating_point()
        masks = torch.stack([ids == k for k in range(modules)])
        assert torch.equal(masks.sum(0), torch.ones(shape, dtype=torch.long))   # each entry in exactly one module
        sizes = masks.flatten(1).sum(1)
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1              # none empty, balanced
    assert torch.equal(partition((8, 8), 4, seed=3), partition((8, 8), 4, seed=3))
    assert not torch.equal(partition((8, 8), 4, seed=3), partition((8, 8), 4, seed=4))
    assert partition((2, 200), 300, 0).dtype == torch.int16 and partition((4, 4), 3, 0).dtype == torch.uint8


@pytest.mark.parametrize("kind,targets,count", [
    ("lora", ["*.q_proj", "*.k_proj"], 4 * (64 + 64) + 4 * (64 + 32)),   # the plain kinds' formulas: r (in + out)
    ("bottleneck", ["*.down_proj"], 2 * 4 * 64),                         # and 2 r out
])
def test_inserted_masks_are_frozen_partitions_and_the_count_is_the_plain_kinds(kind, targets, count):
    model, args, compiled = compile_kind(kind, targets, factory=llama, rank=4, mosa_modules=3, mosa_seed=2)
    assert_identity_insert(compiled, model, args)         # B = 0 / U = 0: the masks change nothing at insert
    assert_param_count(compiled, count)                   # the assignments are frozen, not counted
    for site in compiled.adapters[NAME].sites:
        tensors = site_tensors(compiled, site)
        assert set(tensors) == {*PARAMS[kind], *(mask_name(p) for p in PARAMS[kind])}
        for p in PARAMS[kind]:
            ids = tensors[mask_name(p)]
            assert not ids.requires_grad and ids.shape == tensors[p].shape
            assert torch.equal(ids, partition(tuple(ids.shape), 3, 2))
            pieces = sum(tensors[p] * (ids == k) for k in range(3))   # the modules' sum is the dense parameter
            assert torch.equal(pieces, tensors[p])


def test_eval_is_the_plain_adapter_bit_for_bit_and_merge_is_exact():
    model, args, compiled = compile_kind("lora", ["*.q_proj", "*.v_proj"], factory=llama, rank=4, mosa_modules=4,
                                         dropout=0.1)
    plain = surgeon.compile(model, args, spec("lora", ["*.q_proj", "*.v_proj"], rank=4, dropout=0.1), KW)
    randomize_adapters(compiled.module)
    for path, params in compiled.adapter_weights(NAME).items():
        for p, t in params.items():
            if p in PARAMS["lora"]:
                plain.module.get_parameter(f"{path}.adapter_{NAME}.{p}").data.copy_(t)
    want = logits(plain.module, args)
    assert not torch.equal(want, logits(model, args))
    assert torch.equal(logits(compiled.module, args), want)
    compiled.module.train()
    with torch.no_grad():
        compiled.module(*args)                              # a sampled, dropped forward changes nothing stored
    compiled.module.eval()
    assert torch.equal(logits(compiled.module, args), want)
    for site, plain_site in zip(compiled.adapters[NAME].sites, plain.adapters[NAME].sites):
        kind = compiled.adapters[NAME].spec.kind
        params = {p: t.detach() for p, t in site_tensors(compiled, site).items()}
        plain_params = {p: t.detach() for p, t in site_tensors(plain, plain_site).items()}
        assert torch.equal(kind.delta_weight(params, site.options, None),
                           plain.adapters[NAME].spec.kind.delta_weight(plain_params, plain_site.options, None))
    assert_merge(compiled, args)


def sampled_modules(compiled, args, steps: int) -> list[list[int]]:
    """Per training forward, the module each site used, read from where the gradients are non-zero (every
    trained parameter's gradient must lie inside that one module); one SGD step each, which must leave every
    entry outside the module as it was."""
    module, state = compiled.module, compiled.adapters[NAME]
    names = PARAMS[state.spec.type]
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    module.train()
    used = []
    for _ in range(steps):
        before = {(s.path, p): t.detach().clone() for s in state.sites for p, t in site_tensors(compiled, s).items()}
        optimizer.zero_grad()
        module(*args).logits.square().mean().backward()
        optimizer.step()
        step = []
        for site in state.sites:
            tensors = site_tensors(compiled, site)
            touched = {int(k) for p in names for k in tensors[mask_name(p)][tensors[p].grad != 0].unique()}
            assert len(touched) == 1, f"{site.path}: gradient on modules {sorted(touched)}"
            k = touched.pop()
            for p in names:
                outside = tensors[mask_name(p)] != k
                assert torch.equal(tensors[p].grad[outside], torch.zeros_like(tensors[p].grad[outside]))
                assert torch.equal(tensors[p].detach()[outside], before[(site.path, p)][outside])
                assert not torch.equal(tensors[p].detach(), before[(site.path, p)])   # ... and the module moved
            step.append(k)
        used.append(step)
    module.eval()
    return used


@pytest.mark.parametrize("kind,factory,targets", [("lora", llama, ["*.q_proj", "*.k_proj"]),
                                                  ("bottleneck", hf_gpt2, ["*.mlp.c_proj"])])
def test_a_training_step_moves_only_the_sampled_module_and_the_seed_reproduces_the_draws(kind, factory, targets):
    model, args, compiled = compile_kind(kind, targets, factory=factory, rank=2, mosa_modules=4)
    randomize_adapters(compiled.module)                   # non-zero B / U: every factor has a gradient
    start = {n: p.detach().clone() for n, p in compiled.module.named_parameters() if p.requires_grad}
    runs = []
    for seed in (0, 0, 1):
        with torch.no_grad():
            for n, p in compiled.module.named_parameters():
                if n in start:
                    p.copy_(start[n])
        torch.manual_seed(seed)
        runs.append(sampled_modules(compiled, args, steps=6))
    assert runs[0] == runs[1]                             # torch.manual_seed fixes the sequence
    assert runs[0] != runs[2]
    assert len({k for step in runs[0] for k in step}) > 1


def test_training_with_adam_and_a_save_load_round_trip(tmp_path):
    model, args, compiled = compile_kind("lora", ["*.q_proj", "*.v_proj"], factory=llama, rank=4, mosa_modules=2,
                                         mosa_seed=9)
    assert_trains(compiled, args)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "saved")
    again = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_dir": str(tmp_path / "saved")}]}, KW)
    assert torch.equal(logits(again.module, args), expected)
    state = again.adapters["again"]
    assert state.spec.options["mosa_modules"] == 2 and state.spec.options["mosa_seed"] == 9
    for site, saved in zip(state.sites, compiled.adapters[NAME].sites):   # the assignments travel with it
        assert torch.equal(again.module.get_parameter(site.params["mosa_lora_A"]),
                           compiled.module.get_parameter(saved.params["mosa_lora_A"]))


def test_lora_bias_is_partitioned_too():
    model, args, compiled = compile_kind("lora", ["*.c_attn"], factory=hf_gpt2, rank=2, bias=True, mosa_modules=3)
    site = compiled.adapters[NAME].sites[0]
    assert set(site.params) >= {"lora_bias", "mosa_lora_bias"}
    assert_trains(compiled, args)


@pytest.mark.parametrize("options,message", [
    ({"mosa_modules": 0}, "mosa_modules"),
    ({"mosa_modules": "4"}, "mosa_modules"),
    ({"mosa_seed": 1.5}, "mosa_seed"),
    ({"rank": 1, "mosa_modules": 33}, r"33 modules need at least 33 entries .* lora_B of a 64 -> 32 site has 32"),
])
def test_malformed_options_are_refused(options, message):
    model, args = llama()
    with pytest.raises(SpecError, match=message):
        surgeon.compile(model, args, spec("lora", ["*.k_proj"], **{"rank": 2, **options}), KW)


def test_as_many_modules_as_the_smallest_parameter_has_entries_is_allowed():
    # lora_B of a k_proj site (64 -> 32) at rank 1 has 32 entries: one per module
    model, args, compiled = compile_kind("lora", ["*.k_proj"], factory=llama, rank=1, mosa_modules=32)
    site = compiled.adapters[NAME].sites[0]
    ids = compiled.module.get_parameter(site.params["mosa_lora_B"])
    assert sorted(ids.flatten().tolist()) == list(range(32))   # one entry per module
