"""Hydra (Kim et al. 2024): a parallel and a sequential low-rank branch on one linear op.

    y' = y + s B1 A1 x + s B2 A2 (W x),   y = W x + b,   s = alpha / rank

The parallel branch (A1: rank x in, B1: out x rank) reads the input, as LoRA does; the
sequential branch (A2: rank x out, B2: out x rank) reads the base op's product W x, as in the
paper's W0^T x term (in the graph y - b, the bias taken back off, so it needs no bias change).
Both A start kaiming-uniform and both B at zero, so insertion adds exactly zero (bit for bit).
A site costs rank * (in + out) + 2 * rank * out parameters.

Merge identity: W x + s B1 A1 x + s B2 A2 W x == (W + s B1 A1 + s B2 A2 W) x, exact (the bias
is unchanged); unmerge solves W = (I + s B2 A2)^-1 (W' - s B1 A1), in float32 (float64 for a
float64 weight: merge_dtype).
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, merge_dtype
from .lora import kaiming_uniform


def _scale(opts: dict) -> float:
    return (opts["alpha"] if opts["alpha"] is not None else opts["rank"]) / opts["rank"]


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    return {"hydra_A1": kaiming_uniform((rank, in_features), gen).to(dtype),
            "hydra_B1": torch.zeros(out_features, rank, dtype=dtype),
            "hydra_A2": kaiming_uniform((rank, out_features), gen).to(dtype),
            "hydra_B2": torch.zeros(out_features, rank, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    # y + s (B1 A1 x + B2 A2 (y - b)): four skinny GEMMs, the sequential one on W x
    product = y if branch.bias is None else branch.op(aten.sub.Tensor, y, branch.bias)
    parallel = branch.linear(branch.linear(x, params["hydra_A1"]), params["hydra_B1"])
    sequential = branch.linear(branch.linear(product, params["hydra_A2"]), params["hydra_B2"])
    return branch.add(y, branch.add(parallel, sequential), alpha=_scale(opts))


def _factors(params, opts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(s B1 A1, s B2 A2) in `dtype`."""
    p = {name: t.to(dtype) for name, t in params.items()}
    return (p["hydra_B1"] @ p["hydra_A1"]).mul_(_scale(opts)), (p["hydra_B2"] @ p["hydra_A2"]).mul_(_scale(opts))


def _delta(params, opts, weight):
    dtype = merge_dtype(weight)
    parallel, sequential = _factors(params, opts, dtype)
    return parallel.add_(sequential @ weight.to(dtype))


def _undo(params, opts, merged):
    dtype = merge_dtype(merged)
    parallel, sequential = _factors(params, opts, dtype)
    mix = torch.eye(sequential.shape[0], dtype=dtype, device=sequential.device) + sequential
    merged = merged.to(dtype)
    return torch.linalg.solve(mix, merged - parallel).sub_(merged)


HYDRA = AdapterKind(
    name="hydra",
    options={"rank": Option(int, 8, positive=True), "alpha": Option((int, float), None)},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    undo_delta=_undo,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out) + 2 * opts["rank"] * fan_out,
)
