"""S2FT (Yang et al. 2024): train only the input columns of the selected heads / channels.

After `co-permute` has gathered the selected attention heads and FFN channels of each group into
one leading block, the consumer of that group (o_proj / down_proj, GPT-2's attn.c_proj /
mlp.c_proj) reads them through its first k input columns. S2FT trains a dense update of exactly
those columns: y' = y + D x[..., :k] with D (out x k, `s2ft_delta`) starting at zero, so
insertion adds exactly zero (bit for bit). A site costs out * k parameters.

k (`columns`) is read per site from the newest co-permute record in
gm.meta["surgeon_permutations"] that lists the site's weight as a consumer ("in" member): the
number of selected units times the unit size. An explicit `columns` wins over the record (and a
loaded adapter brings its own). Query heads permuted `gqa: within` are not one leading block and
are refused.

Merge identity: W x + D x[:k] == (W + [D | 0]) x, exact; unmerge subtracts [D | 0]. un-permute
refuses to run while an s2ft adapter is unmerged (its columns would move under it).
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..groups.permute import META
from . import AdapterKind, Option, aten, merge_dtype


def _record_columns(gm, path: str, weight_target: str) -> int:
    """Selected units * unit size of the newest co-permute entry consuming `weight_target`."""
    for done in reversed(gm.meta.get(META, [])):
        for entry in done["groups"] if done["pass"] == "co-permute" else ():
            member = next((m for m in entry["members"] if m["tensor"] == weight_target and m["role"] == "in"), None)
            if member is None:
                continue
            if entry.get("layout") != "first" or member["start"] != 0:
                raise SpecError("s2ft", f"module '{path}': the selected units of {entry['group']} are not one "
                                        f"leading block of its input columns (layout {entry.get('layout')!r}, "
                                        f"start {member['start']}); co-permute with gqa: groups")
            return len(entry["selected"]) * entry["unit"]
    raise SpecError("s2ft", f"module '{path}': no co-permute record names its weight '{weight_target}' as a "
                            f"consumer; run co-permute before insert, or give `columns`")


def _site_options(gm, path, weight_target, opts):
    return {} if opts["columns"] is not None else {"columns": _record_columns(gm, path, weight_target)}


def _init(opts, in_features, out_features, dtype, gen, weight):
    if opts["columns"] is None or not 0 < opts["columns"] <= in_features:
        raise ValueError(f"s2ft: columns must be in 1..{in_features}, got {opts['columns']}")
    return {"s2ft_delta": torch.zeros(out_features, opts["columns"], dtype=dtype)}


def _forward(branch, x, y, params, opts):
    # y + D x[..., :k]: one slice, one GEMM, one add
    leading = branch.op(aten.slice.Tensor, x, -1, 0, opts["columns"])
    return branch.add(y, branch.linear(leading, params["s2ft_delta"]))


def _delta(params, opts, weight):
    """[D | 0] in merge_dtype(weight), the shape of `weight` (out x in)."""
    full = torch.zeros(weight.shape, dtype=merge_dtype(weight), device=params["s2ft_delta"].device)
    full[:, :opts["columns"]] = params["s2ft_delta"]
    return full


S2FT = AdapterKind(
    name="s2ft",
    options={"columns": Option(int, None, positive=True)},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: fan_out * opts["columns"],
    site_options=_site_options,
)
