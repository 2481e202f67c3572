"""P-tuning (Liu et al. 2021, GPT Understands, Too): virtual tokens made by a prompt encoder.

The site and the graph rewrite are prompt tuning's (surgeon.adapters.virtual_tokens): v tokens in
front of the input embeddings, every sequence-derived length made n + v. The tokens are not trained
directly: a table `prompt_embedding` (v x hidden) goes through PEFT's MLP prompt encoder, three
linears with ReLUs between them,

    P = W4 relu(W2 relu(W0 E + b0) + b2) + b4      W0: h x hidden, W2: h x h, W4: hidden x h

(h = `encoder_hidden_size`, default the hidden size, as PEFT fills it), built in the graph so that the
table and all six encoder tensors train. Init follows PEFT's modules: E ~ N(0, 1) (nn.Embedding), each
linear as nn.Linear (kaiming-uniform weight, bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))); it changes the
function. PEFT's LSTM encoder is refused (encoder "lstm"). Merge is refused: nothing folds into a weight.

PEFT saves only the encoder's output, P (`prompt_embeddings`), and loads it without the encoder: a
P_TUNING checkpoint imports as a prompt_tuning adapter holding P (the same function), and a p_tuning
adapter exports as P_TUNING with P computed from its encoder.
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, Option, aten
from .virtual_tokens import prepend, refuse_merge

LAYERS = (("mlp_0", "in", "h"), ("mlp_2", "h", "h"), ("mlp_4", "h", "in"))   # PEFT's mlp_head.0 / .2 / .4


def _check(opts: dict) -> None:
    if opts.get("encoder") == "lstm":
        raise ValueError("p_tuning: encoder 'lstm' (PEFT's LSTM reparameterization, a bidirectional LSTM before "
                         "the MLP) is not supported; use encoder 'mlp'")


def encoder_size(opts: dict, hidden: int) -> int:
    return opts.get("encoder_hidden_size") or hidden


def _init(opts, in_features, out_features, dtype, gen, weight):
    _check(opts)
    sizes = {"in": in_features, "h": encoder_size(opts, in_features)}
    params = {"prompt_embedding": torch.randn(opts["num_virtual_tokens"], in_features, generator=gen)}
    for name, fan_in, fan_out in LAYERS:
        bound = 1 / math.sqrt(sizes[fan_in])   # nn.Linear's init: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(in), ..)
        params[f"{name}_weight"] = (torch.rand(sizes[fan_out], sizes[fan_in], generator=gen) * 2 - 1) * bound
        params[f"{name}_bias"] = (torch.rand(sizes[fan_out], generator=gen) * 2 - 1) * bound
    return {k: v.to(device=weight.device, dtype=dtype) for k, v in params.items()}


def encode(branch, params) -> object:
    """The encoder's output P (v x hidden), as graph code (or eagerly on tensors with an EagerBranch)."""
    h = params["prompt_embedding"]
    for index, (name, _, _) in enumerate(LAYERS):
        h = branch.op(aten.linear.default, h, params[f"{name}_weight"], params[f"{name}_bias"])
        if index < len(LAYERS) - 1:
            h = branch.op(aten.relu.default, h)
    return h


def prompt(params: dict) -> torch.Tensor:
    """P computed now, from tensors (the PEFT export)."""
    h = params["prompt_embedding"]
    for index, (name, _, _) in enumerate(LAYERS):
        h = torch.nn.functional.linear(h, params[f"{name}_weight"], params[f"{name}_bias"])
        h = torch.relu(h) if index < len(LAYERS) - 1 else h
    return h


def _forward(branch, x, table, params, opts):
    return prepend(branch, table, lambda b: encode(b, params), opts["num_virtual_tokens"])


def _count(opts, fan_in, fan_out):
    h = encoder_size(opts, fan_in)
    return opts["num_virtual_tokens"] * fan_in + (fan_in * h + h) + (h * h + h) + (h * fan_in + fan_in)


P_TUNING = AdapterKind(
    name="p_tuning",
    options={"num_virtual_tokens": Option(int, 8, positive=True),
             "encoder_hidden_size": Option(int, None, positive=True),
             "encoder": Option(str, "mlp", choices=("mlp", "lstm"))},
    init=_init,
    forward=_forward,
    delta_weight=None,
    refuse_merge=refuse_merge("p-tuning"),
    param_count=_count,
    init_check=lambda opts: "none",
    site_ops=("embedding",),
    rank_limit=lambda opts, fan_in, fan_out: None,
)
