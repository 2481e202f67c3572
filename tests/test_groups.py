"""Coupled-group analysis: which weight axes move together, on LLaMA (GQA + RoPE), GPT-2 (fused
c_attn split), a residual CNN, a torch.cat index map, and poison cases (ops without a rule)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx
from torch import nn

import surgeon
from surgeon.groups import analyze_groups, eligible, format_groups
from surgeon.models import tiny_llama
from tests.conftest import hf_gpt2, hf_llama, small_cnn

KW = {"use_cache": False}


def _by_key(spec: dict) -> dict:
    return {g["key"]: g for g in spec["groups"]}


def _members(group: dict) -> set:
    return {(m["tensor"], m["axis"], m["start"], m["stop"], m["role"]) for m in group["members"]}


@pytest.fixture(scope="module")
def llama_spec():
    model, args = hf_llama()
    gm = surgeon.capture(model, args, KW)
    return gm, analyze_groups(gm)


def test_llama_mlp_and_attention_groups(llama_spec):
    gm, spec = llama_spec
    groups = _by_key(spec)
    p = "model.layers.0"
    assert _members(groups[f"{p}.mlp"]) == {           # SwiGLU: gate and up rows move with down columns
        (f"{p}.mlp.gate_proj.weight", 0, 0, 128, "out"), (f"{p}.mlp.up_proj.weight", 0, 0, 128, "out"),
        (f"{p}.mlp.down_proj.weight", 1, 0, 128, "in")}
    heads, kv = groups[f"{p}.self_attn:heads"], groups[f"{p}.self_attn:kv-heads"]
    assert _members(heads) == {(f"{p}.self_attn.q_proj.weight", 0, 0, 64, "out"),
                               (f"{p}.self_attn.o_proj.weight", 1, 0, 64, "in")}
    assert _members(kv) == {(f"{p}.self_attn.k_proj.weight", 0, 0, 32, "out"),
                            (f"{p}.self_attn.v_proj.weight", 0, 0, 32, "out")}
    # whole heads of head_dim 16 move (rotary pairs inside a head never do); 2 query heads per kv head
    assert (heads["unit"], heads["units"], kv["unit"], kv["units"]) == (16, 4, 16, 2)
    assert heads["tie"] == {"group": kv["id"], "coarse": 32, "movable": True} and kv["tied_by"] == [heads["id"]]
    assert all(g["status"] == "eligible" for g in (heads, kv, groups[f"{p}.mlp"]))
    assert len(eligible(spec)) == 6                     # 2 layers x (mlp, q heads, kv heads)


def test_llama_residual_stream_and_fixed_axes(llama_spec):
    gm, spec = llama_spec
    residual = [g for g in spec["groups"] if g["status"] == "residual"]
    assert len(residual) == 1
    tensors = {m["tensor"] for m in residual[0]["members"]}
    assert {"model.norm.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight",
            "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"} <= tensors
    assert "residual add at add_6" in residual[0]["reasons"][0]
    vocab = spec["groups"][spec["tensors"]["lm_head.weight"]["axes"][0][0]["group"]]
    assert vocab["status"] == "ineligible" and "graph output" in vocab["reasons"][0]
    rows = spec["groups"][spec["tensors"]["model.embed_tokens.weight"]["axes"][0][0]["group"]]
    assert "gathered by index" in rows["reasons"][0]
    assert gm.meta["surgeon_groups"] is spec
    json.dumps(spec)                                    # plain data


def test_gpt2_fused_qkv_split_is_an_index_map():
    model, args = hf_gpt2()
    spec = analyze_groups(surgeon.capture(model, args, KW))
    heads = _by_key(spec)["transformer.h.0.attn"]
    p = "transformer.h.0.attn"
    assert _members(heads) == {(f"{p}.c_attn.weight", 1, s, s + 32, "out") for s in (0, 32, 64)} | \
        {(f"{p}.c_attn.bias", 0, s, s + 32, "bias") for s in (0, 32, 64)} | {(f"{p}.c_proj.weight", 0, 0, 32, "in")}
    assert (heads["kind"], heads["unit"], heads["units"], heads["status"]) == ("heads", 8, 4, "eligible")
    segments = spec["tensors"][f"{p}.c_attn.weight"]["axes"][1]
    assert [(s["start"], s["stop"], s["group"]) for s in segments] == [(0, 32, heads["id"]), (32, 64, heads["id"]),
                                                                      (64, 96, heads["id"])]
    mlp = _by_key(spec)["transformer.h.0.mlp"]
    assert {m["tensor"] for m in mlp["members"]} == {"transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
                                                     "transformer.h.0.mlp.c_proj.weight"}


def test_cnn_conv_bn_channels_and_residual_trunk():
    model, args = small_cnn()
    spec = analyze_groups(surgeon.capture(model, args))
    inner = _by_key(spec)["block1"]
    assert {(m["tensor"], m["axis"], m["role"]) for m in inner["members"]} == {
        ("block1.0.weight", 0, "out"), ("block1.0.bias", 0, "bias"), ("block1.1.weight", 0, "affine"),
        ("block1.1.bias", 0, "affine"), ("block1.1.running_mean", 0, "stat"), ("block1.1.running_var", 0, "stat"),
        ("block1.3.weight", 1, "in")}
    assert [g["key"] for g in eligible(spec)] == ["block1"]
    trunk = spec["groups"][spec["tensors"]["stem.0.weight"]["axes"][0][0]["group"]]
    assert trunk["status"] == "residual" and "block2.0.weight" in {m["tensor"] for m in trunk["members"]}
    window = spec["groups"][spec["tensors"]["block1.0.weight"]["axes"][2][0]["group"]]
    assert "kernel window" in window["reasons"][0]


def test_tiny_llama_repeat_interleave_is_grouped_query_attention():
    model, args = tiny_llama()
    groups = _by_key(analyze_groups(surgeon.capture(model, args)))
    heads, kv = groups["layers.1.self_attn:heads"], groups["layers.1.self_attn:kv-heads"]
    assert heads["tie"]["group"] == kv["id"] and heads["tie"]["coarse"] == 32 and kv["unit"] == 16


class _CatMLP(nn.Module):
    """Two producers concatenated along channels, read by one consumer: an index map."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 4), nn.Linear(6, 12), nn.Linear(16, 6)

    def forward(self, x):
        return x + self.out(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))


