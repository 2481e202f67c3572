"""PEFT's CARTRIDGE (a stored KV prefix, served like prefix tuning) read and written as surgeon's `prefix` kind.

A CARTRIDGE checkpoint is prefix tuning's table without the projection, plus num_frozen_tokens: the
first positions take no gradient. surgeon's prefix kind holds those as the frozen parameters
prefix_k_frozen / prefix_v_frozen (option `frozen_tokens`). Checked: logits against PEFT's own
model (PEFT feeds the prefix as a KV cache, so the real tokens sit at positions n.., the
position_ids surgeon captures with), which positions train, the export back (CARTRIDGE when
positions are frozen, PREFIX_TUNING otherwise) that PEFT loads to the same logits, and the
refusal of malformed configs and tables.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import surgeon
from surgeon.errors import SpecError
from surgeon.models import tiny_llama
from tests.adapters.helpers import (KW, NAME, assert_close, assert_param_count, assert_round_trip, assert_trains,
                                    compile_kind, spec)
from tests.conftest import hf_llama
from tests.passes.helpers import logits

peft = pytest.importorskip("peft")

TOKENS = 3


def _peft_cartridge(tmp_path, model, frozen: int):
    """A PEFT CartridgeConfig model on a copy of `model`, its table (frozen and trained parts) redrawn, saved."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.CartridgeConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, num_frozen_tokens=frozen)).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in wrapped.prompt_encoder.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    wrapped.save_pretrained(tmp_path / "peft")
    return wrapped


def _positions(args):
    return torch.arange(TOKENS, TOKENS + args[0].shape[1]).expand(args[0].shape[0], -1)


def _import(model, args, directory):
    kwargs = {**KW, "position_ids": _positions(args)}
    return surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(directory)}]}, kwargs)


def _params(compiled, layer: int) -> dict:
    path = f"model.layers.{layer}.self_attn.adapter_{NAME}"
    return {n.rsplit(".", 1)[-1]: p for n, p in compiled.module.named_parameters(remove_duplicate=False)
            if n.startswith(path + ".")}


@pytest.mark.parametrize("frozen", [1, 0])
def test_from_peft_cartridge_matches_peft_and_exports_back(tmp_path, frozen):
    model, args = hf_llama()
    wrapped = _peft_cartridge(tmp_path, model, frozen)
    with torch.no_grad():
        expected = wrapped(input_ids=args[0]).logits
    compiled = _import(model, args, tmp_path / "peft")
    assert compiled.adapters[NAME].spec.options["frozen_tokens"] == frozen
    cfg = model.config
    table = wrapped.prompt_encoder["default"].weight.detach()
    per_layer = table.view(TOKENS, -1, cfg.num_key_value_heads, cfg.head_dim).permute(1, 2, 0, 3)
    params = _params(compiled, 1)   # layer 1: key row 2, value row 3
    whole_k = torch.cat([params["prefix_k_frozen"], params["prefix_k"]], 1) if frozen else params["prefix_k"]
    assert torch.equal(whole_k, per_layer[2]) and torch.equal(params["prefix_v"], per_layer[3][:, frozen:])
    assert {n for n, p in params.items() if not p.requires_grad} == ({"prefix_k_frozen", "prefix_v_frozen"}
                                                                     if frozen else set())
    assert_param_count(compiled, 2 * 2 * (TOKENS - frozen) * cfg.num_key_value_heads * cfg.head_dim)
    with torch.no_grad():
        got = compiled.module(args[0], position_ids=_positions(args)).logits
    assert_close(got, expected)
    assert not torch.allclose(got, model(args[0]).logits, atol=1e-3)

    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("CARTRIDGE" if frozen else "PREFIX_TUNING")   # the same function either way
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=args[0]).logits, expected)
    if frozen:
        encoder = again.prompt_encoder["default"]
        assert encoder.num_frozen_tokens == frozen
        assert torch.equal(encoder.frozen_embedding, wrapped.prompt_encoder["default"].frozen_embedding)


def test_frozen_positions_take_no_gradient_and_round_trip(tmp_path):
    model, args, compiled = compile_kind("prefix", ["*.self_attn"], num_virtual_tokens=4, frozen_tokens=1)
    assert_param_count(compiled, 2 * (2 * 3 * 2 * 16))   # layers * 2 * (n - frozen) * kv heads * head_dim
    frozen = {n: p.detach().clone() for n, p in compiled.module.named_parameters() if n.endswith("_frozen")}
    assert len(frozen) == 4 and all(t.shape == (2, 1, 16) for t in frozen.values())
    assert_trains(compiled, args)   # only prefix_k / prefix_v get gradients and move
    assert all(torch.equal(compiled.module.get_parameter(n), t) for n, t in frozen.items())
    assert_round_trip(compiled, model, args, tmp_path)


def test_frozen_tokens_change_training_not_the_function():
    """The same draw with and without frozen positions: one n-position prefix, the same logits."""
    model, args = tiny_llama(num_layers=1)
    plain = surgeon.compile(model, args, spec("prefix", ["*.self_attn"], num_virtual_tokens=4))
    split = surgeon.compile(model, args, spec("prefix", ["*.self_attn"], num_virtual_tokens=4, frozen_tokens=2))
    assert split.module.get_parameter(f"layers.0.self_attn.adapter_{NAME}.prefix_k").shape == (2, 2, 16)
    assert torch.equal(logits(split.module, args), logits(plain.module, args))


def test_more_frozen_than_virtual_tokens_is_refused():
    with pytest.raises(surgeon.SurgeonError, match="frozen_tokens=5 is more than num_virtual_tokens=4"):
        compile_kind("prefix", ["*.self_attn"], num_virtual_tokens=4, frozen_tokens=5)
    with pytest.raises(SpecError, match="frozen_tokens"):
        compile_kind("prefix", ["*.self_attn"], num_virtual_tokens=4, frozen_tokens=-1)


def _edit(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"num_frozen_tokens": 4}, r"num_frozen_tokens must be an integer in \[0, num_virtual_tokens=3\], got 4"),
    ({"num_frozen_tokens": -1}, "num_frozen_tokens must be an integer"),
    ({"num_frozen_tokens": "1"}, "num_frozen_tokens must be an integer"),
    ({"prefix_projection": True}, "'prefix_projection' is a PREFIX_TUNING key"),
    ({"num_layers": 3}, r"prompt_embeddings of shape \[3, 128\] does not fit num_virtual_tokens=3 x num_layers=3"),
    ({"num_transformer_submodules": 2}, "encoder-decoder"),
])
def test_malformed_cartridge_is_refused(tmp_path, changes, message):
    model, args = hf_llama()
    _peft_cartridge(tmp_path, model, 1)
    _edit(tmp_path / "peft", **changes)
    with pytest.raises(SpecError, match=message):
        _import(model, args, tmp_path / "peft")


def test_cartridge_layers_must_match_the_sdpa_calls(tmp_path):
    model, args = hf_llama()
    _peft_cartridge(tmp_path, model, 1)
    entry = {"name": NAME, "from_peft": str(tmp_path / "peft"), "targets": ["*.layers.0.self_attn"]}
    with pytest.raises(SpecError, match="select 1"):   # two layers' prefixes, one SDPA call selected
        surgeon.compile(model, args, {"adapters": [entry]}, KW)
