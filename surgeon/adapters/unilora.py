"""Uni-LoRA ("One Vector Is All You Need", arXiv 2506.00799): every site's LoRA factors read one trained vector.

The adapter trains one vector theta (d = `theta_length` values), one nn.Parameter every site reads
(`shared_trained`), so its gradient sums the sites' and it is counted and saved once. Every entry of every
site's rank-r pair A (r x in), B (out x r) is one entry of theta, times a fixed scale:

    A[i, j] = theta[I_A[i, j]] s_A[i, j],   B[o, i] = theta[I_B[o, i]] s_B[o, i],   y' = y + B (A dropout(x))

The indices are one stream over the adapter's D = sum r (in + out) factor entries (sites in module order,
each A then B: `offset` and `total` are per-site options set at insertion by `site_layout`), balanced: each
theta entry is used floor(D / d) or ceil(D / d) times, shuffled from `projection_seed` (PEFT's proj_seed;
surgeon draws its own stream with torch, an import keeps PEFT's indices), and an entry used c times is
scaled by 1 / sqrt(c), so the projection from theta to the factors is an isometry (the paper's). Indices
and scales are frozen per-site tensors. `dropout` (PEFT's unilora_dropout) drops the branch input in train
mode. Init (PEFT's init_weights): `uniform` (True) draws theta ~ U(-init_bound, init_bound), `normal`
(False) N(0, 1); B A is not zero either way, so insertion changes the function. The adapter trains d.

Merge identity: W x + B A x == (W + B A) x; B A does not depend on W, so unmerge subtracts it.
"""
from __future__ import annotations

import functools
import itertools

import torch

from . import AdapterKind, Option, aten, merge_dtype


def layout(opts: dict, sites: list[tuple[str, int, int]]) -> list[dict]:
    """Each site's first index in the adapter's one stream of factor entries, and the stream's length."""
    sizes = [opts["rank"] * (fan_in + fan_out) for _, fan_in, fan_out in sites]
    starts = [0, *itertools.accumulate(sizes)]
    return [{"offset": start, "total": starts[-1]} for start in starts[:-1]]


@functools.lru_cache(maxsize=2)   # every site of an adapter reads the same stream
def stream(total: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (total), their scales 1 / sqrt(uses)): each of the `length` entries used floor(total / length)
    or ceil(total / length) times (the extra uses at distinct random entries), shuffled from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.arange(length).repeat(total // length)
    indices = torch.cat([indices, torch.randperm(length, generator=gen)[:total % length]])
    indices = indices[torch.randperm(total, generator=gen)]
    uses = torch.bincount(indices, minlength=length).float()
    return indices, uses.clamp_min(1).rsqrt()[indices]


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank, length = opts["rank"], opts["theta_length"]
    own = rank * (in_features + out_features)
    offset = opts.get("offset") or 0
    indices, scales = stream(opts.get("total") or own, length, opts["projection_seed"])
    if offset + own > indices.numel():
        raise ValueError(f"unilora: the site's {own} factor entries from offset {offset} pass the stream's "
                         f"{indices.numel()}")
    cut = offset + rank * in_features
    theta = torch.empty(length).uniform_(-opts["init_bound"], opts["init_bound"], generator=gen) \
        if opts["init"] == "uniform" else torch.randn(length, generator=gen)
    return {"unilora_indices_A": indices[offset:cut].view(rank, in_features).clone(),
            "unilora_indices_B": indices[cut:offset + own].view(out_features, rank).clone(),
            "unilora_scales_A": scales[offset:cut].view(rank, in_features).to(dtype, copy=True),
            "unilora_scales_B": scales[cut:offset + own].view(out_features, rank).to(dtype, copy=True),
            "unilora_theta_d": theta.to(dtype)}


def factors(branch, params) -> tuple:
    """(A: r x in, B: out x r): theta gathered at the indices, times the scales (graph code, or eager)."""
    theta = params["unilora_theta_d"]
    A = branch.mul(branch.op(aten.index.Tensor, theta, [params["unilora_indices_A"]]), params["unilora_scales_A"])
    B = branch.mul(branch.op(aten.index.Tensor, theta, [params["unilora_indices_B"]]), params["unilora_scales_B"])
    return A, B


def _forward(branch, x, y, params, opts):
    A, B = factors(branch, params)
    x = branch.dropout(x, opts.get("dropout", 0.0))
    return branch.add(y, branch.linear(branch.linear(x, A), B))


def _delta(params, opts, weight):
    """B A in merge_dtype(weight), out x in."""
    p = {name: t.to(merge_dtype(weight)) if t.is_floating_point() else t for name, t in params.items()}
    theta = p["unilora_theta_d"]
    A = theta[p["unilora_indices_A"]] * p["unilora_scales_A"]
    B = theta[p["unilora_indices_B"]] * p["unilora_scales_B"]
    return (B @ A).to(weight.device)


UNILORA = AdapterKind(
    name="unilora",
    options={"rank": Option(int, 4, positive=True), "theta_length": Option(int, 256, positive=True),
             "projection_seed": Option(int, 42), "init": Option(str, "uniform", choices=("uniform", "normal")),
             "init_bound": Option(float, 0.02), "dropout": Option(float, 0.0, bounds=(0.0, 1.0)),
             "offset": Option(int, None), "total": Option(int, None)},   # per site, set at insertion
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: 0,   # theta is shared: shared_count, once
    frozen=frozenset({"unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"}),
    shared=frozenset({"unilora_theta_d"}),
    shared_trained=frozenset({"unilora_theta_d"}),
    shared_count=lambda opts: opts["theta_length"],
    site_layout=layout,
    init_check=lambda opts: "none",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
