"""Prompt tuning (Lester et al. 2021): v learned virtual tokens in front of the input embeddings.

A site is the table of the model's input embedding (an "embedding" weight site: target the
embedding module, e.g. `model.embed_tokens` or GPT-2's `transformer.wte`). The adapter holds
`prompt_embeddings` (v x hidden), PEFT's name and layout; the graph puts them in front of the
embedding's output and lengthens every sequence-derived size by v (surgeon.adapters.virtual_tokens:
the mechanism, what it refuses, and why generate recomputes). The logits keep PEFT's shape: n + v
positions, the virtual ones first. On BERT (target `*.word_embeddings`) it is PEFT's SEQ_CLS form: the mask
and the token types get v ones / zeros in front, and the pooler reads the first virtual token.

Init (PEFT's prompt_tuning_init): "random", N(0, 1) as PEFT's nn.Embedding; "sample_vocab", the
embedding rows of v ids drawn uniformly from the vocabulary. PEFT's TEXT init tokenizes a text,
which needs a tokenizer surgeon does not load: refused. Either init changes the function ("none"
check). A site trains v * hidden parameters. Merge is refused: nothing folds into a weight.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option
from .virtual_tokens import prepend, refuse_merge


def check_init(kind: str, opts: dict) -> None:
    if opts.get("init") == "text":
        raise ValueError(f"{kind}: init 'text' (PEFT's TEXT) tokenizes prompt_tuning_init_text, which needs a "
                         "tokenizer surgeon does not load; use 'random' or 'sample_vocab', or import a PEFT "
                         "checkpoint made with TEXT (it holds the trained rows)")


def initial_prompt(kind: str, opts: dict, hidden: int, dtype, gen, weight) -> torch.Tensor:
    """v x hidden: N(0, 1), or the rows of v uniformly drawn vocabulary ids (sample_vocab)."""
    check_init(kind, opts)
    v = opts["num_virtual_tokens"]
    if opts.get("init") == "sample_vocab":
        ids = torch.randint(0, weight.shape[0], (v,), generator=gen)
        return weight.detach()[ids.to(weight.device)].to(dtype).clone()
    return torch.randn(v, hidden, generator=gen).to(device=weight.device, dtype=dtype)


def _init(opts, in_features, out_features, dtype, gen, weight):
    return {"prompt_embeddings": initial_prompt("prompt_tuning", opts, in_features, dtype, gen, weight)}


def _forward(branch, x, table, params, opts):
    return prepend(branch, table, lambda b: params["prompt_embeddings"], opts["num_virtual_tokens"])


PROMPT_TUNING = AdapterKind(
    name="prompt_tuning",
    options={"num_virtual_tokens": Option(int, 8, positive=True),
             "init": Option(str, "random", choices=("random", "sample_vocab", "text"))},
    init=_init,
    forward=_forward,
    delta_weight=None,
    refuse_merge=refuse_merge("prompt tuning"),
    param_count=lambda opts, fan_in, fan_out: opts["num_virtual_tokens"] * fan_in,
    init_check=lambda opts: "none",
    site_ops=("embedding",),
    rank_limit=lambda opts, fan_in, fan_out: None,
)
