"""(IA)^3: output and input scaling, exact identity, bias scaled on merge, PEFT parity."""
from __future__ import annotations

import pytest
import torch

import surgeon
from tests.adapters.helpers import (KW, NAME, spec, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity)
from tests.conftest import hf_gpt2, randomize_adapters

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("on,targets,count", [("output", ["*.k_proj", "*.v_proj"], 4 * 32),
                                              ("input", ["*.down_proj"], 2 * 128)])
def test_ia3_lifecycle(on, targets, count, tmp_path):
    model, args, compiled = compile_kind("ia3", targets, on=on)
    assert_identity_insert(compiled, model, args)     # l = 1, and x * 1 == x
    assert_param_count(compiled, count)
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_output_scale_merges_into_the_bias_too():
    model, args = hf_gpt2()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    compiled = surgeon.compile(model, args, spec("ia3", ["*.c_attn", "*.mlp.c_proj"]), KW)
    assert_identity_insert(compiled, model, args)
    assert_merge(compiled, args)                                  # (W x + b) * l == (l W) x + l b
    randomize_adapters(compiled.module)
    compiled.apply(["merge"])
    site = next(s for s in compiled.adapters[NAME].sites if s.path == "transformer.h.0.attn.c_attn")
    merged_bias = compiled.module.get_parameter("transformer.h.0.attn.c_attn.bias")
    torch.testing.assert_close(merged_bias, model.transformer.h[0].attn.c_attn.bias * site.merged["ia3_l"])


def test_peft_parity(tmp_path):
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    compiled = peft_parity(config, tmp_path, scale=0.5)
    options = {s.path.rsplit(".", 1)[-1]: s.options["on"] for s in compiled.adapters[NAME].sites}
    assert options == {"k_proj": "output", "v_proj": "output", "down_proj": "input"}


def test_ia3_output_scale_on_conv2d_sites_merges_exactly():
    from tests.conftest import small_cnn

    model, args = small_cnn()
    compiled = surgeon.compile(model, args, spec("ia3", ["stem.0", "block1.0", "block2.0"]))
    assert [s.op for s in compiled.adapters[NAME].sites] == ["conv2d"] * 3
    assert compiled.adapters[NAME].param_count == 8 * 3       # one scale per output channel
    with torch.no_grad():
        assert torch.equal(compiled.module(*args), model(*args))
        for p in compiled.module.parameters():
            if p.requires_grad:
                p.copy_(torch.linspace(0.5, 1.5, p.numel()))
        scaled = compiled.module(*args)
    assert not torch.allclose(scaled, model(*args))
    compiled.apply(["merge"])
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(*args), scaled, rtol=1e-5, atol=1e-6)
    block = compiled.module.get_parameter("block1.0.weight")
    torch.testing.assert_close(block, model.block1[0].weight * torch.linspace(0.5, 1.5, 8)[:, None, None, None])


def test_ia3_input_scale_on_conv2d_is_refused_with_the_reason():
    from tests.conftest import small_cnn

    model, args = small_cnn()
    with pytest.raises(surgeon.PassError, match="not supported on conv2d sites"):
        surgeon.compile(model, args, spec("ia3", ["block2.0"], on="input"))
