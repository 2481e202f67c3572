"""Poly (Polytropon, Ponti et al. 2023) and MHR (multi-head routing, Caccia et al. 2023): per-task mixtures of
LoRA skills.

A site holds an inventory of `n_skills` LoRA pairs, each cut into `n_splits` heads (n_splits > 1 is MHR):
A (n_splits x n_skills x in/n_splits x r) and B (n_splits x n_skills x r x out/n_splits), and one routing
table of logits Z (n_tasks x n_splits * n_skills, PEFT's router module_logits). Task t's mixing weights,
per head q and skill s, are

    w[t, q, s] = σ(Z[t, q, s]) / (Σ_s' σ(Z[t, q, s']) + 1e-12)        (eval)

and in train mode σ(Z) is replaced by a relaxed-Bernoulli sample of temperature 1 with those logits, as
PEFT's router draws. The heads' mixed factors, A_q = Σ_s w[q, s] A[q, s] and B_q = Σ_s w[q, s] B[q, s], are
stacked into one LoRA pair: A' (in x r) puts head q on input features q*in/n .. (q+1)*in/n, B' (r x out)
on output features likewise, and the site adds x A' B' / r. The mix is of the factors, not of the products:
ΔW = (A' B')^T / r is one rank-r matrix for a given routing.

`routing` says where the weights come from:
- `rows` (default, PEFT's Poly): each row's task id, given with the call, `module(ids, task_ids=[...])`
  and `generate(..., task_ids=[...])` (surgeon.routing). With n_tasks = 1 a call may leave them out
  (every row is task 0); with more it must give them. No single weight holds a per-row mix: merge is
  refused.
- `task`: every row is task `task_id`; the routing is fixed, so ΔW is exact and merges.
- `mu`: MHR-μ, the MHR paper's few-shot variant, which discards the routing and uses the plain average
  of the pre-trained skills (w = 1 / n_skills for every head; Z is kept but not read, so it takes no
  gradient). Exact ΔW, merges.
- `task_mean`: the routing averaged over the tasks, w = mean_t w[t] (a different average: it weighs the
  skills by how much the tasks use them). Exact ΔW, merges.

Init (PEFT's): each A[q, s] kaiming-uniform (nn.Linear's default) transposed, B = 0 (`default`: an exact
identity at insert) or kaiming-uniform too (`random`, changes the function), Z uniform in ±1e-3. A site
trains n_skills r (in + out) + n_tasks n_splits n_skills parameters. n_splits must divide in and out.
The update runs as one run-time helper (`poly_update`, given the training flag) that reads the call's
task ids; mixed batches by adapter name (surgeon.serving) do not take Poly.
"""
from __future__ import annotations

import torch
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from . import AdapterKind, Option, merge_dtype
from .lora import kaiming_uniform
from .. import routing as task_routing
from ..errors import InputError

EPS = 1e-12          # PEFT's router adds this to the sum it normalizes by
LOGIT_INIT = 1e-3    # PEFT draws the routing logits uniform in [-1e-3, 1e-3]
ROUTINGS = ("rows", "task", "mu", "task_mean")


def _check(opts: dict, in_features: int, out_features: int) -> None:
    splits = opts["n_splits"]
    if in_features % splits or out_features % splits:
        raise ValueError(f"poly: n_splits {splits} must divide the site's {in_features} input and {out_features} "
                         "output features")
    if opts["routing"] == "task" and opts["task_id"] >= opts["n_tasks"]:
        raise ValueError(f"poly: task_id {opts['task_id']} is not one of the n_tasks={opts['n_tasks']} tasks")


def _init(opts, in_features, out_features, dtype, gen, weight):
    _check(opts, in_features, out_features)
    splits, skills, rank = opts["n_splits"], opts["n_skills"], opts["rank"]
    d_in, d_out = in_features // splits, out_features // splits
    A = torch.stack([torch.stack([kaiming_uniform((rank, d_in), gen).T for _ in range(skills)])
                     for _ in range(splits)])
    if opts["init"] == "random":
        B = torch.stack([torch.stack([kaiming_uniform((d_out, rank), gen).T for _ in range(skills)])
                         for _ in range(splits)])
    else:
        B = torch.zeros(splits, skills, rank, d_out)
    logits = torch.empty(opts["n_tasks"], splits * skills).uniform_(-LOGIT_INIT, LOGIT_INIT, generator=gen)
    return {"poly_lora_A": A.to(dtype), "poly_lora_B": B.to(dtype), "poly_router": logits.to(dtype)}


def mixing_weights(logits: torch.Tensor, splits: int, skills: int, training: bool) -> torch.Tensor:
    """Rows of routing logits (k x splits * skills) -> mixing weights k x splits x skills, each head's summing
    to 1 (up to PEFT's 1e-12): sigmoids in eval, relaxed-Bernoulli samples in train mode."""
    logits = logits.reshape(-1, splits, skills)
    gates = RelaxedBernoulli(temperature=1.0, logits=logits).rsample() if training else torch.sigmoid(logits)
    return gates / (gates.sum(dim=-1, keepdim=True) + EPS)


