"""C3A: y + (ΔW / in) x with ΔW made of b x b circulant blocks, one trained length-b kernel each; exact merge,
PEFT import (its default random init, per-module block sizes) and export."""
from __future__ import annotations

import math

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity, spec)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits


def test_c3a_lifecycle(tmp_path):
    # hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64; a site trains out * in / b
    model, args, compiled = compile_kind("c3a", ["*.k_proj", "*.down_proj"], block_size=16)
    assert_identity_insert(compiled, model, args)      # zero kernels
    assert_param_count(compiled, 2 * (64 * 32 + 128 * 64) // 16)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    # hf_gpt2: c_attn 32 -> 96, mlp.c_proj 128 -> 32
    model, args, compiled = compile_kind("c3a", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, block_size=8)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * (32 * 96 + 128 * 32) // 8)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_delta_is_the_circulant_definition_and_peft_s():
    """Block (i, j) of ΔW, entry (u, t), is kernel[i, j, (t - u) mod b] / in (written out entry by entry),
    and PEFT's FFT-based get_delta_weight agrees."""
    peft = pytest.importorskip("peft")
    from peft.tuners.c3a.layer import C3ALinear

    c3a = kinds()["c3a"]
    base = torch.nn.Linear(24, 18)
    layer = C3ALinear(base, "default", peft.C3AConfig(block_size=6, init_weights="gaussian"), block_size=6)
    kernel = layer.c3a_kernel["default"].detach()                   # (3, 4, 6)
    exact = c3a.delta_weight({"c3a_kernel": kernel}, {"block_size": 6}, base.weight.detach().double())
    expected = torch.empty(18, 24, dtype=torch.float64)
    for row in range(18):
        for col in range(24):
            expected[row, col] = kernel[row // 6, col // 6, (col % 6 - row % 6) % 6].double() / 24
    torch.testing.assert_close(exact, expected, rtol=0, atol=0)
    delta = c3a.delta_weight({"c3a_kernel": kernel}, {"block_size": 6}, base.weight.detach())
    assert delta.dtype == torch.float32                                  # merge_dtype of a float32 weight
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-6, atol=1e-7)


def test_the_graph_applies_the_same_blocks():
    """The forward's circulant (graph code on the kernel) gives PEFT's block circular convolution of x."""
    peft = pytest.importorskip("peft")
    from peft.tuners.c3a.layer import C3ALinear

    base = torch.nn.Linear(32, 16)
    layer = C3ALinear(base, "default", peft.C3AConfig(block_size=8, init_weights="kaiming_uniform"), block_size=8)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    delta = kinds()["c3a"].delta_weight({"c3a_kernel": layer.c3a_kernel["default"].detach()}, {"block_size": 8},
                                        base.weight.detach())
    torch.testing.assert_close(base(x) + x @ delta.T, layer(x).detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform", "gaussian"])
def test_random_inits_change_the_function(init):
    model, args, compiled = compile_kind("c3a", ["*.q_proj", "*.down_proj"], block_size=16, init=init)
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


@pytest.mark.parametrize("init,bound", [("xavier_uniform", math.sqrt(6 / (64 + 32))),
                                        ("kaiming_uniform", 1 / math.sqrt(64))])
def test_uniform_inits_are_peft_s_ranges(init, bound):
    kernel = kinds()["c3a"].init({"block_size": 8, "init": init}, 64, 32, torch.float32,
                                 torch.Generator().manual_seed(0), None)["c3a_kernel"]
    assert kernel.shape == (4, 8, 8)
    assert kernel.abs().max() <= bound and kernel.abs().max() > 0.9 * bound


def test_block_size_must_divide_both_sides():
    model, args = hf_llama()
    with pytest.raises(Exception, match="block_size 48 must divide the site's 64 input and 32 output"):
        surgeon.compile(model, args, spec("c3a", ["*.k_proj"], block_size=48), KW)


@pytest.mark.parametrize("init", [True, "xavier_uniform"])
def test_peft_parity(init, tmp_path):
    """A randomized PEFT C3A checkpoint imports with PEFT's outputs, before and after merge; down_proj has
    its own block size (block_size_pattern), read from its kernel."""
    peft = pytest.importorskip("peft")
    config = peft.C3AConfig(target_modules=["q_proj", "k_proj", "down_proj"], block_size=16,
                            block_size_pattern={"down_proj": 32}, init_weights=init)
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert state.spec.options["block_size"] == 16
    assert {s.path.rsplit(".", 1)[1]: s.options["block_size"] for s in state.sites} == \
        {"q_proj": 16, "k_proj": 16, "down_proj": 32}


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("c3a", ["*.q_proj", "*.k_proj", "*.up_proj"], block_size=32)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_of_per_module_block_sizes(tmp_path):
    """An imported adapter with a block_size_pattern goes back out with it, and PEFT loads the same function."""
    peft = pytest.importorskip("peft")
    config = peft.C3AConfig(target_modules=["q_proj", "down_proj"], block_size=16, block_size_pattern={"down_proj": 8})
    peft_parity(config, tmp_path / "in")
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, KW)
    peft_export(compiled, model, args, tmp_path / "out")
