"""BEFT (PEFT's `beft`, Bias-Efficient Fine-Tuning): y = W x + b + Δb, a trained bias on a layer's output.

A site trains one vector Δb (`beft_bias`, out; PEFT saves it as 1 x out). Init (PEFT's init_weights):
`default` sets Δb = 0, so y + 0 == y and insertion is the identity bit for bit; `random` draws Δb from
N(0, 1), as PEFT's init_weights=False does, and changes the function.

Merge identity: W x + b + Δb == W x + (b + Δb). The weight is untouched (the delta is zero) and the
base bias becomes b + Δb (bias_map); unmerge subtracts Δb again. A layer without a bias has nowhere to
put Δb, so there the merge is refused, as PEFT refuses it; whether a site has one (`biased`) is read
from the graph at insertion. Linear and GPT-2 Conv1D sites (PEFT: nn.Linear only). A site costs out
parameters.
"""
from __future__ import annotations

import torch

from ..rules import Pattern
from . import AdapterKind, Option, merge_dtype


def _init(opts, in_features, out_features, dtype, gen, weight):
    bias = torch.randn(out_features, generator=gen) if opts["init"] == "random" else torch.zeros(out_features)
    return {"beft_bias": bias.to(dtype)}


def _forward(branch, x, y, params, opts):
    return branch.add(y, params["beft_bias"])   # Δb broadcasts over the last (output) dim


def _delta(params, opts, weight):
    """Zero: BEFT changes only the bias."""
    return torch.zeros(weight.shape, dtype=merge_dtype(weight), device=weight.device)


def _bias_map(params, opts, bias, undo):
    """b + Δb (undo: b' - Δb), float64."""
    return bias + (-1.0 if undo else 1.0) * params["beft_bias"].double().to(bias.device).reshape(bias.shape)


def _site_options(gm, path, weight_target, opts):
    """`biased`: whether every call of the site's weight adds a base bias for Δb to merge into."""
    pattern = Pattern(("linear", "addmm"), path)
    calls = [m for ref in gm.graph.find_nodes(op="get_attr", target=weight_target) for u in ref.users
             if (m := pattern.match(u)) is not None]
    return {"biased": bool(calls) and all(m["bias"] is not None for m in calls)}


def _merge_refusal(opts):
    if opts.get("biased") is False:
        return "its bias Δb needs a bias in the base layer to merge into, which the layer has not (PEFT refuses too)"
    if opts.get("biased") is None:
        return ("it is not known whether the adapter's layers have a bias for Δb to merge into; insert it into the "
                "model and merge there")
    return ""


BEFT = AdapterKind(
    name="beft",
    options={"init": Option(str, "default", choices=("default", "random")),
             "biased": Option(bool, None)},   # per site, read from the graph (whether the base has a bias)
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    bias_map=_bias_map,
    param_count=lambda opts, fan_in, fan_out: fan_out,
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    merge_refusal=_merge_refusal,
    site_options=_site_options,
    rank_limit=lambda opts, fan_in, fan_out: None,   # no rank
)
