"""Prefix tuning (Li & Liang 2021): learned key and value prefixes in front of every attention.

A site is an `aten.scaled_dot_product_attention(q, k, v, mask, ...)` call. P_k, P_v have shape
(kv_heads, n, head_dim), sized as PEFT sizes them: when the call's key and value are kv heads
repeated `groups` times (HF's repeat_kv, an unsqueeze -> expand -> reshape, or a
repeat_interleave over the head axis), kv_heads = heads / groups and the graph repeats P the
same way (kv head h serves query heads h*groups .. h*groups + groups - 1); otherwise (no
recognized repeat, or SDPA's own enable_gqa) kv_heads are the key's heads as the call sees them
(the site option `kv_groups` records the factor, 1 there). The call becomes

    sdpa(q, cat([P_k, k], seq), cat([P_v, v], seq), mask')

with P repeated to the call's heads and expanded over batch, and mask' letting every query see
every prefix position: a given mask gets n visible columns in front (True for a boolean mask,
0 for an additive one), and `is_causal=True` becomes an explicit boolean mask [ones(L, n) | tril(ones(L, S))], the same
top-left-aligned causal mask over the original keys. Prefixes start random (N(0, 1), as PEFT's
embedding), so insertion changes the function ("none" check). Nothing folds into a weight:
merge is refused. A PEFT checkpoint names no modules: its layer l goes to the l-th SDPA call
(surgeon.adapters.peft_formats).

`frozen_tokens` f keeps the first f of the n positions out of training (PEFT CARTRIDGE's
num_frozen_tokens, an attention sink): they are separate parameters, prefix_k_frozen and
prefix_v_frozen (kv_heads, f, head_dim), in `frozen`, placed in front of the trained
prefix_k / prefix_v (kv_heads, n - f, head_dim). The function is that of one n-position prefix.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..rules import Pattern, find
from . import AdapterKind, Option

aten = torch.ops.aten
_VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _repeat_groups(node) -> int:
    """g when `node` is a 4-D (B, H, S, D) tensor made by repeating each kv head g times, else 1."""
    if node.target is aten.repeat_interleave.self_int and len(node.args) > 2 and node.args[2] in (1, -3) \
            and isinstance(node.args[1], int) and node.args[1] > 1:
        return node.args[1]
    if node.target not in _VIEWS or not node.args or getattr(node.args[0], "target", None) is not aten.expand.default:
        return 1
    expand = node.args[0]
    unsqueeze = expand.args[0]
    if getattr(unsqueeze, "target", None) is not aten.unsqueeze.default or unsqueeze.args[1] != 2:
        return 1
    wide, out = expand.meta["val"].shape, node.meta["val"].shape
    groups = wide[2] if len(wide) == 5 and len(out) == 4 else None
    if not isinstance(groups, int) or groups < 2 or out[1] != wide[1] * groups or tuple(out[2:]) != tuple(wide[3:]):
        return 1
    return groups


def _site_options(gm, path, weight_target, opts):
    """kv_groups: how many times the call's key and value repeat each kv head (1 when not recognized)."""
    calls = [m.node for m in find(gm, Pattern(("sdpa",), path, params=())) if not m.node.meta.get("surgeon_adapter")]
    key, value = calls[0].args[1:3]
    groups = _repeat_groups(key)
    return {"kv_groups": groups if groups == _repeat_groups(value) else 1}


