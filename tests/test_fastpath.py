"""surgeon.fastpath: the generated forward (direct bindings, unrepeated grouped-query attention) computes
what the canonical graph says, bit for bit, and the graph itself is left canonical."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import surgeon
from surgeon import fastpath

from .conftest import lora_spec, randomize_adapters

aten = torch.ops.aten


def repeated(kv, repeats):
    b, h, s, d = kv.shape
    return kv[:, :, None].expand(b, h, repeats, s, d).reshape(b, h * repeats, s, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_unrepeated_attention_is_bit_identical_to_repeated_kv(dtype):
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for batch, (q_len, kv_len), (kv_heads, repeats), mask in itertools.product(
            (1, 3), ((1, 9), (5, 5), (7, 130)), ((1, 4), (2, 2), (4, 3)), ("none", "bool", "float", "causal")):
        q = torch.randn(batch, kv_heads * repeats, q_len, 64, generator=gen).to(dtype)
        k, v = (torch.randn(batch, kv_heads, kv_len, 64, generator=gen).to(dtype) for _ in range(2))
        kwargs = {"scale": 0.125}
        if mask == "bool":
            m = torch.rand(batch, 1, q_len, kv_len, generator=gen) > 0.3
            m[..., 0] = True
            kwargs["attn_mask"] = m
        elif mask == "float":
            kwargs["attn_mask"] = torch.randn(batch, 1, q_len, kv_len, generator=gen).to(dtype)
        elif mask == "causal":
            kwargs["is_causal"] = True
        expected = F.scaled_dot_product_attention(q, repeated(k, repeats), repeated(v, repeats), **kwargs)
        got = fastpath.attention_repeated_kv(q, k, v, **kwargs, repeats=repeats)
        assert torch.equal(got, expected), (batch, q_len, kv_len, kv_heads, repeats, mask)
        cases += 1
    assert cases == 2 * 3 * 3 * 4


def test_gradients_take_the_repeated_path():
    """With a gradient to carry the repeat is kept (the backward of a repeat sums the copies' gradients in
    the graph's order): forward and gradients equal those of the repeated graph exactly."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 5, 16, generator=gen, requires_grad=True)
    got = fastpath.attention_repeated_kv(q, k, v, is_causal=True, repeats=2)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected = F.scaled_dot_product_attention(q, repeated(k, 2), repeated(v, 2), is_causal=True)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def test_llama_gqa_forward_runs_unrepeated_and_the_graph_keeps_the_repeat(llama):
    model, (ids,) = llama
    compiled = surgeon.compile(model, (ids,), lora_spec(["*.q_proj", "*.v_proj"]))
    randomize_adapters(compiled.module)
    gm = compiled.module
    attentions = gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    expands = gm.graph.find_nodes(op="call_function", target=aten.expand.default)
    before = (len(attentions), len(expands))
    assert len(attentions) == 2                       # before: two layers, each attention over repeated k, v
    assert len(fastpath._repeated_kv_attentions(gm.graph)) == 2
    assert gm.code.count("attention_repeated_kv(") == 2 and "repeats = 2" in gm.code      # after
    with torch.no_grad():
        fast = gm(ids)
        other = torch.randint(0, 128, (3, 5))
        fast_other = gm(other)
        gm.recompile()                                 # torch's own code generation: the repeats run
        assert "attention_repeated_kv" not in gm.code
        slow, slow_other = gm(ids), gm(other)
    fastpath.recompile(gm)
    assert torch.equal(fast.logits, slow.logits) and torch.equal(fast_other.logits, slow_other.logits)
    after = (len(gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)),
             len(gm.graph.find_nodes(op="call_function", target=aten.expand.default)))
    assert after == before                            # the canonical graph is unchanged
    # training through the fast forward: gradients reach the adapters as through the repeated one
    loss = gm(ids).logits.square().mean()
    grads = torch.autograd.grad(loss, [p for p in gm.parameters() if p.requires_grad])
    assert all(g.abs().sum() > 0 for g in grads)


def test_generation_graphs_run_unrepeated_and_match_eager(llama):
    model, (ids,) = llama
    compiled = surgeon.compile(model, (ids,), lora_spec(["*.q_proj", "*.k_proj", "*.v_proj"]))
    randomize_adapters(compiled.module)
    module = compiled.module
    prompt = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    tokens = compiled.generate(prompt, max_new_tokens=5, do_sample=False)
    generator = module.meta["surgeon_generator"]
    for graph in generator.graphs.values():
        assert graph.gm.code.count("attention_repeated_kv(") == 2
    ids = prompt
    with torch.no_grad():                             # greedy by hand on the compiled module's full forward
        for _ in range(5):
            ids = torch.cat([ids, module(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ids)


def test_repeats_read_elsewhere_or_unequal_are_left_alone():
    """Only an attention whose key and value are both repeated by one factor, through nodes nothing else
    reads, is generated unrepeated."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            kk = repeated(k, 2)
            vv = repeated(v, 2)
            shared = F.scaled_dot_product_attention(q, kk, vv)
            return shared + kk.mean(), F.scaled_dot_product_attention(q, kk, repeated(v, 2))

    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    gm = torch.export.export(Attention(), (q, k, v)).module()
    assert len(gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)) == 2
    assert fastpath._repeated_kv_attentions(gm.graph) == []     # kk is read three times

    class Plain(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, repeated(k, 2), repeated(v, 2))

    gm = torch.export.export(Plain(), (q, k, v)).module()
    assert [repeats for _, repeats in fastpath._repeated_kv_attentions(gm.graph)] == [2]
