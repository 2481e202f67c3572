"""GLoRA (Chavan et al. 2023): a generalized update of a linear layer's weight and bias.

A site with weight W0 (out x in) and bias b0 computes y = W_eff x + b_eff with

    W_eff = W0 + W0 ⊙ A + B,     b_eff = b0 + b0 ⊙ D + E + W0 C

so the adapter adds (W0 ⊙ A + B) x + (b0 ⊙ D + E + W0 C) to the base output y. Each of A .. E is
one of PEFT's parameterizations (GloraConfig's config_A_B, config_C, config_D_E), as options:

    `a_b` (A and B, out x in):  lora: Xd Xu (out x r, r x in) | vector: out x 1, one value per row |
                                constant: one scalar | none
    `c` (C, in x 1):            lora: Xd Xu (in x r, r x 1) | vector: in x 1 | none
    `d_e` (D and E, out):       vector: one per output | constant: one scalar | none

The bias terms C, D and E exist only on a site whose op adds a bias (the site option `biased`, read
from the graph), as in PEFT: on a site without one, b0 ⊙ D is 0, and E and W0 C would be a new bias,
which the merge cannot add (it rewrites the bias a site has; it makes none).

Init (PEFT's init_weights): `default` draws every lora path's Xu kaiming-uniform and zeros the rest,
so A .. E are all 0 and the branch adds exact zeros (identity, bit for bit); `random` draws Xd and
the vectors kaiming-uniform and the scalars N(0, 0.02²) and changes the function.

The graph builds the dense W0 ⊙ A + B (W0 ⊙ A has no low-rank form) and the bias delta each call and
adds linear(x, W0 ⊙ A + B, bias delta) to y (Conv1D sites: W0 is the transpose of the stored weight).

Merge (structural re-parameterization): W' = W0 + W0 ⊙ A + B into the weight, b' = b0 + b0 ⊙ D + E
into the bias (bias_map). The term W0 C is refused: the bias rewrite (the merge pass's and
merge-checkpoint's bias_map) is given the bias alone, not the base weight it needs. Unmerge inverts
both where it can: W0 = (W' - B) / (1 + A), b0 = (b' - E) / (1 + D); an entry of 1 + A or 1 + D that
is 0 loses the base value, and that unmerge is refused.
"""
from __future__ import annotations

import torch

from ..rules import Pattern
from . import AdapterKind, EagerBranch, Option, aten, merge_dtype
from .lora import kaiming_uniform

WEIGHT_MODES = ("lora", "vector", "constant", "none")   # A and B
COUPLING_MODES = ("lora", "vector", "none")              # C
BIAS_MODES = ("vector", "constant", "none")              # D and E


