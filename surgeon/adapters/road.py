"""RoAd (Liao et al. 2024): y' = R y, a 2-D rotation (with a scale) of each pair of output features.

The out features split into groups of `group_size` g (even, dividing out); in a group of halves
h = g / 2, feature i of the first half pairs with feature i + h of the second. With per-feature
coefficients c = alpha cos(theta) and s = alpha sin(theta), a pair (a, b) = (y_i, y_{i+h}) becomes

    y'_i = c_i a - s_i b,      y'_{i+h} = s_{i+h} a + c_{i+h} b,

which in the graph is y * c + swap_halves(y) * s', s' = s with the first half negated (elementwise
on the base output, no out x out matrix). The whole output is rotated, bias included, as in PEFT.
The `variant` (PEFT's) sets how many angles and scales a site trains (`road_theta`, `road_alpha`,
each of the same size):

- road_1: out / 2 each; a group's h values serve both halves (c_i = c_{i+h}, s_i = s_{i+h});
- road_2: out each, one theta and alpha per feature;
- road_4: 2 out each, per group [g cosine angles | g sine angles] and likewise two scale
  vectors: c = alpha_1 cos(theta_1), s = alpha_2 sin(theta_2).

A site costs out, 2 out or 4 out parameters. `init: identity` (PEFT's init_weights=True) starts
at theta = 0, alpha = 1: c = 1, s = 0 and y * 1 + (...) * 0 == y, an exact identity; `init: random`
(init_weights=False) draws theta ~ N(0, 0.5), alpha ~ N(1, 0.5) and changes the function.

Merge identity: R (W x + b) == (R W) x + R b, so W' = R W (delta R W - W, merge_dtype) and the bias
becomes R b (bias_map), on linear and Conv1D sites alike. Unmerge inverts each 2 x 2 block
[[c_i, -s_i], [s_{i+h}, c_{i+h}]] (determinant c_i c_{i+h} + s_i s_{i+h}; refused where one is 0)
and maps the bias back through it.
"""
from __future__ import annotations

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype

VARIANT_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}   # theta (and alpha) entries per output feature


def _groups(opts: dict, out_features: int) -> tuple[int, int]:
    """(groups, half): out = groups * 2 * half."""
    size = opts["group_size"]
    if size % 2 or out_features % size:
        raise ValueError(f"road: group_size {size} must be even and divide the site's {out_features} output "
                         "features")
    return out_features // size, size // 2


def _init(opts, in_features, out_features, dtype, gen, weight):
    _groups(opts, out_features)
    size = int(out_features * VARIANT_SIZE[opts["variant"]])
    if opts["init"] == "random":
        theta = torch.randn(size, generator=gen) * 0.5
        alpha = 1.0 + torch.randn(size, generator=gen) * 0.5
    else:
        theta, alpha = torch.zeros(size), torch.ones(size)
    return {"road_theta": theta.to(dtype), "road_alpha": alpha.to(dtype)}


def _coefficients(branch, params, opts, out_features: int):
    """(c, s) as (groups, 2, half) tensors, or (groups, 1, half) for road_1 (shared by both halves)."""
    groups, half = _groups(opts, out_features)
    theta, alpha = params["road_theta"], params["road_alpha"]
    if opts["variant"] == "road_4":   # per group: [cos angles of g | sin angles of g], the same for alpha
        theta = branch.op(aten.view.default, theta, [groups, 2, 2, half])
        alpha = branch.op(aten.view.default, alpha, [groups, 2, 2, half])
        pick = lambda t, i: branch.op(aten.select.int, t, 1, i)   # noqa: E731
        return (branch.mul(pick(alpha, 0), branch.op(aten.cos.default, pick(theta, 0))),
                branch.mul(pick(alpha, 1), branch.op(aten.sin.default, pick(theta, 1))))
    shape = [groups, 1 if opts["variant"] == "road_1" else 2, half]
    theta = branch.op(aten.view.default, theta, shape)
    alpha = branch.op(aten.view.default, alpha, shape)
    return (branch.mul(alpha, branch.op(aten.cos.default, theta)),
            branch.mul(alpha, branch.op(aten.sin.default, theta)))