def fixed_weights(logits: torch.Tensor, opts: dict, training: bool = False) -> torch.Tensor:
    """The one routing of a `task`, `mu` or `task_mean` adapter, 1 x splits x skills."""
    splits, skills, how = opts["n_splits"], opts["n_skills"], opts["routing"]
    if how == "mu":
        return torch.full((1, splits, skills), 1.0 / skills, dtype=logits.dtype, device=logits.device)
    if how == "task":
        return mixing_weights(logits[opts["task_id"]:opts["task_id"] + 1], splits, skills, training)
    return mixing_weights(logits, splits, skills, training).mean(dim=0, keepdim=True)


def mixed_factors(weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per routing row (k x splits x skills): A' (k x in x r), the heads stacked along the input features, and
    B' (k x r x out), the heads side by side along the output features."""
    k, rank = weights.shape[0], A.shape[-1]
    A_mix = torch.einsum("kqs,qsdr->kqdr", weights, A).reshape(k, -1, rank)
    B_mix = torch.einsum("kqs,qsrd->kqrd", weights, B).transpose(1, 2).reshape(k, rank, -1)
    return A_mix, B_mix


def _row_weights(logits: torch.Tensor, batch: int, opts: dict, training: bool, where: str) -> torch.Tensor:
    """Each row's mixing weights (batch x splits x skills) from the call's task ids (surgeon.routing)."""
    ids, largest, checking = task_routing.current()
    if checking or (ids is None and opts["n_tasks"] == 1):
        ids, largest = torch.zeros(batch, dtype=torch.long), 0
    elif ids is None:
        raise InputError(f"the poly adapter at '{where}' routes each row by its task (routing: rows, n_tasks="
                         f"{opts['n_tasks']}): pass task_ids=[...], one per row, to the call or to generate")
    if ids.numel() != batch:
        raise InputError(f"task_ids has {ids.numel()} ids but the poly adapter at '{where}' sees {batch} rows: give "
                         "one task id per row")
    if largest >= opts["n_tasks"]:
        raise InputError(f"task id {largest} is not one of the poly adapter's n_tasks={opts['n_tasks']} "
                         f"tasks (at '{where}')")
    return mixing_weights(logits[ids.to(logits.device)], opts["n_splits"], opts["n_skills"], training)


def poly_update(training: bool, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, logits: torch.Tensor,
                opts: dict, where: str) -> torch.Tensor:
    """x A' B' / r for the site's input x (run-time helper of the graph; `training` is the module's flag).
    With per-row routing x's leading dimension is the batch, or batch * length for a flattened input
    (GPT-2's Conv1D): the rows' tokens are contiguous, so row b's are x[b*T : (b+1)*T]."""
    rank, features = A.shape[-1], x.shape[-1]
    inputs = x.to(A.dtype)
    if opts["routing"] != "rows":
        A_mix, B_mix = mixed_factors(fixed_weights(logits, opts, training), A, B)
        return ((inputs @ A_mix[0]) @ B_mix[0] / rank).to(x.dtype)
    ids, _, checking = task_routing.current()
    leading = x.shape[0]
    batch = leading if x.dim() > 2 or ids is None or checking else ids.numel()
    if x.dim() == 2 and (batch == 0 or leading % batch):
        raise InputError(f"task_ids has {batch} ids but the poly adapter at '{where}' sees {leading} flattened "
                         "tokens, no whole number per row: give one task id per row")
    A_mix, B_mix = mixed_factors(_row_weights(logits, batch, opts, training, where), A, B)
    rows = inputs.reshape(batch, -1, features)
    update = torch.bmm(torch.bmm(rows, A_mix), B_mix) / rank
    return update.reshape(*x.shape[:-1], B_mix.shape[-1]).to(x.dtype)


def _forward(branch, x, y, params, opts):
    update = branch.when_training(poly_update, x, params["poly_lora_A"], params["poly_lora_B"],
                                  params["poly_router"], dict(opts), branch.path, like=y)
    return branch.add(y, update)


def _delta(params, opts, weight):
    """(A' B')^T / r for the fixed routing (eval weights), out x in, in merge_dtype(weight)."""
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    A_mix, B_mix = mixed_factors(fixed_weights(p["poly_router"], opts), p["poly_lora_A"], p["poly_lora_B"])
    delta = (A_mix[0] @ B_mix[0]).T.div_(opts["rank"])
    return delta if weight is None else delta.to(weight.device)


def _refusal(opts: dict) -> str:
    if opts.get("routing", "rows") == "rows":
        return ("its routing is per row (routing: rows): each call's task_ids mix the skills differently per row, "
                "so no one weight holds the adapter. Set routing: task (with task_id), mu (MHR-μ) or task_mean "
                "for a fixed routing, which merges exactly")
    return ""


def param_count(opts: dict, fan_in: int, fan_out: int) -> int:
    return opts["n_skills"] * opts["rank"] * (fan_in + fan_out) + opts["n_tasks"] * opts["n_splits"] * opts["n_skills"]


POLY = AdapterKind(
    name="poly",
    options={"rank": Option(int, 8, positive=True),
             "n_tasks": Option(int, 1, positive=True),
             "n_skills": Option(int, 4, positive=True),
             "n_splits": Option(int, 1, positive=True),
             "routing": Option(str, "rows", choices=ROUTINGS),
             "task_id": Option(int, 0, bounds=(0, float("inf"))),
             "init": Option(str, "default", choices=("default", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=param_count,
    merge_refusal=_refusal,
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
