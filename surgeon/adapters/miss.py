"""MiSS (Kang et al. 2024; formerly Bone): a weight update shared across blocks of the input features.

`mode` is PEFT's init_weights (balance: True, the default; bat; mini). With r = `rank`, the input
features split into n = ceil(in / r) chunks of r (the last one zero-padded when r does not divide in).

- balance: one block D (r x out, `miss_block`). Every chunk gets the same update:
  dW[o, j] = D[j mod r, o], so dW x = D^T (sum of x's chunks). In the graph: pad x to n r, view it
  as (..., n, r), sum over the chunks and apply D (one r -> out GEMM; no out x in matrix).
- mini: D is r x m (m = `mini_rank`, dividing out) and repeats along the outputs:
  dW[o, j] = D[j mod r, o mod m]; otherwise as balance.
- bat: D is (out / r) x r x r (r dividing in and out). W's r x r tile (a, c) (rows a r.., columns
  c r..) becomes W_ac D_a + D_a: the update mixes W's own columns, so dW depends on W. It is built
  per forward from the site's weight node and applied with one GEMM, y + x dW^T (PEFT's forward
  uses x (W + dW)^T, the same up to rounding); PEFT's bat applies no dropout, so `dropout` is refused.

`dropout` (PEFT's miss_dropout) drops the branch input in train mode (balance, mini). The block
starts at 0 (`init: zeros`, PEFT's init_weights True / "bat" / "mini"): an exact identity in every
mode. `init: random` (PEFT's init_weights=False, balance only there) draws it kaiming-uniform and
changes the function. A site costs r out (balance, bat) or r m (mini) parameters.

Merge identity: W x + dW x == (W + dW) x. balance and mini: dW does not depend on W, unmerge
subtracts it. bat: W' tile = W_ac (I + D_a) + D_a, so unmerge is W_ac = (W'_ac - D_a)(I + D_a)^-1,
refused where an I + D_a is singular. Linear and GPT-2 Conv1D sites (PEFT's MiSS takes only
nn.Linear, so PEFT parity is on linear sites).
"""
from __future__ import annotations

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype
from .lora import kaiming_uniform

MODES = ("balance", "bat", "mini")


def _shape(opts, in_features: int, out_features: int) -> tuple[int, ...]:
    """miss_block's shape for a site, after the mode's divisibility checks."""
    rank, mode = opts["rank"], opts["mode"]
    if rank > in_features:
        raise ValueError(f"miss: rank {rank} exceeds the site's {in_features} input features")
    if mode == "bat":
        if in_features % rank or out_features % rank:
            raise ValueError(f"miss: mode bat needs rank {rank} to divide the site's {in_features} input and "
                             f"{out_features} output features (its r x r tiles)")
        if opts.get("dropout", 0.0):
            raise ValueError("miss: mode bat applies no dropout (PEFT's bat forward ignores miss_dropout); "
                             "set dropout to 0")
        return out_features // rank, rank, rank
    if mode == "mini":
        if out_features % opts["mini_rank"]:
            raise ValueError(f"miss: mini_rank {opts['mini_rank']} must divide the site's {out_features} output "
                             "features")
        return rank, opts["mini_rank"]
    return rank, out_features


def _init(opts, in_features, out_features, dtype, gen, weight):
    shape = _shape(opts, in_features, out_features)
    block = kaiming_uniform(shape, gen) if opts["init"] == "random" else torch.zeros(shape)
    return {"miss_block": block.to(dtype)}