def _shapes(opts: dict, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape for a site of these sizes (PEFT's shapes, under glora_<path>_<tensor>)."""
    rank, shapes = opts["rank"], {}
    for path in "AB":
        mode = opts["a_b"]
        if mode == "lora":
            shapes |= {f"glora_{path}_Xd": (out_features, rank), f"glora_{path}_Xu": (rank, in_features)}
        elif mode != "none":
            shapes[f"glora_{path}_X"] = (out_features, 1) if mode == "vector" else (1,)
    if not _biased(opts):
        return shapes
    if opts["c"] == "lora":
        shapes |= {"glora_C_Xd": (in_features, rank), "glora_C_Xu": (rank, 1)}
    elif opts["c"] == "vector":
        shapes["glora_C_X"] = (in_features, 1)
    if opts["d_e"] != "none":
        shapes |= {f"glora_{path}_X": (out_features,) if opts["d_e"] == "vector" else (1,) for path in "DE"}
    return shapes


def _biased(opts: dict) -> bool:
    """Whether the site has a bias (None: not known yet, taken as present, the stricter case for a merge)."""
    return opts.get("biased") is not False


def _init(opts, in_features, out_features, dtype, gen, weight):
    shapes = _shapes(opts, in_features, out_features)
    if not shapes:
        raise ValueError(f"glora: a_b={opts['a_b']!r} and no bias terms (the site has no bias, or c and d_e are "
                         "'none') leave the adapter no parameters at this site")
    random = opts["init"] == "random"
    params = {}
    for name, shape in shapes.items():
        if name.endswith("_Xu"):     # a lora path's right factor: always drawn, so its Xd gets a gradient
            value = kaiming_uniform(shape, gen)
        elif not random:
            value = torch.zeros(shape)
        elif shape == (1,):          # a constant
            value = torch.empty(1).normal_(0.0, 0.02, generator=gen)
        elif len(shape) == 1:        # D / E vectors: PEFT draws them as one 1 x out row
            value = kaiming_uniform((1, shape[0]), gen).reshape(shape)
        else:                        # Xd, or a column vector (fan-in 1)
            value = kaiming_uniform(shape, gen)
        params[name] = value.to(dtype)
    return params


def _path(branch, params, path: str):
    """The value of path A .. E (Xd Xu, X, or None when absent), as graph code or eagerly."""
    if f"glora_{path}_Xd" in params:
        return branch.mm(params[f"glora_{path}_Xd"], params[f"glora_{path}_Xu"])
    return params.get(f"glora_{path}_X")


def _weight_update(branch, weight, params):
    """W0 ⊙ A + B (out x in), or None without A and B."""
    A, B = _path(branch, params, "A"), _path(branch, params, "B")
    return None if A is None else branch.add(branch.mul(weight, A), B)


def _bias_update(branch, weight, bias, params):
    """b0 ⊙ D + E + W0 C (out), or None without bias terms."""
    terms = []
    D, E, C = _path(branch, params, "D"), _path(branch, params, "E"), _path(branch, params, "C")
    if D is not None:
        terms += [branch.mul(bias, D), E]
    if C is not None:
        terms.append(branch.op(aten.view.default, branch.mm(weight, C), [-1]))
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = branch.add(total, term)
    return total


def _forward(branch, x, y, params, opts):
    weight = branch.base_weight()
    dW, db = _weight_update(branch, weight, params), _bias_update(branch, weight, branch.bias, params)
    if dW is None:   # bias terms only: a constant added to every position
        return branch.add(y, db)
    return branch.add(y, branch.op(aten.linear.default, x, dW, db))


def _eager(params, weight):
    dtype = merge_dtype(weight)
    return {name: t.to(device=weight.device, dtype=dtype) for name, t in params.items()}, weight.to(dtype)


def _delta(params, opts, weight):
    """W0 ⊙ A + B in merge_dtype(weight) (zeros without A and B)."""
    p, w = _eager(params, weight)
    dW = _weight_update(EagerBranch(tuple(w.shape[::-1])), w, p)
    return torch.zeros_like(w) if dW is None else dW.expand_as(w)


def _undo(params, opts, merged):
    """W0 - W' with W0 = (W' - B) / (1 + A); refused where an entry of 1 + A is 0."""
    p, w = _eager(params, merged)
    A, B = _path(EagerBranch((0, 0)), p, "A"), _path(EagerBranch((0, 0)), p, "B")
    if A is None:
        return torch.zeros_like(w)
    scale = (1 + A).expand_as(w)
    if not bool((scale != 0).all()):
        raise ValueError("glora: an entry of 1 + A is 0, so W0 ⊙ (1 + A) lost that base weight; it cannot be "
                         "recovered from the merged one")
    return (w - B).div_(scale).sub_(w)


def _bias_map(params, opts, bias, undo):
    """b0 + b0 ⊙ D + E (undo: (b' - E) / (1 + D)), float64; None without D and E."""
    if "glora_C_Xd" in params or "glora_C_X" in params:
        raise ValueError(f"glora: {_COUPLING_REFUSAL}")
    if "glora_D_X" not in params:
        return None
    D, E = (params[f"glora_{path}_X"].double().to(bias.device) for path in "DE")
    if not undo:
        return bias + bias * D + E
    if not bool((1 + D != 0).all()):
        raise ValueError("glora: an entry of 1 + D is 0, so b0 ⊙ (1 + D) lost that base bias; it cannot be "
                         "recovered from the merged one")
    return (bias - E) / (1 + D)


_COUPLING_REFUSAL = ("its bias term W0 C needs the base weight W0 when the bias is rewritten, and the merge "
                     "(like merge-checkpoint) rewrites a bias from the bias alone; an adapter with c: none merges")


def _merge_refusal(opts):
    return _COUPLING_REFUSAL if opts["c"] != "none" and _biased(opts) else ""


def _site_options(gm, path, weight_target, opts):
    """Whether the site's op adds a bias (`biased`): only then does it get C, D and E."""
    pattern = Pattern(("linear", "addmm"), path)
    calls = [m for ref in gm.graph.find_nodes(op="get_attr", target=weight_target) for u in ref.users
             if (m := pattern.match(u)) is not None]
    return {"biased": bool(calls) and all(m["bias"] is not None for m in calls)}


def _param_count(opts, fan_in, fan_out):
    return sum(torch.Size(shape).numel() for shape in _shapes(opts, fan_in, fan_out).values())


GLORA = AdapterKind(
    name="glora",
    options={"rank": Option(int, 8, positive=True),
             "a_b": Option(str, "lora", choices=WEIGHT_MODES),
             "c": Option(str, "lora", choices=COUPLING_MODES),
             "d_e": Option(str, "constant", choices=BIAS_MODES),
             "init": Option(str, "default", choices=("default", "random")),
             "biased": Option(bool, None)},   # per site, read from the graph: whether the base op adds a bias
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    undo_delta=_undo,
    bias_map=_bias_map,
    param_count=_param_count,
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    merge_refusal=_merge_refusal,
    site_options=_site_options,
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
