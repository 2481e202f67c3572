"""LoRA (Hu et al. 2021): y = W x + s * B A x, with A (r x in), B (out x r), s = alpha / r.

rsLoRA scaling (`use_rslora`) uses s = alpha / sqrt(r). With the default and gaussian inits B
starts at zero, so an inserted LoRA leaves the function unchanged bit for bit; the merge
identity is W x + s B A x == (W + s B A) x.

PiSSA (`init: pissa`, Meng et al. 2024): with W = U S V^T, A = sqrt(S_r / s) V_r^T and
B = U_r sqrt(S_r / s), so s B A is W's top-r part, and the base weight becomes the residual
W - s B A (a new tensor). The function is unchanged up to rounding ("close").

OLoRA (`init: olora`, Buyukakyuz 2024), as PEFT's `init_lora_weights="olora"`: with the reduced QR
W = Q R (in float32), B = Q[:, :r] (orthonormal columns) and A = R[:r] (upper trapezoidal), taken
as they are (the scale is not folded in), and the base weight becomes W - s B A, as for PiSSA
("close"; recomputed from W for loaded adapters, as PEFT recomputes it on load).

Orthogonal (`init: orthogonal`, PEFT's `init_lora_weights="orthogonal"`, even r only): Q = the QR
factor of an r x r Gaussian; A = (G_a Q_odd)^T / 10 and B = G_b^T Q_even / 10 with Q_odd = Q's rows
0, 2, 4, .. and Q_even = its rows 1, 3, 5, .. (PEFT's names, counting from 1) and G_a (in x r/2),
G_b (r/2 x out) Gaussian, drawn in PEFT's order (r x r, then G_a, then G_b). Q_even Q_odd^T = 0, so B A = 0 in
exact arithmetic and the base weight is left alone (PEFT leaves it too); in floating point B A is
about 1e-8, not 0, so the insert is the identity up to rounding ("close"), not bit for bit.

CorDA (`init: corda`, `corda_mode: ipm/kpm`, Yang et al. 2024): A and B from the SVD of W times the
covariance of the site's inputs over the compile's example inputs (surgeon.adapters.corda,
surgeon.calibration), r largest (ipm) or smallest (kpm) components; the base keeps the residual
("close"), as for PiSSA.

EVA (`init: eva`, Paischer et al. 2024, PEFT's init_lora_weights "eva"; `eva_rho`, `eva_whiten`,
`eva_adjust_alpha`): A = the r leading principal directions of the site's inputs over the compile's
example inputs (surgeon.adapters.eva, surgeon.calibration), B = 0, the base left alone, so the insert is
the identity bit for bit; `eva_rho` > 1 moves rank between sites by explained variance (per-site
`rank` / `alpha`, PEFT's rank_pattern / alpha_pattern). Linear and GPT-2 Conv1D sites only.

LoRA-GA (`init: lora_ga`, Wang et al. 2024, PEFT's init_lora_weights "lora_ga"; `lora_ga_direction`,
`lora_ga_scale`, `lora_ga_gamma`): A and B from the SVD of the gradient of a next-token loss with respect
to W on the compile's example inputs (surgeon.adapters.lora_ga, surgeon.grad_calibration); the base keeps
the residual W - s B A ("close"). Linear and GPT-2 Conv1D sites only.

LoftQ (`init: loftq`, Li et al. 2023; `loftq_bits` 4 or 8, `loftq_iter`): the base weight becomes
its quantized round trip Q (NF4 or row-wise int8, simulated in float32: surgeon.adapters.loftq) and
s B A the rank-r SVD fit of W - Q, alternated `loftq_iter` times. Q + s B A only approximates W, so
the insert changes the function ("none"); Q is recomputed from W for a loaded adapter.

On a conv site (conv1d / conv2d / conv3d, `padding="same"` too), in = in_channels * prod(kernel):
A maps each kernel patch to r values (a conv with the site's kernel, stride, padding, dilation)
and B is a 1x1 conv; the delta is (s B A).view(W.shape).

On a grouped conv (groups G, r a multiple of G) the branch is PEFT's: A stays ungrouped over all
in_channels, B is a grouped 1x1 conv, out x (r / G), so output block g reads only rank block g of
A's output. The update s B' A (B' the block-diagonal out x r spread of B) reads every input
channel while W reads only its group's, so W + s B' A is no grouped weight: merge is refused, as
PEFT refuses it. PiSSA (an SVD of a dense W) is refused on grouped convs.

`dropout` (PEFT's lora_dropout) drops the branch's input in train mode, as PEFT does:
y + s B A dropout(x). In eval it is the identity (surgeon.modes), so merge stays exact.

`bias: true` (PEFT's lora_bias) gives B a bias b_B (`lora_bias`, out, zero at init):
y + s (B A x + b_B). The merge adds s B A to W and s b_B to the base bias (bias_map), so it needs
a base bias: on a site without one (the site option `biased`, read from the graph) the merge is
refused, as PEFT refuses it. Linear and GPT-2 Conv1D sites only.

On a 3-D parameter (fused MoE experts W: E x out x in, targeted by name) the adapter changes the
weight, not an op: every forward reads W + s * D with D[e] = B_e A_e, so it holds whatever ops
consume W (transformers' grouped_mm, batched mm or indexed linear). The factors keep PEFT's
layout for such parameters (its `target_parameters`): A is (r E) x in with expert e's rows at
e*r .. e*r + r - 1 (expert-major), B is out x (r E) with expert e's columns at e, E + e, ...
(rank-major, stride E); s = alpha / r with r the per-expert rank. Experts stored E x in x out
(the module says `is_transposed`, as GPT-OSS's do) read W + s * D^T per expert, as PEFT does.
Merge adds s * D to W; PiSSA and dropout are refused there (a dropout of x does not factor out
of W + s D, PEFT refuses it).
"""
from __future__ import annotations

