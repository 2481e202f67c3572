"""Run the canonical graph through torch's direct Python bindings.

The canonical graph names aten overloads (`torch.ops.aten.linear.default`), which passes match
on. Calling an overload goes through OpOverload.__call__ and a schema-driven argument parser:
measured here 1.2-1.6 us more per call than the generated bindings (`torch._C._nn.linear`,
`torch.add`) at decode sizes, about 8% of a small LLaMA's forward. `recompile` generates the
forward with each overload that has an exact binding swapped for it, then puts the overloads
back on the nodes: the graph stays canonical, only the generated code differs.

Every entry is the same kernel with the same argument names and order; only positional and
keyword forms that both accept are emitted by export, so results are bit-identical.

Grouped-query attention is generated without its copies. Models with fewer key/value heads than
query heads (LLaMA-GQA, Mistral, Qwen2, ...) repeat each key and value head before attention,
`unsqueeze(kv, 2) -> expand(b, kv_heads, n, s, d) -> reshape(b, kv_heads * n, s, d)`: a copy of
the whole cache per layer and call. Where both of an attention's key and value come that way, the
generated forward calls `attention_repeated_kv` on the unrepeated tensors instead, which hands
them to attention with `enable_gqa=True` where that is the same computation (CPU, no dropout, no
gradient to carry: checked bit for bit over dtypes, masks, lengths and head counts,
tests/test_fastpath.py) and repeats them as the graph says otherwise. Measured on this CPU (one
thread, 8 query / 4 key-value heads, head dim 64, 192 cached positions): 44 -> 18 us per
attention at batch 1, 246 -> 119 us at batch 8. The graph itself keeps the repeat (passes match it:
GQA groups for co-permute); only the generated code differs.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

aten = torch.ops.aten

# overload -> binding with the same schema (same kernel, same argument order and keywords)
BINDINGS = {
    aten.linear.default: torch._C._nn.linear,
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.neg.default: torch.neg,
    aten.rsqrt.default: torch.rsqrt,
    aten.pow.Tensor_Scalar: torch.pow,
    aten.mean.dim: torch.mean,
    aten.cat.default: torch.cat,
    aten.silu.default: torch._C._nn.silu,
    aten.gelu.default: torch._C._nn.gelu,
    aten.relu.default: torch.relu,
    aten.tanh.default: torch.tanh,
    aten.cos.default: torch.cos,
    aten.sin.default: torch.sin,
    aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.reshape.default: torch.reshape,
    aten.view.default: torch.Tensor.view,
    aten.matmul.default: torch.matmul,
    aten.addmm.default: torch.addmm,
    aten.embedding.default: torch.embedding,
    aten.scaled_dot_product_attention.default: torch._C._nn.scaled_dot_product_attention,
    aten.layer_norm.default: torch.layer_norm,
    aten.conv2d.default: torch.conv2d,
}


def recompile(gm: fx.GraphModule) -> None:
    """gm.recompile(), generating calls to the direct bindings and unrepeated GQA attention (the graph
    keeps its overloads and its repeats: the code is generated from a rewritten copy where needed)."""
    graph = gm.graph
    if _repeated_kv_attentions(graph):
        graph = copy.deepcopy(graph)
        for attention, repeats in _repeated_kv_attentions(graph):
            _unrepeat(graph, attention, repeats)
    swapped = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in BINDINGS:
            swapped.append((node, node.target))
            node.target = BINDINGS[node.target]
    canonical = gm._graph
    gm._graph = graph
    try:
        gm.recompile()
    finally:
        gm._graph = canonical
        for node, target in swapped:
            node.target = target


def attention_repeated_kv(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *,
                          repeats: int):
    """scaled_dot_product_attention(query, repeat(key), repeat(value), ...), where repeat puts each of the
    `repeats` copies of a head next to each other (dim 1: kv_heads -> kv_heads * repeats), as the graph's
    unsqueeze/expand/reshape does. `enable_gqa=True` reads head h's key and value from head h // repeats
    in place, without the copies; it is used where it computes the same bits (see the module docstring)."""
    if (query.device.type == "cpu" and not dropout_p
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))):
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True)
    return _sdpa(query, _repeat(key, repeats), _repeat(value, repeats), attn_mask, dropout_p, is_causal,
                 scale=scale)


_sdpa = torch._C._nn.scaled_dot_product_attention


def _repeat(kv: torch.Tensor, repeats: int) -> torch.Tensor:
    batch, heads, length, dim = kv.shape
    return kv.unsqueeze(2).expand(batch, heads, repeats, length, dim).reshape(batch, heads * repeats, length, dim)


def _repeated_kv_attentions(graph: fx.Graph) -> list[tuple[fx.Node, int]]:
    """(attention node, repeats) for each SDPA whose key and value are both repeated by the same factor,
    through nodes that nothing else reads."""
    found = []
    for node in graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        if len(node.args) < 3 or node.kwargs.get("enable_gqa"):
            continue
        repeats = {_repeat_source(node.args[1]), _repeat_source(node.args[2])}
        if len(repeats) == 1 and None not in repeats:
            (source,) = repeats
            found.append((node, source))
    return found


def _repeat_source(node) -> int | None:
    """The repeat factor when `node` is reshape(expand(unsqueeze(kv, 2), [b, h, n, s, d]), [b, h * n, s, d])
    of a 4-D kv, each step read only by the next; else None."""
    if not (isinstance(node, fx.Node) and node.target in (aten.reshape.default, aten.view.default)
            and len(node.users) == 1):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default and len(expand.users) == 1):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target == aten.unsqueeze.default
            and unsqueeze.args[1] == 2 and len(unsqueeze.users) == 1):
        return None
    kv, before = unsqueeze.args[0], _shape(unsqueeze.args[0])
    after, expanded = _shape(node), _shape(expand)
    if before is None or after is None or expanded is None or len(before) != 4 or len(expanded) != 5:
        return None
    repeats = expanded[2]
    if not isinstance(repeats, int) or repeats < 2 or not isinstance(kv, fx.Node):
        return None
    same = all(_same(a, b) for a, b in zip((before[0], before[1], before[2], before[3]),
                                           (expanded[0], expanded[1], expanded[3], expanded[4])))
    if not same or not _same(after[1], before[1] * repeats) or not _same(after[0], before[0]) \
            or not all(_same(a, b) for a, b in zip(after[2:], before[2:])):
        return None
    return repeats


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    """Sizes equal, concrete or symbolic (a SymInt compared to another gives a guard-free answer here only
    when both are the same expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return False


def _unrepeat(graph: fx.Graph, attention: fx.Node, repeats: int) -> None:
    """Make `attention` call attention_repeated_kv on the unrepeated key and value; drop the repeats."""
    chains = [attention.args[1], attention.args[2]]
    sources = [chain.args[0].args[0].args[0] for chain in chains]
    attention.target = attention_repeated_kv
    attention.args = (attention.args[0], *sources, *attention.args[3:])
    attention.kwargs = {**attention.kwargs, "repeats": repeats}
    for reshape in chains:
        expand = reshape.args[0]
        unsqueeze = expand.args[0]
        for node in (reshape, expand, unsqueeze):
            graph.erase_node(node)
