"""delta: a full dense weight update per site, y = W x + D x (+ d), with D (out x in).

The result kind of `combine` when no rank is asked for: it stores a combined delta weight
as it is, so a merge is exact (W x + D x == (W + D) x). It starts at D = 0, so an inserted
delta adapter leaves the function unchanged. It costs in*out parameters per site, as many as
the base weight, so it is meant as an intermediate form (merge it, or re-factorize with rank).

With `bias: true` a site also holds a bias delta d (`delta_bias`, out, zero at init), added to
the output; the merge adds it to the base bias (bias_map: b + d, unmerge b' - d). `combine` sets
it where an input's merge changes the base bias (IA3's output scale, RoAd, lora_bias, BEFT ...),
so the combined adapter merges to what merging the inputs gives. A site without a base bias has
nowhere to put d, so there the merge is refused (`biased`, read from the graph at insertion).
"""
from __future__ import annotations

import torch

from ..rules import Pattern
from . import AdapterKind, Option, merge_dtype


def _init(opts: dict, in_features: int, out_features: int, dtype: torch.dtype, gen: torch.Generator,
          weight: torch.Tensor | None = None):
    tensors = {"delta": torch.zeros(out_features, in_features, dtype=dtype)}
    if opts.get("bias"):
        tensors["delta_bias"] = torch.zeros(out_features, dtype=dtype)
    return tensors


def _forward(branch, x, y, params, opts):
    # y + D x: one GEMM against the stored delta and one add (and d, with `bias`)
    out = branch.op(torch.ops.aten.add.Tensor, y, branch.linear(x, params["delta"]))
    return branch.add(out, params["delta_bias"]) if "delta_bias" in params else out


def _delta_weight(params, opts, weight=None):
    # D in merge_dtype(weight), as the merge adds it to the base weight (D does not depend on W)
    return params["delta"].to(merge_dtype(weight))


def _bias_map(params, opts, bias, undo):
    """b + d (undo: b' - d), float64; None without a bias delta."""
    if "delta_bias" not in params:
        return None
    return bias + (-1.0 if undo else 1.0) * params["delta_bias"].double().to(bias.device).reshape(bias.shape)


def _site_options(gm, path, weight_target, opts):
    """With `bias`: whether every call of the site's weight adds a base bias for d to merge into."""
    if not opts.get("bias"):
        return {}
    pattern = Pattern(("linear", "addmm"), path)
    calls = [m for ref in gm.graph.find_nodes(op="get_attr", target=weight_target) for u in ref.users
             if (m := pattern.match(u)) is not None]
    return {"biased": bool(calls) and all(m["bias"] is not None for m in calls)}


def _merge_refusal(opts):
    if opts.get("bias") and opts.get("biased") is False:
        return "its bias delta needs a bias in the base layer to merge into, which the layer has not"
    return ""


DELTA = AdapterKind(
    name="delta",
    options={"bias": Option(bool, False),     # a bias delta d beside D (combine sets it where one is needed)
             "biased": Option(bool, None)},   # per site with `bias`, read from the graph (whether the base has one)
    init=_init,
    forward=_forward,
    delta_weight=_delta_weight,
    bias_map=_bias_map,
    param_count=lambda opts, fan_in, fan_out: fan_in * fan_out + (fan_out if opts.get("bias") else 0),
    merge_refusal=_merge_refusal,
    site_options=_site_options,
)