import math

import torch

from ..errors import SpecError
from ..graph import get_tensor
from ..rules import CONV_OPS, Pattern, find
from . import AdapterKind, EagerBranch, Option, merge_dtype
from .corda import corda_factors
from .eva import eva_components
from .lora_ga import DIRECTIONS, SCALES, lora_ga_factors
from .loftq import loftq_base, loftq_factors
from .mosa import with_mosa

aten = torch.ops.aten


def lora_scale(opts: dict) -> float:
    """The LoRA scaling factor alpha/r (or alpha/sqrt(r) with rsLoRA; kinds without the option: alpha/r)."""
    rank, alpha = opts["rank"], opts["alpha"] if opts["alpha"] is not None else opts["rank"]
    return alpha / math.sqrt(rank) if opts.get("use_rslora") else alpha / rank


def kaiming_uniform(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s * B @ A equal to the top-`rank` singular part of `weight` (out x in)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(S[:rank] / scale)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:rank], Q[:, :rank]) of the reduced QR W = Q R of `weight` (out x in); the spec check
    keeps rank <= min(out, in), so Q has the rank columns."""
    Q, R = torch.linalg.qr(weight.float())
    return R[:rank].contiguous(), Q[:, :rank].contiguous()


def orthogonal_factors(rank: int, in_features: int, out_features: int,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A = 0 up to rounding: A's columns span the even-indexed rows of a random
    orthogonal r x r matrix, B's rows the odd-indexed ones (PEFT's draws, in its order)."""
    if rank % 2:
        raise SpecError("init", f"orthogonal needs an even rank (it pairs the rows of an r x r orthogonal "
                                f"matrix; PEFT refuses an odd one too), got rank {rank}")
    Q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen))
    A = (torch.randn(in_features, rank // 2, generator=gen) @ Q[0::2]).T / 10.0
    B = torch.randn(rank // 2, out_features, generator=gen).T @ Q[1::2] / 10.0
    return A.contiguous(), B.contiguous()


# as the papers write them, for messages
INIT_NAMES = {"pissa": "PiSSA", "loftq": "LoftQ", "corda": "CorDA", "eva": "EVA", "lora_ga": "LoRA-GA"}

# the inits that rewrite the base weight at insertion (into a residual, or LoftQ's quantized Q)
BASE_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def lora_init(opts, in_features, out_features, dtype, gen, weight, covariance=None):
    """LoRA's A and B for one site (PiSSA, OLoRA, LoftQ read the base weight; CorDA also its inputs' covariance,
    EVA only their scatter matrix, LoRA-GA the loss gradient of W, passed as `covariance`: without it, as for a
    loaded adapter that holds its A, EVA's A is a zero placeholder of A's shape)."""
    rank = opts["rank"] * opts.get("experts", 1)   # an expert stack keeps every expert's rank-r factors side by side
    factors = {"pissa": lambda: pissa_factors(weight, rank, lora_scale(opts)),
               "olora": lambda: olora_factors(weight, rank),
               "orthogonal": lambda: orthogonal_factors(rank, in_features, out_features, gen),
               "loftq": lambda: loftq_factors(weight, rank, lora_scale(opts), opts["loftq_bits"],
                                              opts["loftq_iter"]),
               "corda": lambda: corda_factors(weight, covariance, rank, lora_scale(opts), opts["corda_mode"]),
               "lora_ga": lambda: lora_ga_factors(weight, covariance, rank, lora_scale(opts), opts),
               }.get(opts["init"])
    if factors is not None:   # both factors non-zero
        A, B = factors()
        return {"lora_A": A.to(dtype), "lora_B": B.to(dtype)}
    if opts["init"] == "gaussian":
        A = torch.empty(rank, in_features).normal_(0.0, 1.0 / opts["rank"], generator=gen)
    elif opts["init"] == "eva":
        A = torch.zeros(rank, in_features, device="meta" if weight is not None and weight.is_meta else None) \
            if covariance is None else eva_components(covariance, rank, opts["eva_whiten"])
    else:
        A = kaiming_uniform((rank, in_features), gen)
    tensors = {"lora_A": A.to(dtype), "lora_B": torch.zeros(out_features, rank // opts.get("groups", 1), dtype=dtype)}
    if opts.get("bias"):
        tensors["lora_bias"] = torch.zeros(out_features, dtype=dtype)
    return tensors


def _forward(branch, x, y, params, opts):
    if "experts" in opts:   # a 3-D parameter site: y is the weight; the weight read becomes W + s * D
        update = expert_product(branch, params["lora_A"], params["lora_B"], opts["experts"], opts.get("transposed"))
        return branch.op(torch.ops.aten.add.Tensor, y, update, alpha=lora_scale(opts))
    # y + s * B(A x): two GEMMs and one add (aten.add's alpha carries the scale); on a conv site
    # A is a conv with the site's kernel, stride, padding, dilation and B a 1x1 conv, and
    # conv(x, W) + s conv1x1(conv(x, A), B) == conv(x, W + s (B A).view(W.shape))
    x = branch.dropout(x, opts.get("dropout", 0.0))
    update = branch.channel_map(branch.site_map(x, params["lora_A"]), params["lora_B"], groups=branch.conv_groups)
    if "lora_bias" in params:   # B's bias, inside the scale: y + s (B A x + b_B), as PEFT's lora_B Linear
        update = branch.op(torch.ops.aten.add.Tensor, update, params["lora_bias"])
    return branch.op(torch.ops.aten.add.Tensor, y, update, alpha=lora_scale(opts))


def lora_delta(params, opts, weight=None):
    """(s B) @ A in merge_dtype(weight) (the merge adds it to the base weight); on a grouped conv, the
    dense out x (in * prod(kernel)) map of the branch, with B spread block-diagonally."""
    dtype = merge_dtype(weight)
    if "experts" in opts:
        A, B = params["lora_A"].to(dtype), params["lora_B"].to(dtype)
        return expert_product(EagerBranch((A.shape[1], B.shape[0])), A, B, opts["experts"],
                              opts.get("transposed")).mul_(lora_scale(opts))
    B = _spread(params["lora_B"].to(dtype) * lora_scale(opts), opts.get("groups", 1))   # s on the small factor:
    return B @ params["lora_A"].to(dtype)                                                # no pass over s B A


def expert_product(branch, A, B, experts: int, transposed: bool = False):
    """The E x out x in stack of B_e @ A_e from PEFT's expert layout: A's (r E) rows are expert-major
    (view E x r x in), B's (r E) columns rank-major (view out x r x E, experts to the front). For
    experts stored E x in x out (`transposed`, GPT-OSS) the stack of (B_e A_e)^T = A_e^T B_e^T."""
    per_expert_A = branch.op(aten.view.default, A, [experts, -1, branch.in_features])
    per_expert_B = branch.op(aten.permute.default,
                             branch.op(aten.view.default, B, [branch.out_features, -1, experts]), [2, 0, 1])
    if transposed:
        return branch.op(aten.bmm.default, branch.op(aten.permute.default, per_expert_A, [0, 2, 1]),
                         branch.op(aten.permute.default, per_expert_B, [0, 2, 1]))
    return branch.op(aten.bmm.default, per_expert_B, per_expert_A)


def _spread(B: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped 1x1 conv's out x (r / G) weight as the out x r matrix it applies: output block g
    reads rank block g only, so the row blocks go on the diagonal."""
    if groups == 1:
        return B
    return torch.block_diag(*B.reshape(groups, B.shape[0] // groups, B.shape[1]))


def _conv_groups(opts: dict, groups: int) -> str:
    """Why LoRA cannot sit on a conv with `groups` > 1 ("" when it can): its grouped 1x1 B splits
    the rank into `groups` equal blocks, as PEFT's does."""
    if opts["rank"] % groups:
        return f"LoRA's rank {opts['rank']} is not a multiple of groups (PEFT refuses it too)"
    if opts["init"] in ("pissa", "loftq", "corda", "lora_ga"):
        return f"{INIT_NAMES[opts['init']]} splits a dense weight's SVD; a grouped conv's weight is block-diagonal"
    if opts["init"] in ("olora", "orthogonal"):
        return f"the {opts['init']} init makes a dense out x r B, a grouped conv's B is out x (r / groups)"
    return ""


def _site_groups(gm, path, weight_target, opts):
    """{"groups": G} for a grouped conv site (init and merge read it), {"experts": E} for a 3-D
    parameter site (its path is the parameter's own name), {} for any other site."""
    weight = get_tensor(gm, weight_target)
    if path == weight_target:
        if weight_target in gm.meta.get("surgeon_transposed_params", ()):   # E x in x out (GPT-OSS)
            return {"experts": int(weight.shape[0]), "transposed": True}
        return {"experts": int(weight.shape[0])}
    if weight.dim() < 3:   # a linear site: no conv to look for (this runs once per site, so no graph scan)
        return {}
    groups = {m["groups"] or 1 for m in find(gm, Pattern(CONV_OPS, path))
              if m["weight"].target == weight_target}
    return {"groups": max(groups)} if max(groups, default=1) > 1 else {}


def _merge_refusal(opts):
    """A grouped conv site cannot take its dense delta into its grouped weight; B's bias needs a base bias."""
    if opts.get("groups", 1) > 1:
        return ("a LoRA on a grouped conv reads every input channel, so the merged weight would not be "
                "grouped (PEFT refuses this merge too)")
    if opts.get("bias") and opts.get("biased") is False:
        return "its lora_bias needs a bias in the base layer to merge into, which the layer has not (PEFT refuses too)"
    if opts.get("bias") and opts.get("biased") is None:
        return ("it is not known whether the adapter's layers have a bias for its lora_bias to merge into; insert it "
                "into the model and merge there")
    return ""


def _site_options(gm, path, weight_target, opts):
    """Conv groups (`_site_groups`) and, with `bias`, whether the site's op adds a base bias (`biased`)."""
    found = _site_groups(gm, path, weight_target, opts)
    if opts.get("bias"):
        pattern = Pattern(("linear", "addmm"), path)
        calls = [m for ref in gm.graph.find_nodes(op="get_attr", target=weight_target) for u in ref.users
                 if (m := pattern.match(u)) is not None]
        if not calls:
            raise ValueError(f"lora: bias (PEFT's lora_bias) is supported on linear and Conv1D sites only, and "
                             f"'{path}' is not one")
        found["biased"] = all(m["bias"] is not None for m in calls)
    return found


def _bias_map(params, opts, bias, undo):
    """b + s b_B (undo: b' - s b_B), float64; None without a lora_bias."""
    if "lora_bias" not in params:
        return None
    return bias + (-1.0 if undo else 1.0) * lora_scale(opts) * params["lora_bias"].double().to(bias.device)


def _pissa_base(init_params, opts, weight):
    # W_res = W - s B0 A0: the residual the adapter's principal (PiSSA) or QR (OLoRA) part is taken out of;
    # the orthogonal init's B0 A0 is 0 up to rounding, and PEFT leaves W alone for it
    # LoftQ: the base becomes Q, the dequantized weight the loop ends with (Q - W added to W)
    if opts["init"] == "loftq":
        return loftq_base(weight, opts["rank"], opts["loftq_bits"], opts["loftq_iter"]).to(
            merge_dtype(weight)).sub_(weight.to(merge_dtype(weight)))
    residual = ("pissa", "olora", "corda", "lora_ga")
    return lora_delta(init_params, opts, weight).neg_() if opts["init"] in residual else None


def _param_refusal(opts):
    """Why these options cannot sit on a 3-D expert parameter ("" when they can)."""
    if opts.get("dropout"):
        return "LoRA dropout drops the input, which does not factor out of W + s * B A (PEFT refuses it too)"
    if opts["init"] in ("pissa", "loftq", "corda", "eva", "lora_ga"):
        return f"{INIT_NAMES[opts['init']]} needs one SVD per expert, which surgeon does not do"
    if opts["init"] in ("olora", "orthogonal"):
        return f"the {opts['init']} init makes one rank-r pair for a 2-D weight, not one per expert"
    return ""


LORA_OPTIONS = {
    "rank": Option(int, 8, positive=True),
    "alpha": Option((int, float), None),
    "use_rslora": Option(bool, False),
    "init": Option(str, "default", choices=("default", "gaussian", "pissa", "olora", "orthogonal")),
    "dropout": Option(float, 0.0, bounds=(0.0, 1.0)),   # PEFT's lora_dropout: on the branch input, train mode only
}

LORA = AdapterKind(
    name="lora",
    options={**LORA_OPTIONS,
             "init": Option(str, "default", choices=("default", "gaussian", "pissa", "olora", "orthogonal", "loftq",
                                                     "corda", "eva", "lora_ga")),
             "corda_mode": Option(str, "ipm", choices=("ipm", "kpm")),   # init corda: PEFT's corda_method
             "eva_rho": Option((int, float), 2.0, bounds=(1.0, math.inf)),   # init eva: EvaConfig's rho, tau, whiten,
             "eva_whiten": Option(bool, False),                    # adjust_scaling_factors (tau: see eva.py)
             "eva_adjust_alpha": Option(bool, True),
             "lora_ga_direction": Option(str, "ArB2r", choices=DIRECTIONS),   # init lora_ga: PEFT's LoraGAConfig
             "lora_ga_scale": Option(str, "stable", choices=SCALES),
             "lora_ga_gamma": Option((int, float), 16, positive=True),
             "loftq_bits": Option(int, 4, choices=(4, 8)),   # init loftq: NF4 or row-wise int8 (PEFT's loftq_config)
             "loftq_iter": Option(int, 1, positive=True),
             "bias": Option(bool, False),     # PEFT's lora_bias: a bias on B (linear and Conv1D sites)
             "biased": Option(bool, None)},   # per site with `bias`, read from the graph (whether the base has one)
    init=lora_init,
    forward=_forward,
    delta_weight=lora_delta,
    bias_map=_bias_map,
    param_count=lambda opts, fan_in, fan_out: opts.get("experts", 1) * (opts["rank"] * fan_in
                                                                         + fan_out * opts["rank"] // opts.get("groups", 1))
    + (fan_out if opts.get("bias") else 0),
    base_delta=_pissa_base,
    # LoftQ: Q + s B A only approximates W (what the rank-r fit cannot hold of the quantization error remains)
    init_check=lambda opts: "none" if opts["init"] == "loftq" else
    "close" if opts["init"] in ("pissa", "olora", "orthogonal", "corda", "lora_ga") else "exact",
    merge_refusal=_merge_refusal,
    site_options=_site_options,
    site_ops=("linear", "addmm", "conv2d", "conv1d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
              "param"),
    conv_groups=_conv_groups,
    param_refusal=_param_refusal,
    # PEFT takes any rank; PiSSA, OLoRA and LoftQ keep the top-r singular / QR part of a matrix of W's shape,
    # which has min(in, out)
    rank_limit=lambda opts, fan_in, fan_out: (min(fan_in, fan_out) // 2, "min(in, out) / 2 with init lora_ga (2r "
                                                                          "gradient components)")
    if opts.get("init") == "lora_ga" else (min(fan_in, fan_out), "min(in, out) with init pissa / olora / loftq / corda")
    if opts.get("init") in BASE_INITS else None,
    # CorDA: the inputs' (peak-scaled) covariance; EVA: the scatter matrix of the centered inputs; LoRA-GA: dL/dW
    calibrated=lambda opts: {"corda": "covariance", "eva": "scatter", "lora_ga": "gradient"}.get(opts.get("init"),
                                                                                              False),
)
LORA = with_mosa(LORA, ("lora_A", "lora_B", "lora_bias"))   # MoSA's mosa_modules / mosa_seed (surgeon.adapters.mosa)
