"""DoRA (Liu et al. 2024): y = m / ||W + s B A||_row * (W + s B A) x + b.

The LoRA-updated weight V = W + s B A is split into a direction (each output row of V over
its L2 norm, PEFT's convention: norm over the input axis of the out x in weight) and a trained
magnitude m (one per output, initialized to ||W||_row). As in the paper (section 4.3) and PEFT,
the norm is detached: it scales the output but takes no gradient. Graph form, with y = W x + b:

    g = m / ||V||_row;   out = y + (g - 1) (y - b) + g s B A x

At init B = 0, so V == W, g == 1 exactly and out == y bit for bit. Merge writes
W' = g[:, None] * V. Unmerge is refused: W' does not determine ||V|| (PEFT keeps it in a cache).

With `dropout` (PEFT's lora_dropout), PEFT's DoRA in train mode drops x once and recomputes the base
term from it: out = y + (g - 1) W x_d + g s B A x_d with x_d = dropout(x); in eval it is the form
above (surgeon.modes.dora_base picks the base term by the module's mode at run time).
"""
from __future__ import annotations

import torch

from ..modes import dora_base
from . import AdapterKind, Option, aten, merge_dtype
from .lora import LORA_OPTIONS, lora_delta, lora_init, lora_scale


def _updated_norm(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float) -> torch.Tensor:
    # the same ops the graph runs, so that the init magnitude equals the forward's norm bit for bit
    updated = torch.add(weight, lora_B.to(weight.device) @ lora_A.to(weight.device), alpha=scale)
    return torch.linalg.vector_norm(updated, 2, dim=1)


def _init(opts, in_features, out_features, dtype, gen, weight):
    params = lora_init(opts, in_features, out_features, dtype, gen, weight)
    magnitude = _updated_norm(weight, params["lora_B"].to(weight.dtype), params["lora_A"].to(weight.dtype),
                              lora_scale(opts))
    return {**params, "lora_magnitude": magnitude.to(dtype)}


def _forward(branch, x, y, params, opts):
    scale = lora_scale(opts)
    lora_BA = branch.mm(params["lora_B"], params["lora_A"])
    weight = branch.base_weight()
    updated = branch.add(weight, lora_BA, alpha=scale)
    norm = branch.op(aten.detach.default, branch.op(aten.linalg_vector_norm.default, updated, 2, [1]))
    gain = branch.op(aten.div.Tensor, params["lora_magnitude"], norm)
    p = opts.get("dropout", 0.0)
    x = branch.dropout(x, p)
    if p:   # PEFT: W dropout(x) in train mode, y - b in eval
        base = branch.when_training(dora_base, x, weight, y, branch.bias, like=y)
    else:
        base = y if branch.bias is None else branch.op(aten.sub.Tensor, y, branch.bias)
    lora = branch.linear(branch.linear(x, params["lora_A"]), params["lora_B"])
    rescaled = branch.mul(branch.op(aten.sub.Tensor, gain, 1), base)
    return branch.add(branch.add(y, rescaled), branch.mul(gain, lora), alpha=scale)


def _delta(params, opts, weight):
    """m / ||W + s B A||_row (W + s B A) - W, in merge_dtype(weight)."""
    dtype = merge_dtype(weight)
    updated = lora_delta(params, opts, weight).add_(weight)
    gain = params["lora_magnitude"].to(dtype) / torch.linalg.vector_norm(updated, 2, dim=1)
    return updated.mul_(gain[:, None]).sub_(weight)


DORA = AdapterKind(
    name="dora",
    options={**LORA_OPTIONS, "init": Option(str, "default", choices=("default", "gaussian"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out) + fan_out,
    refuse_unmerge="a merged DoRA weight no longer holds the row norms of W + s B A needed to undo it",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
