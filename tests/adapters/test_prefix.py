"""Prefix tuning: learned key/value prefixes at each SDPA call, against hand-written attention.

References: a 1-layer TinyLlama (is_causal=True becomes an explicit mask) and a toy attention
with a boolean and an additive mask (the mask gets visible prefix columns), each recomputed in
plain torch with the same prefixes concatenated. Then HF LLaMA's lifecycle: training, param
count (prefixes sized by kv heads), merge refused with the reason, remove/activate restoring the
call, save/load round trip, and PEFT's PrefixTuningConfig: from_peft parity and export back.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import surgeon
from surgeon.errors import SpecError
from surgeon.models import _rotate_half, tiny_llama
from tests.adapters.helpers import (NAME, spec, assert_close, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind)
from tests.conftest import hf_llama
from tests.passes.helpers import adapter_nodes, logits

TOKENS = 3


def _attention(q, k, v, pk, pv, allowed=None, additive=None):
    """softmax(q [P_k | k]^T / sqrt(d) + mask) [P_v | v], by hand."""
    k = torch.cat([pk.expand(q.shape[0], -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(q.shape[0], -1, -1, -1), v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if additive is not None:
        scores = scores + additive
    return scores.softmax(-1) @ v


def _tiny_llama_reference(model, ids, pk, pv):
    """TinyLlama's forward (one layer) with the prefixes in its attention, written out by hand."""
    (layer,), attn = model.layers, model.layers[0].self_attn
    b, s = ids.shape
    freqs = torch.outer(torch.arange(s).float(), model.inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x = model.embed_tokens(ids)
    h = layer.input_layernorm(x)
    q, k, v = (proj(h).view(b, s, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    groups = attn.heads // attn.kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    allowed = torch.cat([torch.ones(s, TOKENS, dtype=torch.bool), torch.ones(s, s, dtype=torch.bool).tril()], -1)
    pk, pv = pk.repeat_interleave(groups, dim=0), pv.repeat_interleave(groups, dim=0)   # kv prefixes, repeated like k
    out = _attention(q, k, v, pk, pv, allowed=allowed)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


def _prefixes(compiled, path):
    module = compiled.module
    return tuple(module.get_parameter(f"{path}.adapter_{NAME}.{p}") for p in ("prefix_k", "prefix_v"))


def test_causal_attention_gets_prefix_and_explicit_mask():
    model, args = tiny_llama(num_layers=1)
    compiled = surgeon.compile(model, args, spec("prefix", ["*.self_attn"], num_virtual_tokens=TOKENS))
    row = compiled.report.rows[-1]
    assert (row.name, row.matches, row.check) == ("insert", 1, "changes function")
    sdpa_op = torch.ops.aten.scaled_dot_product_attention.default
    (sdpa,) = [n for n in compiled.module.graph.nodes if n.target is sdpa_op]
    assert sdpa.args[5] is False and sdpa.args[3].meta["surgeon_adapter"] == NAME   # is_causal -> explicit mask
    pk, pv = _prefixes(compiled, "layers.0.self_attn")
    assert pk.shape == pv.shape == (2, TOKENS, 16)   # kv heads (repeat_interleave recognized), n, head_dim
    with torch.no_grad():
        want = _tiny_llama_reference(model, args[0], pk, pv)
    assert_close(logits(compiled.module, args), want)
    assert not torch.allclose(logits(compiled.module, args), logits(model, args), atol=1e-3)


class _MaskedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _MaskedAttention()

    def forward(self, x, mask):
        return self.attn(x, mask)


@pytest.mark.parametrize("kind", ["bool", "additive", "broadcast"])
def test_given_mask_gets_visible_prefix_columns(kind):
    torch.manual_seed(0)
    model, gen = _Toy().eval(), torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen)
    allowed = torch.rand(2, 1, 5, 5, generator=gen) > 0.4
    allowed[..., 0] = True   # every query sees some key
    mask = {"bool": allowed, "additive": torch.randn(5, 5, generator=gen),
            "broadcast": torch.randn(5, 1, generator=gen)}[kind]   # one value per query, over all keys
    compiled = surgeon.compile(model, (x, mask), spec("prefix", ["attn"], num_virtual_tokens=TOKENS))
    pk, pv = _prefixes(compiled, "attn")
    with torch.no_grad():
        q, k, v = model.attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        want = _attention(q, k, v, pk, pv, allowed=torch.cat([torch.ones(2, 1, 5, TOKENS, dtype=torch.bool),
                                                              allowed], -1) if kind == "bool" else None,
                          additive=None if kind == "bool" else torch.cat([torch.zeros(5, TOKENS),
                                                                          mask.expand(5, 5)], -1))
    assert_close(logits(compiled.module, (x, mask)), want)


class _TiledKV(nn.Module):
    """Two kv heads tiled (k.repeat: head h reads kv head h % 2), a layout the GQA sizing does not take."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(16, 32), nn.Linear(16, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 8).transpose(1, 2)
        k, v = (t.view(b, s, 2, 8).transpose(1, 2).repeat(1, 2, 1, 1) for t in self.kv(x).chunk(2, -1))
        return F.scaled_dot_product_attention(q, k, v)


def test_unrecognized_kv_repeat_keeps_the_calls_heads():
    torch.manual_seed(0)
    model, x = nn.Sequential(_TiledKV()).eval(), torch.randn(2, 5, 16)
    compiled = surgeon.compile(model, (x,), spec("prefix", ["0"], num_virtual_tokens=TOKENS))
    pk, pv = _prefixes(compiled, "0")
    assert pk.shape == (4, TOKENS, 8) and compiled.adapters[NAME].sites[0].options["kv_groups"] == 1
    with torch.no_grad():
        q = model[0].q(x).view(2, 5, 4, 8).transpose(1, 2)
        k, v = (t.view(2, 5, 2, 8).transpose(1, 2).repeat(1, 2, 1, 1) for t in model[0].kv(x).chunk(2, -1))
        want = _attention(q, k, v, pk, pv)
    assert_close(logits(compiled.module, (x,)), want)


def test_hf_llama_lifecycle(tmp_path):
    model, args, compiled = compile_kind("prefix", ["*.self_attn"], num_virtual_tokens=4)
    assert compiled.report.rows[-1].check == "changes function"
    assert_param_count(compiled, 2 * (2 * 4 * 2 * 16))   # layers * 2 * n * kv heads (repeat_kv seen) * head_dim
    assert_trains(compiled, args)
    before = logits(compiled.module, args)
    with pytest.raises(SpecError, match="adds attention positions"):
        compiled.apply(["merge"])
    assert torch.equal(logits(compiled.module, args), before) and compiled.adapters[NAME].status == "inserted"
    assert_round_trip(compiled, model, args, tmp_path)


def test_remove_and_deactivate_restore_the_call():
    model, args = tiny_llama(num_layers=1)
    two = spec("prefix", ["*.self_attn"], num_virtual_tokens=TOKENS)
    two["adapters"].append({"name": "other", "type": "lora", "targets": ["*.q_proj"]})   # B = 0: the identity
    compiled = surgeon.compile(model, args, two)
    inserted, want = logits(compiled.module, args), logits(model, args)
    compiled.set_active("other")
    assert adapter_nodes(compiled.module, NAME) == [] and torch.equal(logits(compiled.module, args), want)
    compiled.set_active(NAME, "other")
    assert torch.equal(logits(compiled.module, args), inserted)
    compiled.apply([{"remove": {"adapters": [NAME]}}])
    assert adapter_nodes(compiled.module, NAME) == [] and torch.equal(logits(compiled.module, args), want)


def test_merge_refusal_is_the_kinds_reason():
    kind = surgeon.adapters.kinds()["prefix"]
    assert kind.refusal({"num_virtual_tokens": 8}).startswith("prefix tuning adds attention positions")


def _peft_prefix(tmp_path, model, **config):
    """A PEFT PrefixTuningConfig model on a copy of `model` (N(0, 1) prompt table), saved under tmp_path."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, **config)).eval()
    wrapped.save_pretrained(tmp_path / "peft")
    return wrapped


def test_from_peft_prefix_tuning_matches_peft_and_exports_back(tmp_path):
    """PEFT feeds its prefixes as a KV cache, so its real tokens sit at positions n..n+L-1 (RoPE);
    capturing with those position_ids makes the two functions the same. Its table has no module
    paths: layer l's prefixes go to the l-th SDPA call."""
    peft = pytest.importorskip("peft")
    model, args = hf_llama()
    wrapped = _peft_prefix(tmp_path, model)
    with torch.no_grad():
        expected = wrapped(input_ids=args[0]).logits
    positions = torch.arange(TOKENS, TOKENS + args[0].shape[1]).expand(args[0].shape[0], -1)
    kwargs = {"use_cache": False, "position_ids": positions}
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, kwargs)
    cfg = model.config
    table = wrapped.prompt_encoder["default"].embedding.weight.detach()
    per_layer = table.view(TOKENS, -1, cfg.num_key_value_heads, cfg.head_dim).permute(1, 2, 0, 3)
    pk, pv = _prefixes(compiled, "model.layers.1.self_attn")   # layer 1: key row 2, value row 3
    assert torch.equal(pk, per_layer[2]) and torch.equal(pv, per_layer[3])
    with torch.no_grad():
        assert_close(compiled.module(args[0], position_ids=positions).logits, expected)
    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=args[0]).logits, expected)


def test_from_peft_prefix_projection_and_site_count_are_refused(tmp_path):
    model, args = hf_llama()
    _peft_prefix(tmp_path, model)
    entry = {"name": NAME, "from_peft": str(tmp_path / "peft")}
    with pytest.raises(SpecError, match="select 1"):   # two layers' prefixes, one SDPA call selected
        surgeon.compile(model, args, {"adapters": [{**entry, "targets": ["*.layers.0.self_attn"]}]},
                        {"use_cache": False})
    config = tmp_path / "peft" / "adapter_config.json"
    config.write_text(config.read_text().replace('"prefix_projection": false', '"prefix_projection": true'))
    with pytest.raises(SpecError, match="prefix_projection=True"):
        surgeon.compile(model, args, {"adapters": [entry]}, {"use_cache": False})
