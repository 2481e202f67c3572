"""Super-Tuning (PEFT's `supertuning`): y = W x + b + S x (+ s B A x), S sparse on a magnitude-chosen support.

S is zero except at k = int(out * in * (1 - sparsity)) fixed entries of the out x in weight (at least
one, else the site is refused), the k largest |W| entries (`select_top`, the paper's Super) or the k
smallest (`select_top: false`, its "-bottom" variants), picked from the site's base weight at insert.
The trained values (`supertuning_values`, k) sit at `supertuning_indices`: k int64 flat positions
r * in + c into the row-major out x in weight, kept in topk's order (largest first), which is PEFT's
layout (its checkpoint stores them as int32); frozen and saved with the adapter, so a loaded adapter
keeps its support and is never re-scored. A PEFT checkpoint saved with save_precomputed_indices=False
holds none: they are recomputed from the weight the adapter is inserted on, as PEFT recomputes them
when it loads (the same topk, so the same support on the same base weight).

With `rank` set (the paper's Supra hybrid) a LoRA part adds s B A x: A (r x in), B (out x r),
s = alpha / r with alpha defaulting to 2 r (PEFT's default); `dropout` (PEFT's lora_dropout) drops the
input of that LoRA part only, in train mode.

Init (PEFT's init_weights): `default` sets the values and B to zero, so S = 0, B A = 0 and insertion
is the identity bit for bit; `random` draws the values from N(0, 1) and B kaiming-uniform, as PEFT's
init_weights=False does, and changes the function. A is kaiming-uniform in both.

Forward: S x without a dense S (RoSA's gather/scatter): the k inputs S reads are gathered, scaled by
the values and index_add-ed into their output rows, O(tokens * k). A repeated position would add up,
as PEFT's scatter_add does. Merge identity: W x + S x + s B A x == (W + S + s B A) x, exact (built in
merge_dtype); unmerge subtracts the same. A site costs k (+ r (in + out)) parameters.

This is no SHiRA: SHiRA sizes k as r (in + out) or a rounded fraction, keeps (row, column) pairs sorted
row-major and has no bottom selection and no LoRA part, so the two share only the idea.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, merge_dtype
from .lora import kaiming_uniform


def support_size(sparsity: float, fan_in: int, fan_out: int) -> int:
    """k, the trained entries of an out x in weight at this sparsity (PEFT's int(n * (1 - sparsity)))."""
    return int(fan_in * fan_out * (1 - sparsity))


def lora_scale(opts: dict) -> float:
    """alpha / r, alpha defaulting to 2 r (PEFT's SupertuningConfig)."""
    alpha = opts["alpha"] if opts["alpha"] is not None else 2 * opts["rank"]
    return alpha / opts["rank"]


def _init(opts, in_features, out_features, dtype, gen, weight):
    sparsity, count = opts["sparsity"], support_size(opts["sparsity"], in_features, out_features)
    if sparsity >= 1:
        raise ValueError(f"supertuning: sparsity must be in [0, 1), got {sparsity}")
    if count < 1:
        raise ValueError(f"supertuning: sparsity {sparsity} leaves no trainable entry of a {out_features} x "
                         f"{in_features} weight; lower it")
    # topk of |W| on the weight's device (meta too: a loaded adapter's shape check calls init)
    indices = torch.topk(weight.detach().abs().flatten(), count, largest=opts["select_top"]).indices
    random = opts["init"] == "random"
    params = {"supertuning_values": (torch.randn(count, generator=gen) if random else torch.zeros(count)).to(dtype),
              "supertuning_indices": indices.long()}
    if opts["rank"] is not None:
        rank = opts["rank"]
        B = kaiming_uniform((out_features, rank), gen) if random else torch.zeros(out_features, rank)
        params.update(supertuning_A=kaiming_uniform((rank, in_features), gen).to(dtype), supertuning_B=B.to(dtype))
    return params


def _forward(branch, x, y, params, opts):
    if opts["rank"] is not None:   # y + s B A dropout(x)
        low_rank = branch.linear(branch.linear(branch.dropout(x, opts["dropout"]), params["supertuning_A"]),
                                 params["supertuning_B"])
        y = branch.add(y, low_rank, alpha=lora_scale(opts))
    # (S x)[.., r] = sum over the support's flat positions p = r * in + c of value * x[.., c]
    flat = params["supertuning_indices"]
    rows = branch.op(aten.div.Scalar_mode, flat, branch.in_features, rounding_mode="floor")
    cols = branch.op(aten.remainder.Scalar, flat, branch.in_features)
    picked = branch.mul(branch.op(aten.index_select.default, x, -1, cols), params["supertuning_values"])
    return branch.op(aten.index_add.default, y, -1, rows, picked)


def _delta(params, opts, weight):
    """S (+ s B A) in merge_dtype(weight), out x in."""
    dtype = merge_dtype(weight)
    sparse = torch.zeros(weight.numel(), dtype=dtype, device=weight.device)
    sparse.index_add_(0, params["supertuning_indices"].long().to(weight.device),
                      params["supertuning_values"].to(device=weight.device, dtype=dtype))
    delta = sparse.view(weight.shape)
    if opts["rank"] is not None:
        A, B = (params[name].to(device=weight.device, dtype=dtype) for name in ("supertuning_A", "supertuning_B"))
        delta.add_(B @ A, alpha=lora_scale(opts))
    return delta


SUPERTUNING = AdapterKind(
    name="supertuning",
    options={"sparsity": Option(float, 0.99, bounds=(0.0, 1.0)),   # [0, 1): 1 is refused by init
             "select_top": Option(bool, True),
             "rank": Option(int, None, positive=True),               # None: Super; set: Supra (+ LoRA)
             "alpha": Option((int, float), None),                    # None: 2 * rank
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0)),       # of the LoRA part's input
             "init": Option(str, "default", choices=("default", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: support_size(opts["sparsity"], fan_in, fan_out)
    + (opts["rank"] * (fan_in + fan_out) if opts["rank"] is not None else 0),
    index_bounds=lambda opts, fan_in, fan_out: {"supertuning_indices": (fan_out * fan_in,)},
    frozen=frozenset({"supertuning_indices"}),
    recomputed=frozenset({"supertuning_indices"}),   # absent from a save_precomputed_indices=False checkpoint
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any LoRA rank
)
