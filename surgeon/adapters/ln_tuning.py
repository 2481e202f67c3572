"""LN tuning (Zhao et al. 2023): train a copy of each targeted norm's weight and bias, nothing else.

A site is one parameter of a norm module (adapter_ops' "norm" weight site: a module whose
parameters are all 1-D, so a LayerNorm gives two sites, weight and bias, and an RMSNorm one).
The adapter holds `ln_tuning`, a trained copy of that parameter, and `ln_tuning_original`, the
parameter as it was at insert (frozen; PEFT keeps the base module beside its copy the same way
and does not save it, so a PEFT import recomputes it from the base). The forward replaces the
parameter by the copy for every op that reads it: aten.layer_norm's weight / bias, or the
`weight * x` of HF's RMSNorm decomposition, so the norm's math is never rewritten.

Init: the copy equals the parameter, so insertion is exact bit for bit. A site trains n
parameters (the parameter's size).

Merge writes the copy into the base: ΔW = copy - original, built in float64, where the difference
of two values of a float32 / bf16 / fp16 parameter is exact (or off by far below the parameter's
own rounding), so W + ΔW rounds back to the copy bit for bit. ΔW does not depend on the weight it
lands on, so unmerge subtracts it and gives the original back, as PEFT's unmerge (a module swap) does.
"""
from __future__ import annotations

from . import AdapterKind


def _init(opts, in_features, out_features, dtype, gen, weight):
    # a weight site's 1-D parameter arrives as n (or, for a shape check, as an n x 1 meta weight)
    original = weight.detach().reshape(out_features).to(dtype)
    return {"ln_tuning": original.clone(), "ln_tuning_original": original.clone()}


def _forward(branch, x, weight, params, opts):
    return params["ln_tuning"]   # the copy stands in for the parameter wherever it is read


def _delta(params, opts, weight):
    """copy - original in float64 (exact: see the module docstring), on the weight's device."""
    delta = params["ln_tuning"].double() - params["ln_tuning_original"].double()
    return delta if weight is None else delta.to(weight.device)


LN_TUNING = AdapterKind(
    name="ln_tuning",
    options={},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: fan_out,
    frozen=frozenset({"ln_tuning_original"}),
    recomputed=frozenset({"ln_tuning_original"}),
    site_ops=("norm",),
    rank_limit=lambda opts, fan_in, fan_out: None,
)
