"""LoRA (Hu et al. 2021): y = W x + s * B A x, with A (r x in), B (out x r), s = alpha / r.

rsLoRA scaling (`use_rslora`) uses s = alpha / sqrt(r). With the default and gaussian inits B
starts at zero, so an inserted LoRA leaves the function unchanged bit for bit; the merge
identity is W x + s B A x == (W + s B A) x.

PiSSA (`init: pissa`, Meng et al. 2024): with W = U S V^T, A = sqrt(S_r / s) V_r^T and
B = U_r sqrt(S_r / s), so s B A is W's top-r part, and the base weight becomes the residual
W - s B A (a new tensor). The function is unchanged up to rounding ("close").

On an (ungrouped) conv2d site, in = in_channels * kh * kw: A maps each kernel patch to r values
(a conv with the site's kernel) and B is a 1x1 conv; the delta is (s B A).view(out, in, kh, kw).

`dropout` (PEFT's lora_dropout) drops the branch's input in train mode, as PEFT does:
y + s B A dropout(x). In eval it is the identity (surgeon.modes), so merge stays exact.
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, Option


def lora_scale(opts: dict) -> float:
    """The LoRA scaling factor alpha/r (or alpha/sqrt(r) with rsLoRA)."""
    rank, alpha = opts["rank"], opts["alpha"] if opts["alpha"] is not None else opts["rank"]
    return alpha / math.sqrt(rank) if opts["use_rslora"] else alpha / rank


def kaiming_uniform(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s * B @ A equal to the top-`rank` singular part of `weight` (out x in)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(S[:rank] / scale)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def lora_init(opts, in_features, out_features, dtype, gen, weight):
    """LoRA's A and B for one site (PiSSA reads the base weight)."""
    rank = opts["rank"]
    if opts["init"] == "pissa":
        A, B = pissa_factors(weight, rank, lora_scale(opts))
        return {"lora_A": A.to(dtype), "lora_B": B.to(dtype)}
    if opts["init"] == "gaussian":
        A = torch.empty(rank, in_features).normal_(0.0, 1.0 / rank, generator=gen)
    else:
        A = kaiming_uniform((rank, in_features), gen)
    return {"lora_A": A.to(dtype), "lora_B": torch.zeros(out_features, rank, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    # y + s * B(A x): two GEMMs and one add (aten.add's alpha carries the scale); on a conv site
    # A is a conv with the site's kernel, stride, padding, dilation and B a 1x1 conv, and
    # conv(x, W) + s conv1x1(conv(x, A), B) == conv(x, W + s (B A).view(W.shape))
    x = branch.dropout(x, opts.get("dropout", 0.0))
    update = branch.channel_map(branch.site_map(x, params["lora_A"]), params["lora_B"])
    return branch.op(torch.ops.aten.add.Tensor, y, update, alpha=lora_scale(opts))


def lora_delta(params, opts, weight=None):
    """s * B @ A in float64 (the merge adds it to the base weight)."""
    return lora_scale(opts) * (params["lora_B"].double() @ params["lora_A"].double())


def _pissa_base(init_params, opts, weight):
    # W_res = W - s B0 A0: the residual the adapter's principal part is taken out of
    return -lora_delta(init_params, opts) if opts["init"] == "pissa" else None


LORA_OPTIONS = {
    "rank": Option(int, 8, positive=True),
    "alpha": Option((int, float), None),
    "use_rslora": Option(bool, False),
    "init": Option(str, "default", choices=("default", "gaussian", "pissa")),
    "dropout": Option(float, 0.0, bounds=(0.0, 1.0)),   # PEFT's lora_dropout: on the branch input, train mode only
}

LORA = AdapterKind(
    name="lora",
    options=LORA_OPTIONS,
    init=lora_init,
    forward=_forward,
    delta_weight=lora_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out),
    base_delta=_pissa_base,
    init_check=lambda opts: "close" if opts["init"] == "pissa" else "exact",
    site_ops=("linear", "addmm", "conv2d"),
)
