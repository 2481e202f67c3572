"""MoSA (Zhang et al. 2024, Mixture of Sparse Adapters) as an option of the `lora` and `bottleneck` kinds.

With `mosa_modules: N` (N > 1) each trained parameter P of a site (LoRA's lora_A, lora_B and lora_bias;
the bottleneck's adapter_down and adapter_up) is split into N sparse modules that do not overlap: a fixed
random assignment `mosa_<P>` (P's shape, integers 0 .. N-1; a frozen tensor, saved with the adapter) says
which module each entry belongs to. It is balanced: a random permutation of P's entries, entry of rank k
in module k mod N, so every module holds floor(numel / N) or ceil(numel / N) entries of every parameter
(N larger than the smallest parameter's entry count is refused: some module would miss it). The
assignment is drawn from `mosa_seed` and P's shape alone, so sites of one shape share it and a compile with
the same seed draws the same one.

Training (the compiled module in `.train()`): every forward draws one module k per site and the branch
reads P * [mosa_P == k] in place of P, so the gradient is zero outside module k: a step of plain SGD moves
only module k's entries (an optimizer with momentum or weight decay still moves the others by its own
state, as it would any parameter with a zero gradient). k comes from torch's default CPU generator, as
dropout's masks do: torch.manual_seed makes the sequence reproducible, and activation checkpointing's
recompute draws the same k (it restores the generator's state).

Eval (and every numeric check, merge, export of values): the branch reads P itself: the modules together
are the dense adapter (their masks partition P, so the sum of the modules is P), and the function is the
plain kind's bit for bit. Merge, unmerge, combine and parameter counts are the plain kind's: the
assignment tensors are frozen and take no part in them. The pass `mosa-merge` (surgeon.passes.mosa_merge)
folds the module structure away, leaving a plain adapter of the kind with the same parameters.
"""
from __future__ import annotations

import dataclasses
import zlib

import torch

from ..errors import SpecError
from . import AdapterKind, Option

PREFIX = "mosa_"

MOSA_OPTIONS = {
    "mosa_modules": Option(int, 1, positive=True),   # N: 1 is the plain adapter (no assignment, no sampling)
    "mosa_seed": Option(int, 0),                     # draws the assignment
}


def mask_name(param: str) -> str:
    """The name of the module assignment of a parameter: lora_A -> mosa_lora_A."""
    return PREFIX + param


def is_mosa(name: str) -> bool:
    """Whether a site parameter name is a MoSA assignment (not a parameter of the plain kind)."""
    return name.startswith(PREFIX)


def modules_of(opts: dict) -> int:
    return int(opts.get("mosa_modules") or 1)


def _id_dtype(modules: int) -> torch.dtype:
    """The narrowest integer dtype that holds module ids 0 .. modules - 1."""
    return torch.uint8 if modules <= 256 else torch.int16 if modules <= 32768 else torch.int32


def partition(shape: tuple[int, ...], modules: int, seed: int) -> torch.Tensor:
    """Module ids (0 .. modules - 1) for the entries of a tensor of `shape`: a random permutation of the
    entries, the entry of rank k in module k mod `modules` (balanced). Drawn from `seed` and the shape."""
    count = 1
    for size in shape:
        count *= int(size)
    gen = torch.Generator().manual_seed(zlib.crc32(f"mosa:{seed}:{list(shape)}".encode()))
    order = torch.randperm(count, generator=gen)
    ids = torch.empty(count, dtype=torch.int64)
    ids[order] = torch.arange(count) % modules
    return ids.view(tuple(shape)).to(_id_dtype(modules))


def draw(training: bool, modules: int) -> int:
    """The module a training forward uses (torch's default CPU generator), -1 in eval: every module."""
    return int(torch.randint(modules, ())) if training else -1


def select(index: int, param: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """`param` itself for index -1 (eval: the dense adapter), else its entries in module `index`, zero
    elsewhere (the gradient to `param` is zero outside the module)."""
    if index < 0:
        return param
    return param * (assignment == index).to(param.dtype)


def with_mosa(kind: AdapterKind, partitioned: tuple[str, ...]) -> AdapterKind:
    """`kind` with the options mosa_modules / mosa_seed: its init adds a frozen assignment per parameter in
    `partitioned` that it makes, and its forward reads the sampled module's entries in train mode."""
    base_init, base_forward = kind.init, kind.forward

    def init(opts, in_features, out_features, dtype, gen, weight, **extra):
        params = base_init(opts, in_features, out_features, dtype, gen, weight, **extra)
        modules = modules_of(opts)
        if modules == 1:
            return params
        sizes = {p: params[p].numel() for p in partitioned if p in params}
        smallest = min(sizes, key=sizes.get)
        if modules > sizes[smallest]:
            raise SpecError("mosa_modules", f"{modules} modules need at least {modules} entries in every trained "
                                            f"parameter of a site, and {smallest} of a {in_features} -> "
                                            f"{out_features} site has {sizes[smallest]} (at most "
                                            f"{sizes[smallest]} modules there)")
        for p in sizes:
            params[mask_name(p)] = partition(tuple(params[p].shape), modules, opts.get("mosa_seed", 0))
        return params

    def forward(branch, x, y, params, opts):
        masked = [p for p in partitioned if p in params and mask_name(p) in params]
        if modules_of(opts) == 1 or not masked:
            return base_forward(branch, x, y, params, opts)
        index = branch.when_training(draw, modules_of(opts))
        chosen = {p: t for p, t in params.items() if not is_mosa(p)}
        for p in masked:
            chosen[p] = branch.op(select, index, params[p], params[mask_name(p)])
            meta = getattr(params[p], "meta", {})   # graph nodes carry a val; eager tensors have no meta
            if "val" in meta:
                chosen[p].meta["val"] = meta["val"]
        return base_forward(branch, x, y, chosen, opts)

    return dataclasses.replace(kind, options={**kind.options, **MOSA_OPTIONS}, init=init, forward=forward,
                               frozen=kind.frozen | {mask_name(p) for p in partitioned})