def _init(opts, heads, head_dim, dtype, gen, weight):
    n, frozen = opts["num_virtual_tokens"], opts.get("frozen_tokens", 0)
    if frozen > n:
        raise ValueError(f"prefix: frozen_tokens={frozen} is more than num_virtual_tokens={n}")
    shape = (heads // opts.get("kv_groups", 1), n, head_dim)
    k, v = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    if not frozen:
        return {"prefix_k": k, "prefix_v": v}
    return {"prefix_k_frozen": k[:, :frozen].clone(), "prefix_v_frozen": v[:, :frozen].clone(),
            "prefix_k": k[:, frozen:].clone(), "prefix_v": v[:, frozen:].clone()}


def _whole(branch, params, name: str):
    """The n-position prefix: the frozen positions (when there are any) in front of the trained ones."""
    if f"{name}_frozen" not in params:
        return params[name]
    return branch.op(aten.cat.default, [params[f"{name}_frozen"], params[name]], 1)


def _size(branch, node, dim: int):
    """A dimension of `node`: an int when static, a sym_size node when symbolic."""
    size = node.meta["val"].shape[dim]
    return size if isinstance(size, int) else branch.op(aten.sym_size.int, node, dim)


def _arg(call, index: int, name: str, default):
    return call.args[index] if len(call.args) > index else call.kwargs.get(name, default)


def _prefixed(branch, prefix, seq, groups: int):
    # (H / g, n, D) -> (H, n, D), each kv head g times in a row -> (B, H, n, D), in front of (B, H, S, D)
    if groups > 1:
        wide = branch.op(aten.expand.default, branch.op(aten.unsqueeze.default, prefix, 1), [-1, groups, -1, -1])
        prefix = branch.op(aten.flatten.using_ints, wide, 0, 1)
    batch = _size(branch, seq, 0)
    expanded = branch.op(aten.expand.default, branch.op(aten.unsqueeze.default, prefix, 0), [batch, -1, -1, -1])
    return branch.op(aten.cat.default, [expanded, seq], 2)


def _padded_mask(branch, mask, keys: fx.Node, n: int):
    # n visible columns in front: True for a boolean mask, 0.0 for an additive one
    val = mask.meta["val"]
    static_keys = keys.meta["val"].shape[-2]
    if val.shape[-1] == 1 and not (isinstance(static_keys, int) and static_keys == 1):   # make the key axis explicit
        mask = branch.op(aten.expand.default, mask, [*[-1] * (val.dim() - 1), _size(branch, keys, -2)])
    return branch.op(aten.constant_pad_nd.default, mask, [n, 0], True if val.dtype == torch.bool else 0.0)


def _causal_mask(branch, query, key, n: int):
    # [ones(L, n) | tril(ones(L, S))]: the prefix is visible to all, causal (top-left) over the rest
    length, keys = _size(branch, query, -2), _size(branch, key, -2)
    causal = branch.op(aten.tril.default, branch.op(aten.new_ones.default, query, [length, keys], dtype=torch.bool))
    visible = branch.op(aten.new_ones.default, query, [length, n], dtype=torch.bool)
    return branch.op(aten.cat.default, [visible, causal], -1)


def _forward_input(branch, call, params, opts):
    """The SDPA call's changed arguments: prefixed key and value, and a mask that shows the prefix."""
    query, key, value = call.args[:3]
    n = opts["num_virtual_tokens"]
    groups = opts.get("kv_groups", 1)
    changes = {"key": _prefixed(branch, _whole(branch, params, "prefix_k"), key, groups),
               "value": _prefixed(branch, _whole(branch, params, "prefix_v"), value, groups)}
    mask = _arg(call, 3, "attn_mask", None)
    if _arg(call, 5, "is_causal", False):
        if mask is not None:
            raise ValueError("an SDPA call with both attn_mask and is_causal=True")   # SDPA itself refuses it
        changes.update(attn_mask=_causal_mask(branch, query, key, n), is_causal=False)
    elif mask is not None:
        changes["attn_mask"] = _padded_mask(branch, mask, key, n)
    return changes


PREFIX = AdapterKind(
    name="prefix",
    options={"num_virtual_tokens": Option(int, 8, positive=True),
             "frozen_tokens": Option(int, 0, bounds=(0, float("inf")))},
    init=_init,
    forward=None,
    forward_input=_forward_input,
    delta_weight=None,
    refuse_merge="prefix tuning adds attention positions (learned keys and values), not a weight delta; "
                 "there is nothing to fold into a base weight",
    param_count=lambda opts, heads, head_dim: 2 * (opts["num_virtual_tokens"] - opts.get("frozen_tokens", 0))
    * (heads // opts.get("kv_groups", 1)) * head_dim,
    init_check=lambda opts: "none",
    site_options=_site_options,
    site_ops=("sdpa",),
    frozen=frozenset({"prefix_k_frozen", "prefix_v_frozen"}),
)
