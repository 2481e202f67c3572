"""(IA)^3 (Liu et al. 2022): a learned per-channel scale on a layer's output or input.

`on: output` (default): out = (W x + b) * l, l of size out (the bias is scaled too, as in PEFT);
on a conv2d site l scales the output channels.
`on: input` (PEFT's `feedforward_modules`, e.g. an MLP's down projection): out = W (l * x) + b,
l of size in. l starts at one, and multiplying by one is exact, so insertion is bit-for-bit
the identity. Merge identities: (W x + b) * l == (diag(l) W) x + l * b and W (l * x) ==
(W diag(l)) x; unmerge divides by l (exact up to rounding where l has no zeros).
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, merge_dtype


def _init(opts, in_features, out_features, dtype, gen, weight):
    size = out_features if opts["on"] == "output" else in_features
    return {"ia3_l": torch.ones(size, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    if opts["on"] != "output":
        return y
    scale = params["ia3_l"]
    if branch.conv_geometry is not None:   # a conv's output channels are dim 1: l as (out, 1, 1)
        scale = branch.op(torch.ops.aten.view.default, scale, [-1, 1, 1])
    return branch.mul(y, scale)


def _forward_input(branch, x, params, opts):
    if opts["on"] != "input":
        return x
    if branch.conv_geometry is not None:
        # the kinds see a conv weight as out x (in * kh * kw); a per-input-channel scale would
        # need l over in channels only, which this flattened view cannot express
        raise ValueError("ia3 with `on: input` is not supported on conv2d sites; use `on: output`")
    return branch.mul(x, params["ia3_l"])


def _scaled(params, opts, weight, power: int) -> torch.Tensor:
    """weight * l**power along the scaled axis, minus weight, in merge_dtype(weight)."""
    scale = params["ia3_l"].to(merge_dtype(weight)) ** power
    return torch.mul(weight, scale[:, None] if opts["on"] == "output" else scale[None, :]).sub_(weight)


IA3 = AdapterKind(
    name="ia3",
    options={"on": Option(str, "output", choices=("output", "input"))},
    init=_init,
    forward=_forward,
    forward_input=_forward_input,
    delta_weight=lambda params, opts, weight: _scaled(params, opts, weight, 1),
    undo_delta=lambda params, opts, merged: _scaled(params, opts, merged, -1),
    bias_map=lambda params, opts, bias, undo: (bias * params["ia3_l"].double() ** (-1 if undo else 1)
                                               if opts["on"] == "output" else None),
    param_count=lambda opts, fan_in, fan_out: fan_out if opts["on"] == "output" else fan_in,
    site_ops=("linear", "addmm", "conv2d"),
)