def test_concat_splits_the_consumer_columns_into_two_groups():
    x = torch.randn(3, 6)
    spec = analyze_groups(surgeon.capture(_CatMLP(), (x,)))
    segments = spec["tensors"]["out.weight"]["axes"][1]
    assert [(s["start"], s["stop"]) for s in segments] == [(0, 4), (4, 16)]
    first, second = (spec["groups"][s["group"]] for s in segments)
    assert {m["tensor"] for m in first["members"]} == {"a.weight", "a.bias", "out.weight"}
    assert {m["tensor"] for m in second["members"]} == {"b.weight", "b.bias", "out.weight"}
    assert first["status"] == second["status"] == "eligible"


# ------------------------------------------------------------------ poison: ops without a rule

@torch.library.custom_op("surgeon_groups_test::scramble", mutates_args=())
def scramble(h: torch.Tensor) -> torch.Tensor:
    return h.roll(1, -1)


@scramble.register_fake
def _scramble_fake(h):
    return torch.empty_like(h)


@torch.fx.wrap
def flip_if_positive(h):
    return h.flip(-1) if bool(h.sum() > 0) else h       # data-dependent: export refuses, torch.fx keeps it opaque


class _Poisoned(nn.Module):
    def __init__(self, middle):
        super().__init__()
        self.middle = middle
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.up2, self.down2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.middle(torch.relu(self.up(x)))) + self.down2(torch.relu(self.up2(x)))


class _Wrapped(_Poisoned):
    def forward(self, x):      # calls the wrapped function by its global name, as torch.fx.wrap requires
        return self.down(flip_if_positive(torch.relu(self.up(x)))) + self.down2(torch.relu(self.up2(x)))


def _cumsum(h):
    return torch.cumsum(h, -1)


@pytest.mark.parametrize("make,op,frontend", [
    (lambda: _Poisoned(scramble), "surgeon_groups_test.scramble", "export"),   # an opaque custom op
    (lambda: _Poisoned(_cumsum), "aten.cumsum", "export"),                    # an aten op with no rule
    (lambda: _Wrapped(None), "flip_if_positive", "fx"),                       # a torch.fx.wrap'd function
])
def test_op_without_a_rule_makes_the_group_ineligible(make, op, frontend):
    x = torch.randn(3, 8)
    gm = surgeon.capture(make(), (x,))
    assert gm.meta["surgeon_frontend"] == frontend
    spec = analyze_groups(gm, (x,))
    producer = spec["groups"][spec["tensors"]["up.weight"]["axes"][0][0]["group"]]
    consumer = spec["groups"][spec["tensors"]["down.weight"]["axes"][1][0]["group"]]
    assert producer["status"] == consumer["status"] == "ineligible"
    assert f"({op}, <root>)" in producer["reasons"][0] and "no transfer rule" in producer["reasons"][0]
    assert f"({op}, <root>)" in consumer["reasons"][0]             # the consumer side names the op too
    clean = spec["groups"][spec["tensors"]["up2.weight"]["axes"][0][0]["group"]]
    assert clean["status"] == "eligible" and {m["tensor"] for m in clean["members"]} == {
        "up2.weight", "up2.bias", "down2.weight"}


def test_format_groups_lists_groups_reasons_and_tensor_axes(llama_spec):
    _, spec = llama_spec
    text = format_groups(spec)
    assert "coupled groups: 10 (6 eligible, 3 ineligible, 1 residual)" in text
    assert "32-blocks move with g3" in text and "why:" in text
    assert "model.layers.0.self_attn.q_proj.weight 64x64  0: g2/16  1: g1/1" in text
    assert "g0 " not in format_groups(spec, show_ineligible=False).split("why:")[0].split("-----")[-1]