def _signed_node(branch, s, road_1: bool):
    """s with its first half negated, (groups, 2, half): the swapped y_{i+h} enters row i as -s_i y_{i+h}."""
    first = branch.op(aten.slice.Tensor, s, 1, 0, 1)
    second = s if road_1 else branch.op(aten.slice.Tensor, s, 1, 1, 2)
    return branch.op(aten.cat.default, [branch.op(aten.neg.default, first), second], 1)


def _rotate(branch, z, c, s_signed, groups: int, half: int):
    """z (..., out) -> z * c + swap_halves(z) * s' per group, along the last dim."""
    z = branch.op(aten.unflatten.int, z, -1, [groups, 2, half])
    swapped = branch.op(aten.flip.default, z, [-2])
    out = branch.add(branch.mul(z, c), branch.mul(swapped, s_signed))
    return branch.op(aten.flatten.using_ints, out, -3, -1)


def _forward(branch, x, y, params, opts):
    groups, half = _groups(opts, branch.out_features)
    c, s = _coefficients(branch, params, opts, branch.out_features)
    return _rotate(branch, y, c, _signed_node(branch, s, opts["variant"] == "road_1"), groups, half)


def _full(params: dict, opts: dict, out_features: int, dtype: torch.dtype = torch.float64):
    """(c, s) in `dtype` as (groups, 2, half) tensors (road_1's shared half repeated)."""
    params = {name: t.to(dtype) for name, t in params.items()}
    c, s = _coefficients(EagerBranch((0, out_features)), params, opts, out_features)
    return c.expand(-1, 2, -1), s.expand(-1, 2, -1)


def _rotate_rows(weight: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """R W for an out x in W (in c's dtype): W's columns are rotated, i.e. W^T's rows."""
    groups, _, half = c.shape
    s_signed = torch.cat([-s[:, :1], s[:, 1:]], 1)
    return _rotate(EagerBranch((0, 0)), weight.to(c.dtype).T, c, s_signed, groups, half).T


def _inverse(params, opts, out_features: int, dtype: torch.dtype = torch.float64):
    """(c, s) of R^-1: block by block, [[c_i, -s_i], [s_j, c_j]]^-1 = [[c_j, s_i], [-s_j, c_i]] / det."""
    c, s = _full(params, opts, out_features, dtype)
    det = c[:, 0] * c[:, 1] + s[:, 0] * s[:, 1]
    if not bool((det != 0).all()):
        raise ValueError("road: a 2-D block of R is singular (alpha = 0, or the two angles of a pair are a "
                         "quarter turn apart): the base weight cannot be recovered from the merged one")
    return torch.stack([c[:, 1], c[:, 0]], 1) / det[:, None], -s / det[:, None]


def _delta(params, opts, weight):
    """R W - W in merge_dtype(weight)."""
    return _rotate_rows(weight, *_full(params, opts, weight.shape[0], merge_dtype(weight))).sub_(weight)


def _undo(params, opts, merged):
    """R^-1 W' - W'."""
    return _rotate_rows(merged, *_inverse(params, opts, merged.shape[0], merge_dtype(merged))).sub_(merged)


def _bias(params, opts, bias, undo):
    """R b (undo: R^-1 b'), float64: the bias as a one-column weight."""
    c, s = (_inverse if undo else _full)(params, opts, bias.numel())
    return _rotate_rows(bias.reshape(-1, 1), c, s).reshape(bias.shape)


ROAD = AdapterKind(
    name="road",
    options={"variant": Option(str, "road_1", choices=tuple(VARIANT_SIZE)),
             "group_size": Option(int, 64, positive=True),
             "init": Option(str, "identity", choices=("identity", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    undo_delta=_undo,
    bias_map=_bias,
    param_count=lambda opts, fan_in, fan_out: int(2 * fan_out * VARIANT_SIZE[opts["variant"]]),
    init_check=lambda opts: "exact" if opts["init"] == "identity" else "none",
)
