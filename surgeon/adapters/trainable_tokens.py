"""Trainable tokens (PEFT's TrainableTokens): train only the chosen rows of an embedding table.

A site is the table an aten.embedding reads (adapter_ops' "embedding" weight site, vocab x hidden).
The adapter holds `trainable_tokens_delta`, the k trained rows for the k distinct ids of the
`token_indices` option (PEFT's name: these are the rows' new values, not differences), the ids
themselves as `trainable_tokens_indices` (int64, frozen) and `trainable_tokens_original`, the rows
as they were at insert (frozen; PEFT keeps them as an unsaved buffer, so a PEFT import recomputes
them from the base). The forward replaces the table by

    W' = W with rows token_indices set to trainable_tokens_delta   (aten.index_copy)

for every op that reads it: the embedding lookup and, where the lm_head is tied to the embedding
(one tensor in the captured graph), the head's linear, which is what PEFT does for a tied head
(its lm_head layer shares the embedding's rows). An untied head is left alone, as in PEFT.

Init (PEFT's init_weights): `default` copies the rows, so insertion is exact bit for bit; `random`
draws them from a standard normal and changes the function. A site trains k * hidden parameters.

Merge writes the rows into the table: ΔW is zero except rows token_indices, which hold
delta - original, built in float64 so that W + ΔW rounds back to the trained rows bit for bit
(dense, as every delta is: vocab x hidden float64). ΔW does not depend on the weight it lands on,
so unmerge subtracts it and gives the original rows back.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten


def token_ids(opts: dict, vocab: int) -> list[int]:
    """The option's ids, checked: a non-empty list of distinct integers in [0, vocab)."""
    ids = opts.get("token_indices")
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"trainable_tokens: token_indices must be a non-empty list of integers, got {ids!r}")
    repeated = sorted(i for i in set(ids) if ids.count(i) > 1)
    if repeated:
        raise ValueError(f"trainable_tokens: token_indices has repeated ids {repeated} (each row is trained once)")
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise ValueError(f"trainable_tokens: token_indices {outside} are outside the embedding's {vocab} rows")
    return list(ids)


def _init(opts, in_features, out_features, dtype, gen, weight):
    ids = token_ids(opts, out_features)
    index = torch.tensor(ids, dtype=torch.int64)
    original = weight.detach()[index.to(weight.device)].to(dtype)
    rows = original.clone() if opts["init"] == "default" else \
        torch.randn(len(ids), in_features, generator=gen).to(device=original.device, dtype=dtype)
    return {"trainable_tokens_delta": rows, "trainable_tokens_indices": index,
            "trainable_tokens_original": original.clone()}


def _forward(branch, x, weight, params, opts):
    # W' = W with the chosen rows replaced: every reader of W (the lookup, a tied head) reads W'
    return branch.op(aten.index_copy.default, weight, 0, params["trainable_tokens_indices"],
                     params["trainable_tokens_delta"])


def _delta(params, opts, weight):
    """Zero but rows token_indices: trained - original rows, in float64 (exact: see the module docstring)."""
    delta = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    rows = params["trainable_tokens_delta"].double() - params["trainable_tokens_original"].double()
    return delta.index_copy_(0, params["trainable_tokens_indices"].long().to(weight.device), rows.to(weight.device))


TRAINABLE_TOKENS = AdapterKind(
    name="trainable_tokens",
    options={"token_indices": Option(list, None),
             "init": Option(str, "default", choices=("default", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: len(opts["token_indices"] or ()) * fan_in,
    frozen=frozenset({"trainable_tokens_indices", "trainable_tokens_original"}),
    recomputed=frozenset({"trainable_tokens_indices", "trainable_tokens_original"}),
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    site_ops=("embedding",),
    rank_limit=lambda opts, fan_in, fan_out: None,
)
