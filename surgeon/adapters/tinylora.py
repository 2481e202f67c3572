"""TinyLoRA ("Learning to Reason in 13 Parameters", arXiv 2602.04118): LoRA-XS with R made from a tiny vector.

As in LoRA-XS, a site keeps frozen factors from its base weight's SVD W = U S V^T, the singular values
split between them: A = sqrt(S_r) V_r^T (r x in) and B = U_r sqrt(S_r) (out x r), r clamped to min(in, out)
as PEFT clamps it. The r x r middle is no parameter of its own: R = sum_i v_i P_i, with P (u x r x r) frozen
random projections drawn per site, N(0, 1/r) from a generator seeded with projection_seed + the site's
layer index (PEFT's), and v (u) the only trained tensor. Sites share v by weight tying: of N sites,
in module order (PEFT's), G = max(1, round(N (1 - weight_tying))) groups of N // G consecutive sites
(the last takes the rest) each read one v, one nn.Parameter (`shared_trained`, keyed by the site's
`group`), so its gradient sums theirs. weight_tying 0 gives every site its own v, 1 one v for all.

    y' = y + B R A dropout(x),   R = sum_i v_i P_i

`layer` and `group` are per-site options set at insertion from the site's place among the adapter's
sites (`site_layout`); an import reads them from PEFT's projections. `dropout` (PEFT's tinylora_dropout)
drops the branch input in train mode. Init (PEFT's init_weights): `zeros` (True) sets v = 0, an exact
identity; `uniform` draws v ~ U(-init_bound, init_bound) (the first site of a group draws it). The
adapter trains u parameters per group.

Merge identity: W x + B R A x == (W + B R A) x; B R A does not depend on W (A and B were taken from W at
insert and are kept), so unmerge subtracts it.
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, Option, aten, merge_dtype


def _rank(opts: dict, in_features: int, out_features: int) -> int:
    return min(opts["rank"], in_features, out_features)


def projections(opts: dict, rank: int) -> torch.Tensor:
    """P (u x r x r), N(0, 1/r), from projection_seed + the site's layer index, as PEFT draws it."""
    gen = torch.Generator().manual_seed(opts["projection_seed"] + (opts.get("layer") or 0))
    return torch.normal(mean=0.0, std=1.0 / math.sqrt(rank), size=(opts["u"], rank, rank), generator=gen)


def layout(opts: dict, sites: list[tuple[str, int, int]]) -> list[dict]:
    """Each site's layer index (its place in module order) and weight-tying group, PEFT's rule."""
    groups = max(1, round(len(sites) * (1.0 - opts["weight_tying"])))
    size = max(1, len(sites) // groups)
    return [{"layer": i, "group": min(i // size, groups - 1)} for i in range(len(sites))]


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = _rank(opts, in_features, out_features)
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = S[:rank].to(dtype).sqrt()
    v = torch.zeros(opts["u"]) if opts["init"] == "zeros" else \
        torch.empty(opts["u"]).uniform_(-opts["init_bound"], opts["init_bound"], generator=gen)
    return {"tinylora_A": (root[:, None] * Vh[:rank].to(dtype)).contiguous(),
            "tinylora_B": (U[:, :rank].to(dtype) * root[None]).contiguous(),
            "tinylora_P": projections(opts, rank).to(dtype), "tinylora_v": v.to(dtype)}


def _middle(branch, params, opts):
    """R = sum_i v_i P_i (r x r), one GEMM: v (1 x u) @ P viewed u x r r."""
    rank = _rank(opts, branch.in_features, branch.out_features)
    flat = branch.op(aten.reshape.default, params["tinylora_P"], [opts["u"], rank * rank])
    R = branch.mm(branch.op(aten.unsqueeze.default, params["tinylora_v"], 0), flat)
    return branch.op(aten.reshape.default, R, [rank, rank])


def _forward(branch, x, y, params, opts):
    # three skinny GEMMs, as LoRA-XS: A x (r), R (A x) (r), B R A x (out)
    x = branch.dropout(x, opts.get("dropout", 0.0))
    update = branch.linear(branch.linear(branch.linear(x, params["tinylora_A"]), _middle(branch, params, opts)),
                           params["tinylora_B"])
    return branch.add(y, update)


def _delta(params, opts, weight):
    """B R A in merge_dtype(weight), out x in."""
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    R = torch.einsum("i,ijk->jk", p["tinylora_v"], p["tinylora_P"])
    return (p["tinylora_B"] @ R @ p["tinylora_A"]).to(weight.device)


TINYLORA = AdapterKind(
    name="tinylora",
    options={"rank": Option(int, 2, positive=True), "u": Option(int, 64, positive=True),
             "weight_tying": Option(float, 0.0, bounds=(0.0, 1.0)), "projection_seed": Option(int, 42),
             "init": Option(str, "zeros", choices=("zeros", "uniform")), "init_bound": Option(float, 0.02),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0)),
             "layer": Option(int, None), "group": Option(int, None)},   # per site, set at insertion
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: 0,   # v is shared: shared_count, once per group
    frozen=frozenset({"tinylora_A", "tinylora_B", "tinylora_P"}),
    shared=frozenset({"tinylora_v"}),
    shared_trained=frozenset({"tinylora_v"}),
    shared_group=lambda opts: opts.get("group"),
    shared_count=lambda opts: opts["u"],
    site_layout=layout,
    init_check=lambda opts: "exact" if opts["init"] == "zeros" else "none",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT clamps r to min(in, out)
)
