"""CPT (context-aware prompt tuning, Blau et al. 2025): virtual tokens that start as the embeddings of given
tokens and move within a small ball around them.

The site and the graph rewrite are prompt tuning's (surgeon.adapters.virtual_tokens): v tokens in front of
the input embeddings, every sequence-derived length made n + v, with v = len(cpt_token_ids). Token i is

    P_i = E_i + Π(D)_i        E_i: the input embedding's row cpt_token_ids[i] (`cpt_embedding`, frozen)
                              D: the trained offsets (`cpt_delta`, v x hidden, zero at insert)

where Π scales each nonzero row D_i to norm at most ε_i: Π(D)_i = D_i ε_i / max(|D_i|, ε_i). ε_i follows
the token's type t_i (`cpt_tokens_type_mask`, PEFT's codes): `opt_projection_format_epsilon` · sqrt(hidden /
2048) for a template token (t_i mod 4 in {1, 3}), `opt_projection_epsilon` · sqrt(hidden / 2048) for an
input token (t_i mod 4 = 2), 1e-10 for the rest (labels: t_i mod 4 = 0, and t_i <= 0). As PEFT, the
projection is written back into D at each forward (no gradient flows through it: the optimizer steps from
the projected D), and only template and input tokens take a gradient (the others' rows get zeros). Both
happen in one run-time helper (`cpt_prompt`).

Init: D = 0, so the tokens are the given tokens' embeddings (it changes the function: "none" check).
A site trains v·hidden parameters. Merge is refused: nothing folds into a weight. PEFT's CPT is CAUSAL_LM only
(CPTConfig refuses other task types: its method reads in-context examples and label tokens); surgeon's rewrite
is the same on an encoder such as BERT, where at init it is prompt tuning of the tokens' rows, with no PEFT form
to export to. Left out: CPT's loss
(labels weighted per in-context example, with the input's own type mask, and decayed): it is a training
objective over the logits and labels, not part of the forward; the module returns the logits (n + v
positions) for any loss. PEFT saves only the prompt P (`prompt_embeddings`) and loads it as the prompt with
D = 0: a CPT checkpoint imports as a prompt_tuning adapter holding P (the same function), and a cpt
adapter exports as CPT with P computed now.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option
from .virtual_tokens import prepend, refuse_merge

FLOOR = 1e-10   # PEFT's epsilon for the tokens that do not move


def token_ids(opts: dict, vocab: int | None = None) -> list[int]:
    """cpt_token_ids, checked: a non-empty list of integers (in [0, vocab) when the vocabulary is known)."""
    ids = opts.get("cpt_token_ids")
    if not ids or not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"cpt: cpt_token_ids must be a non-empty list of token ids, got {ids!r}")
    outside = [i for i in ids if vocab is not None and not 0 <= i < vocab]
    if outside:
        raise ValueError(f"cpt: cpt_token_ids {outside} are outside the embedding's {vocab} rows")
    return ids


def type_mask(opts: dict) -> list[int]:
    """cpt_tokens_type_mask (default: every token a template token, 1, as PEFT fills it), one per token."""
    ids, types = token_ids(opts), opts.get("cpt_tokens_type_mask")
    types = [1] * len(ids) if types is None else types
    if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types) \
            or len(types) != len(ids):
        raise ValueError(f"cpt: cpt_tokens_type_mask must be a list of {len(ids)} integers, one per token of "
                         f"cpt_token_ids, got {types!r}")
    return types


def epsilons(opts: dict, hidden: int) -> torch.Tensor:
    """ε_i per token (float32, as PEFT computes them)."""
    types = torch.tensor(type_mask(opts))
    scale = torch.sqrt(torch.tensor([hidden / 2048], dtype=torch.float32))
    fmt, inp = opts["opt_projection_format_epsilon"] * scale, opts["opt_projection_epsilon"] * scale
    eps = torch.full((len(types),), FLOOR, dtype=torch.float32)
    kind = torch.remainder(types, 4)
    eps[(types > 0) & ((kind == 1) | (kind == 3))] = fmt
    eps[(types > 0) & (kind == 2)] = inp
    return eps


def moving(opts: dict) -> torch.Tensor:
    """1 for the tokens that take a gradient (types mod 4 in 1, 2, 3), 0 for the rest; v x 1."""
    kind = torch.remainder(torch.tensor(type_mask(opts)), 4)
    return ((kind == 1) | (kind == 2) | (kind == 3)).float().reshape(-1, 1)


def project(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Π(D): each nonzero row scaled to norm at most its ε."""
    norm = torch.linalg.vector_norm(delta, dim=1)
    eps = eps.to(delta.device, delta.dtype)
    factor = torch.where(norm > 0, eps / torch.maximum(norm, eps), torch.ones_like(norm))
    return delta * factor.unsqueeze(1)


def cpt_prompt(shared: torch.Tensor, delta: torch.Tensor, eps: list[float], mask: list[float]) -> torch.Tensor:
    """E + Π(D), Π(D) written back into D first (no gradient through the projection), the gradient reaching
    only the rows `mask` keeps (run-time helper of the graph; ε and the mask are plain lists, one per token)."""
    with torch.no_grad():
        delta.copy_(project(delta, torch.tensor(eps, dtype=torch.float32)))
    keep = torch.tensor(mask, dtype=delta.dtype, device=delta.device).reshape(-1, 1)
    return shared + delta * keep + (delta * (1 - keep)).detach()


def prompt(params: dict, opts: dict) -> torch.Tensor:
    """P computed now, from tensors (the PEFT export)."""
    eps = epsilons(opts, params["cpt_embedding"].shape[1])
    return params["cpt_embedding"] + project(params["cpt_delta"], eps)


def _init(opts, in_features, out_features, dtype, gen, weight):
    ids = token_ids(opts, weight.shape[0])
    type_mask(opts)
    rows = weight.detach()[torch.tensor(ids, device=weight.device)].to(dtype).clone()
    return {"cpt_embedding": rows, "cpt_delta": torch.zeros_like(rows)}


def _forward(branch, x, table, params, opts):
    eps, mask = epsilons(opts, branch.in_features).tolist(), moving(opts).flatten().tolist()

    def prompt_of(b):
        return b.op(cpt_prompt, params["cpt_embedding"], params["cpt_delta"], eps, mask)

    return prepend(branch, table, prompt_of, len(token_ids(opts)))


def _count(opts, fan_in, fan_out):
    return len(token_ids(opts)) * fan_in


CPT = AdapterKind(
    name="cpt",
    options={"cpt_token_ids": Option(list, None),
             "cpt_tokens_type_mask": Option(list, None),
             "opt_projection_epsilon": Option(float, 0.1, positive=True),
             "opt_projection_format_epsilon": Option(float, 0.1, positive=True)},
    init=_init,
    forward=_forward,
    delta_weight=None,
    refuse_merge=refuse_merge("CPT"),
    param_count=_count,
    frozen=frozenset({"cpt_embedding"}),
    init_check=lambda opts: "none",
    site_ops=("embedding",),
    rank_limit=lambda opts, fan_in, fan_out: None,
)
