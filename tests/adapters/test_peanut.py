"""PEANuT: y + s·x·ΔWᵀ with ΔW a nonlinear network of the base weight; exact merge (from the weight it lands
on), unmerge refused with the reason, PEFT import (depth, act_fn, scaling) and export with PEFT's outputs before
and after merge."""
from __future__ import annotations

import json

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_edited_checkpoint_refused,
                                    assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity,
                                    randomized_peft_checkpoint)
from tests.conftest import hf_gpt2, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits


def test_peanut_lifecycle(tmp_path):
    # hf_llama: k_proj 64 -> 32 (GQA), down_proj 128 -> 64; a site trains r (2 out + 2 depth r)
    model, args, compiled = compile_kind("peanut", ["*.k_proj", "*.down_proj"], rank=4, depth=1)
    assert_identity_insert(compiled, model, args)   # B = 0: ΔW is exact zeros
    assert_param_count(compiled, 2 * 4 * ((2 * 32 + 2 * 4) + (2 * 64 + 2 * 4)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=False)


def test_unmerge_is_refused_with_the_reason():
    _, args, compiled = compile_kind("peanut", ["*.q_proj"], rank=2)
    randomize_adapters(compiled.module)
    compiled.apply(["merge"])
    with pytest.raises(surgeon.SurgeonError, match="nonlinear function of the base weight"):
        compiled.apply(["unmerge"])


def test_conv1d_sites(tmp_path):
    # hf_gpt2: c_attn 32 -> 96, mlp.c_proj 128 -> 32 (stored in x out: the network reads Wᵀ as stored)
    model, args, compiled = compile_kind("peanut", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=3, depth=2,
                                         activation="tanh")
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 2 * 3 * ((2 * 96 + 2 * 2 * 3) + (2 * 32 + 2 * 2 * 3)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args, unmerge=False)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "silu", "sigmoid", "linear"])
def test_delta_matches_peft(act):
    """Surgeon's delta (and the graph's network, run eagerly) is PEFT's get_delta_weight, for each activation."""
    peft = pytest.importorskip("peft")
    from peft.tuners.peanut.layer import Linear

    peanut = kinds()["peanut"]
    torch.manual_seed(3)
    base = torch.nn.Linear(24, 20)
    layer = Linear(base, "default", r=5, config=peft.PeanutConfig(r=5, depth=2, act_fn=act, scaling=0.7,
                                                                   init_weights=False))
    params = {f"peanut_{side}": getattr(layer, f"peanut_{side}")["default"].weight.detach() for side in "AB"}
    for side in ("encoder", "decoder"):
        for i, module in enumerate(getattr(layer, f"peanut_{side}s")["default"]):
            params[f"peanut_{side}_{i}"] = module.weight.detach()
    opts = {"rank": 5, "depth": 2, "activation": act, "scaling": 0.7, "init": "random"}
    delta = peanut.delta_weight(params, opts, base.weight.detach())
    want = layer.get_delta_weight("default").detach()
    assert delta.dtype == torch.float32 and want.abs().max() > 1e-2
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6)
    exact = peanut.delta_weight(params, opts, base.weight.detach().double())
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, want.double(), rtol=1e-5, atol=1e-6)


def test_the_delta_depends_on_the_base_weight():
    """The network reads W: another base weight gives another delta (what makes unmerge impossible)."""
    peanut = kinds()["peanut"]
    opts = {"rank": 3, "depth": 1, "activation": "relu", "scaling": 1.0, "init": "random"}
    gen = torch.Generator().manual_seed(0)
    params = peanut.init(opts, 8, 6, torch.float32, gen, None)
    weight = torch.randn(6, 8, generator=gen)
    assert not torch.allclose(peanut.delta_weight(params, opts, weight), peanut.delta_weight(params, opts, 2 * weight))


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("peanut", ["*.q_proj"], rank=2, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_peft_parity_and_export(tmp_path):
    """A randomized PEFT PEANuT checkpoint (depth 2, gelu, scaling) imports with PEFT's outputs before and after
    merge, and exports back with PEFT's outputs."""
    peft = pytest.importorskip("peft")
    config = peft.PeanutConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=4, depth=2, act_fn="gelu",
                               scaling=0.5)
    compiled = peft_parity(config, tmp_path / "in", scale=0.5)
    state = compiled.adapters[NAME]
    assert state.spec.options == {"rank": 4, "depth": 2, "activation": "gelu", "scaling": 0.5, "init": "default"}
    assert adapter_nodes(compiled.module) == []
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "again", scale=0.5)
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    peft_export(again, model, args, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (written["r"], written["depth"], written["act_fn"], written["scaling"]) == (4, 2, "gelu", 0.5)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("peanut", ["*.q_proj", "*.up_proj"], rank=3, depth=1, activation="silu",
                                         scaling=2.0)
    peft_export(compiled, model, args, tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: c.update(act_fn="mish"), "act_fn 'mish' is not supported"),
    (lambda c, t: c.update(depth=2), r"module 'model.layers.\d.self_attn.q_proj' needs depth=2 encoders and decoders"),
    (lambda c, t: c.update(r=3), r"module 'model.layers.\d.self_attn.q_proj' needs peanut_A \(r x out\) and peanut_B "
                                 r"\(out x r\) with r=3"),
    (lambda c, t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.peanut_encoders.0.weight"),
     r"module 'model.layers.0.self_attn.q_proj' needs depth=1 encoders and decoders of 4 x 4"),
])
def test_a_malformed_checkpoint_is_refused(tmp_path, edit, message):
    peft = pytest.importorskip("peft")
    config = peft.PeanutConfig(target_modules=["q_proj"], r=4, depth=1)
    assert_edited_checkpoint_refused(config, tmp_path, edit, message)
