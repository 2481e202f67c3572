"""Parallel adapter (He et al. 2022): y = W x + b + s * U act(D x), beside the targeted linear op.

D (rank x in, `adapter_down`) starts kaiming-uniform and U (out x rank, `adapter_up`) at zero, so
the branch adds exactly zero and insertion is bit for bit the identity. `activation` is relu,
gelu, silu or none; `scale` is s. A site costs rank * (in + out) parameters.

Merge: with `activation: none` the branch is linear, W x + s U D x == (W + s U D) x, exact; with
a nonlinearity no weight reproduces it, so the merge is refused (`merge_refusal`) with that
reason. ACTIVATIONS and activate() are shared with the serial (bottleneck) adapter.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from . import AdapterKind, Option, aten, merge_dtype
from .lora import kaiming_uniform

ACTIVATIONS = {"relu": aten.relu.default, "gelu": aten.gelu.default, "silu": aten.silu.default, "none": None}


def activate(branch, h, opts: dict):
    """act(h) as one graph node, or h itself for `activation: none`."""
    op = ACTIVATIONS[opts["activation"]]
    return h if op is None else branch.op(op, h)


def nonlinear_refusal(opts: dict) -> str:
    """The merge refusal of a bottleneck branch with a nonlinearity ("" when it is linear)."""
    if opts["activation"] == "none":
        return ""
    return (f"its branch applies {opts['activation']} between the down and up projections, and no "
            f"weight W' gives W' x for a nonlinear function of x (use activation: none to merge)")


def branch_params(opts, down_in: int, out_features: int, dtype, gen) -> dict:
    """D (rank x down_in, kaiming-uniform) and U (out x rank, zero: the branch starts as the identity)."""
    rank = opts["rank"]
    return {"adapter_down": kaiming_uniform((rank, down_in), gen).to(dtype),
            "adapter_up": torch.zeros(out_features, rank, dtype=dtype)}


def branch_update(branch, source, y, params, opts):
    """y + s * U act(D source): two skinny GEMMs around the activation, one add with alpha = s."""
    hidden = activate(branch, branch.linear(source, params["adapter_down"]), opts)
    return branch.add(y, branch.linear(hidden, params["adapter_up"]), alpha=opts["scale"])


def _init(opts, in_features, out_features, dtype, gen, weight):
    return branch_params(opts, in_features, out_features, dtype, gen)


def _forward(branch, x, y, params, opts):
    return branch_update(branch, x, y, params, opts)   # parallel: the branch reads the layer's input


def _delta(params, opts, weight=None):
    """s * U @ D in merge_dtype(weight) (only for activation: none)."""
    if nonlinear_refusal(opts):
        raise SpecError("parallel-adapter", f"cannot merge: {nonlinear_refusal(opts)}")
    dtype = merge_dtype(weight)
    return (params["adapter_up"].to(dtype) @ params["adapter_down"].to(dtype)).mul_(opts["scale"])


PARALLEL_OPTIONS = {
    "rank": Option(int, 8, positive=True),
    "activation": Option(str, "relu", choices=tuple(ACTIVATIONS)),
    "scale": Option((int, float), 1.0),
}

PARALLEL_ADAPTER = AdapterKind(
    name="parallel-adapter",
    options=PARALLEL_OPTIONS,
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out),
    merge_refusal=nonlinear_refusal,
)
