"""PEANuT (Zhong et al. 2024): y + s · ΔW x with ΔW a small nonlinear network of the base weight W.

The network reads W's columns: each of the `in` rows of Wᵀ (a vector of `out` values) goes through

    h = act(Wᵀ Aᵀ)                                   A: r x out, the input projection
    encoders e_1 .. e_d:  h = act(h e_iᵀ), keeping each input h as a residual   (r x r each)
    decoders g_1 .. g_d:  h = act(h g_iᵀ) + the residual saved before e_{d+1-i}  (r x r each)
    ΔWᵀ = h Bᵀ                                       B: out x r, the output projection

with d = `depth`, act = `activation` and s = `scaling` (PEFT's r, depth, act_fn, scaling). The
nonlinearity acts on the weight, never on the activations: the site's output is still linear in x,
y + s · x ΔWᵀ, so the adapter is a weight update that depends nonlinearly on W and its parameters.
The graph builds ΔWᵀ from the site's weight on every forward (as PEFT does), then one GEMM of x.

Init (PEFT's init_weights): `default` (True) draws A and every encoder and decoder kaiming-uniform
and sets B = 0: ΔW is exact zeros and the insert is the identity bit for bit; `random` (False)
draws B kaiming-uniform too and changes the function. A site trains r (2 out + 2 d r) parameters.

Merge: exact, W' = W + s ΔW(W), computed from the weight it lands on (as PEFT computes it from the
base weight before its merge). Unmerge is refused: W' = W + s ΔW(W) holds no way back to W (ΔW is a
nonlinear function of W; PEFT unmerges by restoring a copy of W it keeps beside the layer).
"""
from __future__ import annotations

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype
from .lora import kaiming_uniform

MAX_DEPTH = 32   # encoder / decoder pairs a PEFT checkpoint may name (peft_formats' key table)

# PEFT's act_fn names (transformers' ACT2FN keys) and the aten op each is; "linear" is the identity
ACTIVATIONS = {"relu": (aten.relu.default, {}), "gelu": (aten.gelu.default, {}),
               "gelu_new": (aten.gelu.default, {"approximate": "tanh"}),
               "gelu_pytorch_tanh": (aten.gelu.default, {"approximate": "tanh"}),
               "silu": (aten.silu.default, {}), "swish": (aten.silu.default, {}), "tanh": (aten.tanh.default, {}),
               "sigmoid": (aten.sigmoid.default, {}), "linear": (None, {})}


def layer_names(depth: int) -> tuple[list[str], list[str]]:
    """The encoder and decoder parameter names of a network of this depth."""
    return [f"peanut_encoder_{i}" for i in range(depth)], [f"peanut_decoder_{i}" for i in range(depth)]


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank, depth = opts["rank"], opts["depth"]
    encoders, decoders = layer_names(depth)
    params = {"peanut_A": kaiming_uniform((rank, out_features), gen)}
    params.update({name: kaiming_uniform((rank, rank), gen) for name in encoders + decoders})
    params["peanut_B"] = kaiming_uniform((out_features, rank), gen) if opts["init"] == "random" \
        else torch.zeros(out_features, rank)
    return {name: tensor.to(dtype) for name, tensor in params.items()}


def _act(branch, h, opts):
    op, kwargs = ACTIVATIONS[opts["activation"]]
    return h if op is None else branch.op(op, h, **kwargs)


def weight_network(branch, weight_t, params, opts):
    """ΔWᵀ (in x out) from Wᵀ (in x out): graph code, or eager on tensors through an EagerBranch."""
    encoders, decoders = layer_names(opts["depth"])
    h = _act(branch, branch.linear(weight_t, params["peanut_A"]), opts)
    residuals = []
    for name in encoders:
        residuals.append(h)
        h = _act(branch, branch.linear(h, params[name]), opts)
    for name, residual in zip(decoders, reversed(residuals)):
        h = branch.add(_act(branch, branch.linear(h, params[name]), opts), residual)
    return branch.linear(h, params["peanut_B"])


def _forward(branch, x, y, params, opts):
    weight_t = branch.weight if branch.transposed else branch.op(aten.t.default, branch.weight)   # in x out
    delta_t = weight_network(branch, weight_t, params, opts)
    return branch.add(y, branch.op(aten.matmul.default, x, delta_t), alpha=opts["scaling"])


def _delta(params, opts, weight):
    """s ΔW(W) (out x in) in merge_dtype(weight), from the weight it lands on."""
    dtype = merge_dtype(weight)
    p = {name: t.to(dtype=dtype, device=weight.device) for name, t in params.items()}
    delta_t = weight_network(EagerBranch((weight.shape[1], weight.shape[0])), weight.detach().to(dtype).t(), p, opts)
    return delta_t.t().mul(opts["scaling"]).contiguous()


PEANUT = AdapterKind(
    name="peanut",
    options={"rank": Option(int, 32, positive=True),
             "depth": Option(int, 0, bounds=(0, MAX_DEPTH)),
             "activation": Option(str, "relu", choices=tuple(ACTIVATIONS)),
             "scaling": Option((int, float), 1.0),
             "init": Option(str, "default", choices=("default", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    refuse_unmerge="PEANuT's ΔW is a nonlinear function of the base weight W, so the merged W + s·ΔW(W) does "
                   "not give W back (PEFT unmerges by restoring a copy of W it keeps)",
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (2 * fan_out + 2 * opts["depth"] * opts["rank"]),
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT bounds no r
)
