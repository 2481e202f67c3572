"""combine keeps the bias changes of its inputs' merges: IA3's output scale and lora_bias on GPT-2 (Conv1D
sites with biases), BEFT and RoAd on BERT. `linear` carries them (the combined adapter merges to the base
plus the weighted sum of what merging each input alone changes, weights and biases alike); methods defined on
weight deltas only refuse such an input, naming it and the module."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from tests.conftest import hf_bert, hf_gpt2, randomize_adapters
from tests.passes.helpers import logits

KW = {"use_cache": False}
GPT2 = {"adapters": [
    {"name": "a", "type": "ia3", "targets": ["*.attn.c_attn", "*.mlp.c_fc"]},                      # l W, l b
    {"name": "b", "type": "lora", "targets": ["*.attn.c_proj", "*.mlp.c_proj"], "rank": 2, "bias": True},
]}
BERT = {"adapters": [
    {"name": "a", "type": "beft", "targets": ["*.attention.output.dense", "*.intermediate.dense"], "init": "random"},
    {"name": "b", "type": "road", "targets": ["*.attention.self.query", "*.attention.self.value"], "group_size": 8,
     "init": "random"},
]}


def with_biases(model):
    """HF inits linear biases to zero: give them values, so a bias change shows."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture(scope="module")
def gpt2():
    model, args = hf_gpt2()
    with_biases(model)
    compiled = surgeon.compile(model, args, GPT2, KW)
    randomize_adapters(compiled.module, seed=4)
    with torch.no_grad():   # IA3's scale near 1, as training leaves it (randomize gives ~N(0, 0.01))
        for name, p in compiled.module.named_parameters():
            if name.endswith("ia3_l"):
                p.add_(1.0)
    return compiled, args


@pytest.fixture(scope="module")
def bert():
    model, args, kwargs = hf_bert()
    with_biases(model)
    compiled = surgeon.compile(model, args, BERT, kwargs)
    randomize_adapters(compiled.module, seed=5)
    return compiled, args


def base_params(compiled) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in compiled.module.named_parameters() if ".adapter_" not in n}


def merged_alone(compiled, name: str) -> dict[str, torch.Tensor]:
    """What merging adapter `name` alone changes in every base parameter (the merge pass on a copy)."""
    before = base_params(compiled)
    other = copy.deepcopy(compiled)
    other.apply([{"merge": {"adapters": [name]}}])
    after = dict(other.module.named_parameters())
    assert compiled.adapters[name].status == "inserted"    # the copy merged, not the fixture
    return {n: after[n].detach() - before[n] for n in before}


def assert_combined_merge_is_sum_of_merges(fixture, weights, bias_paths):
    compiled, _ = fixture
    base = base_params(compiled)
    changes = [merged_alone(compiled, n) for n in ("a", "b")]
    assert any(bool(changes[0][f"{p}.bias"].any()) for p in bias_paths)   # the inputs do change biases
    work = copy.deepcopy(compiled)
    work.apply([{"combine": {"adapters": ["a", "b"], "weights": weights, "into": "ab"}}])
    state = work.adapters["ab"]
    assert state.spec.type == "delta" and any(s.options.get("bias") for s in state.sites)
    assert any("bias deltas" in n for n in work.report.rows[-1].notes)
    work.apply([{"merge": {"adapters": ["ab"]}}])
    got = dict(work.module.named_parameters())
    for name, value in base.items():
        want = value + weights[0] * changes[0][name] + weights[1] * changes[1][name]
        torch.testing.assert_close(got[name].detach(), want, rtol=1e-5, atol=1e-6, msg=name)


def test_gpt2_linear_carries_ia3_and_lora_bias(gpt2):
    paths = [s.path for s in gpt2[0].adapters["a"].sites]
    assert_combined_merge_is_sum_of_merges(gpt2, [0.7, 0.5], paths)


def test_bert_linear_carries_beft_and_road(bert):
    paths = [s.path for s in bert[0].adapters["a"].sites]
    assert_combined_merge_is_sum_of_merges(bert, [0.6, 1.2], paths)


@pytest.mark.parametrize("name,rank", [("a", None), ("b", None), ("b", 2)])
def test_one_adapter_at_weight_one_keeps_its_bias_change(gpt2, name, rank):
    """combine(linear, [1]) of one input reproduces its function, bias included; with `rank` as a LoRA
    whose lora_bias holds the bias delta."""
    compiled, args = gpt2
    work = copy.deepcopy(compiled)
    before = logits(work.module, args)
    options = {"adapters": [name], "weights": [1], "into": "one"} | ({"rank": rank} if rank else {})
    work.apply([{"combine": options}])
    state = work.adapters["one"]
    assert state.spec.type == ("lora" if rank else "delta")
    torch.testing.assert_close(logits(work.module, args), before, rtol=1e-5, atol=1e-5)
    merged = work.apply([{"merge": {"adapters": ["one"]}}])
    torch.testing.assert_close(logits(merged.module, args), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture,method,extra,culprit", [
    ("gpt2", "ties", {"density": 0.5}, ("a", "ia3")),
    ("gpt2", "dare_linear", {"density": 0.5, "seed": 0}, ("a", "ia3")),
    ("bert", "magnitude_prune", {"density": 0.5}, ("a", "beft")),
    ("bert", "orthomerge", {}, ("a", "beft")),
])
def test_weight_only_methods_refuse_an_input_that_changes_the_bias(request, fixture, method, extra, culprit):
    compiled, _ = request.getfixturevalue(fixture)
    path = compiled.adapters[culprit[0]].sites[0].path
    with pytest.raises(surgeon.SpecError) as error:
        compiled.apply([{"combine": {"adapters": ["a", "b"], "method": method, **extra}}])
    message = str(error.value)
    assert f"cannot combine adapter '{culprit[0]}' ({culprit[1]}) at '{path}' with method '{method}'" in message
    assert "changes the layer's bias" in message
    assert [compiled.adapters[n].status for n in ("a", "b")] == ["inserted", "inserted"]   # nothing changed


def test_a_zero_bias_delta_is_no_refusal():
    """lora_bias at its zero init changes no bias: ties combines it (nothing is dropped)."""
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": n, "type": "lora", "targets": ["*.attn.c_proj"], "rank": 2, "bias": True,
                          "init": "gaussian"} for n in ("a", "b")]}
    compiled = surgeon.compile(model, args, spec, KW)
    compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "ties", "density": 0.5}}])
    assert compiled.adapters["a_b_ties"].status == "inserted"
