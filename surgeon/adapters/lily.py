"""Lily (Zhong et al. 2024, "Low-Rank Interconnected Adaptation across Layers"): one low-rank A per site,
a set of num_B up-projections B shared by the sites of a group, mixed by a per-site router.

A site (in -> out) trains A (r x in) and a router R (num_B x r); its group trains one B, stored as PEFT
stores it, (num_B r) x out, i.e. num_B experts B_e of r x out. For the site's input x (any leading dims):

    h = A x,   p = mean over every position of the batch of softmax(R h),   y' = y + s h (sum_e p_e B_e)

so the experts' mixture is one r x out matrix per call, weighted by the router's probabilities averaged
over all tokens of all sequences in the batch (PEFT's rule): a row's output depends on the rest of its
batch. `scaling` is s.

Groups (PEFT's B sharing): the sites with the same module name (the last part of the path) and the same
weight shape, in module order; B is one trained nn.Parameter per group (`shared_trained`, keyed by the
site's `group`), so its gradient sums the group's sites, and it is counted and saved once. `group` and
`width` (the group's out, which sizes B) are per-site options set at insertion (`site_layout`); an import
takes PEFT's groups (its matched target_modules entry and weight shape) from the checkpoint's config.
PEFT's stride_A (one A for each block of stride_A consecutive sites of a group) is 1 here: a larger one
shares A by block and B by group, two groupings per site, where a kind's shared parameters follow one
(shared_group); a checkpoint with stride_A > 1 is refused.

Init (PEFT's init_weights): `default` draws A and R kaiming-uniform and sets B = 0: the branch adds
exact zeros (identity, bit for bit); `random` draws B kaiming-uniform too and changes the function.

No merge, as in PEFT: the update s (sum_e p_e B_e)^T A changes with every batch through p, so there is no
fixed delta weight.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten
from .lora import kaiming_uniform

REFUSE_MERGE = ("its update mixes the shared B experts by router probabilities averaged over each batch's "
                "tokens, so it is no fixed weight (PEFT cannot merge Lily either)")


def layout(opts: dict, sites: list[tuple[str, int, int]]) -> list[dict]:
    """Each site's group (same module name and shape, numbered in module order) and the group's width (out)."""
    groups: dict[tuple[str, int, int], int] = {}
    out = []
    for path, fan_in, fan_out in sites:
        group = groups.setdefault((path.rpartition(".")[2], fan_in, fan_out), len(groups))
        out.append({"group": group, "width": fan_out})
    return out


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank, experts = opts["rank"], opts["num_b"]
    B = kaiming_uniform((experts * rank, out_features), gen) if opts["init"] == "random" \
        else torch.zeros(experts * rank, out_features)
    return {"lily_A": kaiming_uniform((rank, in_features), gen).to(dtype),
            "lily_router": kaiming_uniform((experts, rank), gen).to(dtype), "lily_B": B.to(dtype)}


def _forward(branch, x, y, params, opts):
    rank, experts = opts["rank"], opts["num_b"]
    h = branch.linear(x, params["lily_A"])                                            # ... x r
    probs = branch.op(aten._softmax.default, branch.linear(h, params["lily_router"]), -1, False)
    mean = branch.op(aten.mean.dim, branch.op(aten.reshape.default, probs, [-1, experts]), [0], True)   # 1 x num_B
    experts_flat = branch.op(aten.reshape.default, params["lily_B"], [experts, -1])    # num_B x (r out)
    mixed = branch.op(aten.reshape.default, branch.mm(mean, experts_flat), [rank, -1])  # r x out
    update = branch.linear(h, branch.op(aten.t.default, mixed))                        # h (sum_e p_e B_e)
    if opts["scaling"] != 1.0:
        update = branch.mul(update, float(opts["scaling"]))
    return branch.add(y, update)


LILY = AdapterKind(
    name="lily",
    options={"rank": Option(int, 32, positive=True),
             "num_b": Option(int, 2, bounds=(2, float("inf"))),   # PEFT needs >= 2 experts to train the router
             "scaling": Option(float, 1.0),
             "init": Option(str, "default", choices=("default", "random")),
             "group": Option(int, None), "width": Option(int, None)},   # per site, set at insertion
    init=_init,
    forward=_forward,
    delta_weight=None,
    refuse_merge=REFUSE_MERGE,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + opts["num_b"]),   # A and the router
    shared=frozenset({"lily_B"}),
    shared_trained=frozenset({"lily_B"}),
    shared_group=lambda opts: opts.get("group"),
    shared_count=lambda opts: opts["num_b"] * opts["rank"] * opts["width"],
    site_layout=layout,
    init_check=lambda opts: "exact" if opts["init"] == "default" else "none",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