def _bat_update(branch, weight, block, rank: int):
    """dW of mode bat from an out x in weight: tile (a, c) of W -> W_ac D_a + D_a."""
    out_features, in_features = branch.out_features, branch.in_features
    tiles = branch.op(aten.view.default, weight, [out_features // rank, rank, in_features // rank, rank])
    tiles = branch.op(aten.permute.default, tiles, [0, 2, 1, 3])                     # (a, c, r, r)
    per_row = branch.op(aten.unsqueeze.default, block, 1)                             # (a, 1, r, r)
    update = branch.add(branch.op(aten.matmul.default, tiles, per_row), per_row)
    update = branch.op(aten.permute.default, update, [0, 2, 1, 3])
    return branch.op(aten.reshape.default, update, [out_features, in_features])


def _forward(branch, x, y, params, opts):
    block = params["miss_block"]
    if opts["mode"] == "bat":
        return branch.add(y, branch.linear(x, _bat_update(branch, branch.base_weight(), block, opts["rank"])))
    rank, in_features = opts["rank"], branch.in_features
    x = branch.dropout(x, opts.get("dropout", 0.0))
    pad = -in_features % rank
    if pad:
        x = branch.op(aten.constant_pad_nd.default, x, [0, pad], 0.0)
    chunks = branch.op(aten.unflatten.int, x, -1, [(in_features + pad) // rank, rank])
    summed = branch.op(aten.sum.dim_IntList, chunks, [-2])                           # (..., r)
    if opts["mode"] == "mini":
        block = branch.op(aten.repeat.default, block, [1, branch.out_features // opts["mini_rank"]])
    return branch.add(y, branch.linear(summed, branch.op(aten.t.default, block)))


def _full_block(params, opts, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The r x out block of balance / mini (mini's repeated along the outputs), in `dtype`."""
    block = params["miss_block"].to(dtype)
    return block.repeat(1, out_features // opts["mini_rank"]) if opts["mode"] == "mini" else block


def _delta(params, opts, weight):
    """dW in merge_dtype(weight)."""
    out_features, in_features = weight.shape
    dtype = merge_dtype(weight)
    if opts["mode"] == "bat":
        return _bat_update(EagerBranch((in_features, out_features)), weight.to(dtype),
                           params["miss_block"].to(dtype).to(weight.device), opts["rank"])
    rows = torch.arange(in_features, device=weight.device) % opts["rank"]
    return _full_block(params, opts, out_features, dtype).to(weight.device)[rows].T


def _undo(params, opts, merged):
    """bat: (W' - D_a)(I + D_a)^-1 per tile, minus W'; balance and mini: -dW."""
    if opts["mode"] != "bat":
        return -_delta(params, opts, merged)
    out_features, in_features = merged.shape
    dtype = merge_dtype(merged)
    block = params["miss_block"].to(dtype).to(merged.device)
    rank = block.shape[-1]
    eye = torch.eye(rank, dtype=dtype, device=merged.device)
    if not bool((torch.linalg.det(eye + block) != 0).all()):
        raise ValueError("miss: an I + D tile of mode bat is singular, so the base weight cannot be recovered from "
                         "the merged one")
    merged = merged.to(dtype)
    tiles = merged.view(out_features // rank, rank, in_features // rank, rank).permute(0, 2, 1, 3)
    base = torch.linalg.solve((eye + block)[:, None], tiles - block[:, None], left=False)   # (W' - D)(I + D)^-1
    return base.permute(0, 2, 1, 3).reshape(out_features, in_features) - merged


def _count(opts, fan_in, fan_out) -> int:
    return opts["rank"] * (opts["mini_rank"] if opts["mode"] == "mini" else fan_out)


MISS = AdapterKind(
    name="miss",
    options={"rank": Option(int, 64, positive=True), "mode": Option(str, "balance", choices=MODES),
             "mini_rank": Option(int, 1, positive=True), "init": Option(str, "zeros", choices=("zeros", "random")),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    undo_delta=_undo,
    param_count=_count,
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    # PEFT: r <= in_features; mode bat tiles W with r x r blocks, so r also divides out
    rank_limit=lambda opts, fan_in, fan_out: (min(fan_in, fan_out), "min(in, out) in mode bat")
    if opts.get("mode") == "bat" else (fan_in, "in"),
)
