"""Adaption prompt (LLaMA-Adapter, Zhang et al. 2023): a gated attention over learned prompt tokens.

A site is an attention module's `aten.scaled_dot_product_attention(q, k, v, ...)` call, with q of
shape (B, H, L, D) after RoPE. It trains a prompt P (1, n, hidden) and a gate g (1,). The prompt
goes through the module's own key and value projections (its `k_proj` and `v_proj` linears, bias
included; no RoPE on the prompt keys), which give kv heads that are repeated for the H query heads
as HF's repeat_kv does (kv head h serves query heads h*G .. h*G + G - 1, G = H / kv_heads). Every
query attends to all n prompt positions, with no mask:

    A = g * softmax(q P_k^T / sqrt(D)),   out = sdpa(q, k, v, ...) + A P_v

the softmax taken in float32 and cast back to q's dtype, as PEFT's AdaptedAttention does. The sum
flows on into the module's `o_proj`, so the prompt's output is projected by it, as PEFT projects it
(PEFT calls o_proj on the prompt's output separately and adds; the two agree because an o_proj
without a bias is linear; an o_proj with a bias is refused: PEFT adds that bias a second time, so
its adapter would not start as the identity). Since q is the call's own (rotated) query, a KV-cache
decode step attends the prompt from the new token's position, as PEFT recomputes it per step.

Init: P ~ N(0, 1) (PEFT's normal_), g = 0: the branch adds exact zeros, the identity bit for bit. A
site trains n * hidden + 1 parameters. Nothing folds into a weight (an attention over learned
tokens depends on the query): merge is refused.

The projections are found by name, as PEFT finds them: linears at `<site>.k_proj`, `<site>.v_proj`
and `<site>.o_proj` (LLaMA's and Mistral's attention, the model types PEFT's LLaMA form serves). An
attention without them (GPT-2's fused c_attn, whose PEFT form adds the prompt's output after c_proj,
unprojected, is not implemented) is refused with a SpecError. PEFT's `adapter_layers` (the top L
attention modules) is the targets here; the site option `layer_from_top` (0: the last attention
call in the graph) lets the PEFT export check that the sites are the top L, as PEFT will place them.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..errors import SpecError
from ..rules import Pattern
from . import AdapterKind, Option, aten

PROJECTIONS = ("k_proj", "v_proj", "o_proj")


def _linear(graph: fx.Graph, path: str, name: str) -> fx.Node | None:
    """The base linear of `<path>.<name>` (not an adapter's own), or None."""
    pattern = Pattern(("linear",), f"{path}.{name}", params=())
    return next((n for n in graph.nodes if pattern.match(n) is not None and not n.meta.get("surgeon_adapter")), None)


def _arg(node: fx.Node, index: int):
    return node.args[index] if len(node.args) > index else node.kwargs.get("bias")


def _refuse(path: str, message: str) -> SpecError:
    return SpecError(f"adaption_prompt @ {path}", message)


def _site_options(gm, path, weight_target, opts):
    """hidden: the prompt's width (k_proj's in_features); layer_from_top: 0 for the graph's last SDPA call."""
    calls = [n for n in gm.graph.nodes if Pattern(("sdpa",), params=()).match(n) is not None
             and not n.meta.get("surgeon_adapter")]
    mine = [i for i, n in enumerate(calls) if n.meta.get("surgeon_path") == path]
    found = {name: _linear(gm.graph, path, name) for name in PROJECTIONS}
    missing = [name for name, node in found.items() if node is None]
    if missing:
        raise _refuse(path, f"adaption_prompt follows PEFT's LLaMA / Mistral attention: it needs linears "
                            f"{', '.join(f'{path}.{m}' for m in PROJECTIONS)}, and '{path}' has no "
                            f"{', '.join(missing)} (PEFT's GPT-2 form, a fused c_attn whose prompt output skips "
                            "c_proj, and other architectures are not supported)")
    if _arg(found["o_proj"], 2) is not None:
        raise _refuse(path, f"'{path}.o_proj' has a bias: PEFT passes the prompt's output through o_proj bias "
                            "included, adding the bias twice, so its adapter is no identity at insert; surgeon "
                            "does not reproduce that")
    query = calls[mine[0]].args[0].meta["val"]
    heads, head_dim = int(query.shape[1]), int(query.shape[3])
    k_weight, v_weight = (found[n].args[1].meta["val"] for n in ("k_proj", "v_proj"))
    if k_weight.shape != v_weight.shape or k_weight.shape[0] % head_dim \
            or heads % (k_weight.shape[0] // head_dim):
        raise _refuse(path, f"k_proj {list(k_weight.shape)} and v_proj {list(v_weight.shape)} do not give kv heads "
                            f"of head_dim {head_dim} that divide the query's {heads} heads")
    return {"hidden": int(k_weight.shape[1]), "layer_from_top": len(calls) - 1 - mine[0]}


def _init(opts, heads, head_dim, dtype, gen, weight):
    n, hidden = opts["adapter_len"], opts["hidden"]
    return {"adaption_prompt": torch.randn((1, n, hidden), generator=gen).to(dtype),
            "adaption_gate": torch.zeros(1, dtype=dtype)}


def _heads(branch, projected: fx.Node, kv_heads: int, groups: int, head_dim: int) -> fx.Node:
    """(1, n, kv_heads * D) -> (H, n, D): per kv head, repeated `groups` times in a row."""
    per_head = branch.op(aten.view.default, projected, [-1, kv_heads, head_dim])
    per_head = branch.op(aten.transpose.int, per_head, 0, 1)   # (kv, n, D)
    if groups == 1:
        return per_head
    wide = branch.op(aten.expand.default, branch.op(aten.unsqueeze.default, per_head, 1), [-1, groups, -1, -1])
    return branch.op(aten.flatten.using_ints, wide, 0, 1)


def _forward(branch, x, y, params, opts):
    """y + g * softmax(q P_k^T / sqrt(D)) P_v at the SDPA call y (q: its query)."""
    call, graph = y, branch.graph
    query = call.args[0]
    _, heads, _, head_dim = query.meta["val"].shape
    k_lin, v_lin = _linear(graph, branch.path, "k_proj"), _linear(graph, branch.path, "v_proj")
    kv_heads = k_lin.args[1].meta["val"].shape[0] // head_dim
    groups = heads // kv_heads
    prompt = params["adaption_prompt"]
    keys = _heads(branch, branch.op(aten.linear.default, prompt, k_lin.args[1], _arg(k_lin, 2)), kv_heads, groups,
                  head_dim)
    values = _heads(branch, branch.op(aten.linear.default, prompt, v_lin.args[1], _arg(v_lin, 2)), kv_heads, groups,
                    head_dim)
    dtype = query.meta["val"].dtype
    scores = branch.op(aten.matmul.default, query, branch.op(aten.transpose.int, keys, 1, 2))   # (B, H, L, n)
    scores = branch.op(aten.div.Tensor, scores, math.sqrt(head_dim))
    if dtype != torch.float32:
        scores = branch.op(aten._to_copy.default, scores, dtype=torch.float32)
    weights = branch.op(aten._softmax.default, scores, -1, False)
    if dtype != torch.float32:
        weights = branch.op(aten._to_copy.default, weights, dtype=dtype)
    gated = branch.mul(params["adaption_gate"], weights)
    return branch.add(y, branch.op(aten.matmul.default, gated, values))


ADAPTION_PROMPT = AdapterKind(
    name="adaption_prompt",
    options={"adapter_len": Option(int, 10, positive=True)},
    init=_init,
    forward=_forward,
    delta_weight=None,
    refuse_merge="an adaption prompt is an attention over learned tokens, which depends on each query; it is "
                 "not a weight delta, so there is nothing to fold into a base weight",
    param_count=lambda opts, heads, head_dim: opts["adapter_len"] * opts["hidden"] + 1,
    init_check=lambda opts: "exact",
    site_options=_site_options,
    site_ops=("sdpa",),
)
