"""Every adapter kind (all of surgeon.adapters.kinds(): checked) on every model it fits, against one set of invariants.

One table of (kind, model) cases; each case is compiled once and checked for: identity insert
(bit for bit where the kind's init is exact; a kind
whose init is no identity, e.g. ETHER, must report that it changes the function), gradients on adapter parameters only, parameter
count (the test's own per-kind formula over the user's module shapes == AdapterState's count ==
the module's trainable count), a save_adapter / from_dir round trip, and merge (exact within the
fp32 tolerance, or refused with the kind's reason). Models: LLaMA with GQA (k_proj is 64 -> 32),
GPT-2 (Conv1D as addmm), BERT (encoder with an attention_mask tensor kwarg), and a small CNN for
the kinds whose `site_ops` include conv2d. Kinds whose site is an attention call (prefix,
adaption_prompt) target the attention modules; their count comes from the model's config.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import NAME, assert_close, main_output, model_inputs, spec
from tests.conftest import hf_bert, hf_gpt2, hf_llama, randomize_adapters, small_cnn
from tests.passes.helpers import adapter_nodes

MODELS = {  # factory, targets (a GQA projection / Conv1D addmm / encoder linears / convs)
    "llama": (hf_llama, ("*.k_proj", "*.down_proj")),
    "gpt2": (hf_gpt2, ("*.c_attn", "*.mlp.c_proj")),
    "bert": (hf_bert, ("*.attention.self.query", "*.intermediate.dense")),
    "cnn": (small_cnn, ("stem.0", "block1.3", "head")),
}
# kinds that attach to a model's norms or embedding table, not its linears: their targets per model
KIND_TARGETS = {"ln_tuning": {"llama": ("*.input_layernorm", "*.norm"), "gpt2": ("*.ln_1",), "bert": ("*.output.LayerNorm",)},
                "trainable_tokens": {"llama": ("*.embed_tokens",), "gpt2": ("*.wte",), "bert": ("*.word_embeddings",)},
                # kinds whose site is an attention call (SDPA): the attention modules
                "prefix": {"llama": ("*.self_attn",), "gpt2": ("*.attn",), "bert": ("*.attention.self",)},
                "adaption_prompt": {"llama": ("*.self_attn",)},
                # virtual-token kinds: the input embedding table (BERT's word table, not its position or type tables)
                **{k: {"llama": ("*.embed_tokens",), "gpt2": ("*.wte",), "bert": ("*.word_embeddings",)}
                   for k in ("prompt_tuning", "p_tuning", "multitask_prompt_tuning", "cpt")}}
KIND_MODELS = {"adaption_prompt": ("llama",),   # PEFT's LLaMA-Adapter needs k_proj / v_proj / o_proj by name
               # virtual tokens: causal LMs (PEFT's CAUSAL_LM form) and BERT (its SEQ_CLS form); CPT only on causal LMs,
               # as PEFT's CPTConfig (CAUSAL_LM only: CPT learns from in-context examples with label tokens)
               **{k: ("llama", "gpt2", "bert") for k in ("prompt_tuning", "p_tuning", "multitask_prompt_tuning")},
               "cpt": ("llama", "gpt2")}


def _attention_shape(config) -> tuple[int, int, int]:
    """(hidden, kv_heads, head_dim) of an HF config (LLaMA, GPT-2, BERT names)."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return hidden, kv_heads, getattr(config, "head_dim", None) or hidden // heads


# per attention site, from the model's config: (options, config) -> count
ATTENTION_COUNTS = {
    "prefix": lambda o, c: 2 * o["num_virtual_tokens"] * _attention_shape(c)[1] * _attention_shape(c)[2],
    "adaption_prompt": lambda o, c: o["adapter_len"] * _attention_shape(c)[0] + 1,   # the prompt and its gate
}


def _targets(case) -> tuple[str, ...]:
    return KIND_TARGETS.get(case.kind, {}).get(case.model, MODELS[case.model][1])


def _split(n: int) -> tuple[int, int]:
    """n == a * b with a the largest divisor not above sqrt(n)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _lokr_count(opts: dict, fan_in: int, fan_out: int) -> int:
    (a, c), (b, d), r = _split(fan_out), _split(fan_in), opts["rank"]
    return a * b + (r * (c + d) if r < max(c, d) / 2 else c * d)


# the test's own parameter formulas, per kind: (options, fan_in, fan_out) -> count
FORMULAS = {
    "lora": lambda o, i, n: o["rank"] * (i + n),
    "loha": lambda o, i, n: 2 * o["rank"] * (i + n),
    "lokr": _lokr_count,
    "ia3": lambda o, i, n: n,
    "dora": lambda o, i, n: o["rank"] * (i + n) + n,
    "bottleneck": lambda o, i, n: 2 * o["rank"] * n,
    "ether": lambda o, i, n: n,
    "ether_plus": lambda o, i, n: 2 * (i + n),
    "rosa": lambda o, i, n: o["rank"] * (i + n) + max(1, round(o["density"] * i * n)),
    "lori": lambda o, i, n: max(1, round(o["density"] * n * o["rank"])),
    "road": lambda o, i, n: {"road_1": 1, "road_2": 2, "road_4": 4}[o["variant"]] * n,
    "fourierft": lambda o, i, n: o["frequencies"],
    "waveft": lambda o, i, n: o["frequencies"],
    "frod": lambda o, i, n: i + max(1, min(int(i * i * o["sparse_rate"]), i * i - i)),
    "hira": lambda o, i, n: o["rank"] * (i + n),
    "miss": lambda o, i, n: o["rank"] * (o["mini_rank"] if o["mode"] == "mini" else n),
    "randlora": lambda o, i, n: math.ceil(min(i, n) / o["rank"]) * (o["rank"] + min(i, n)),
    "delora": lambda o, i, n: o["rank"] * (i + n) + 1,
    "psoft": lambda o, i, n: o["rank"] * (o["rank"] - 1) // 2 + 2 * o["rank"],   # skew Q + vectors a, b
    "deft": lambda o, i, n: o["rank"] * (i + n),
    "osf": lambda o, i, n: (min(i, n) - min(i, n) // 2) * (i + n + 1),   # effective_rank unset: half kept
    "glora": lambda o, i, n: 2 * o["rank"] * (i + n),   # A and B as lora; c, d_e none (no bias terms)
    # A and the router per site, plus half of the group's B: each target is one module in each of the 2 layers
    "lily": lambda o, i, n: o["rank"] * (i + o["num_b"]) + o["num_b"] * o["rank"] * n // 2,
    "adalora": lambda o, i, n: o["rank"] * (i + n + 1),
    "peanut": lambda o, i, n: 2 * o["rank"] * n + 2 * o["depth"] * o["rank"] ** 2,
    "gralora": lambda o, i, n: (o["rank"] + o["hybrid_rank"]) * (i + n),
    "c3a": lambda o, i, n: i * n // o["block_size"],
    "pvera": lambda o, i, n: 2 * o["rank"] + n,
    "ln_tuning": lambda o, i, n: n,   # a norm parameter of n values (1 -> n)
    "trainable_tokens": lambda o, i, n: len(o["token_indices"]) * i,   # k rows of the vocab x hidden table
    "vblora": lambda o, i, n: o["num_vectors"] * o["rank"] * (i + n) // o["vector_length"],
    "tinylora": lambda o, i, n: 0,
    "unilora": lambda o, i, n: 0,
    "supertuning": lambda o, i, n: int(i * n * (1 - o["sparsity"])) + o["rank"] * (i + n),
    "beft": lambda o, i, n: n,
    # with subspace_rank 1 and rank <= min(in, out): K subspaces of rank 1, sum 1 * (R + |I_i|) = K R + out
    "adamss": lambda o, i, n: min(o["num_subspaces"], n) * min(o["rank"], n, i) + n,
    # n_skills LoRA pairs (cut into n_splits heads) and the routing logits, n_tasks x n_splits n_skills
    "poly": lambda o, i, n: o["n_skills"] * o["rank"] * (i + n) + o["n_tasks"] * o["n_splits"] * o["n_skills"],
    "xlora": lambda o, i, n: 0,   # the experts are frozen (PEFT's default): only the classifier trains
    # part one's kinds beside LoRA: orthogonal blocks of b (b (b - 1) / 2 skew entries each; BOFT: f factors of
    # full b x b blocks and an output scale), Householder vectors, full deltas, VeRA's scales, ...
    "oft": lambda o, i, n: (i // o["block_size"]) * o["block_size"] * (o["block_size"] - 1) // 2,
    "boft": lambda o, i, n: o["butterfly_factor"] * (i // o["block_size"]) * o["block_size"] ** 2 + n,
    "hra": lambda o, i, n: o["rank"] * i,
    "delta": lambda o, i, n: i * n,
    "hydra": lambda o, i, n: o["rank"] * (i + n) + o["rank"] * 2 * n,   # parallel (in -> r -> out), sequential (out -> r -> out)
    "lora-xs": lambda o, i, n: o["rank"] ** 2,
    "parallel-adapter": lambda o, i, n: o["rank"] * (i + n),
    "s2ft": lambda o, i, n: o["columns"] * n,
    "shira": lambda o, i, n: o["rank"] * (i + n),
    "vera": lambda o, i, n: o["rank"] + n,
    # virtual tokens on the embedding table (fan_in = hidden): v prompt rows, plus each kind's own tensors
    "prompt_tuning": lambda o, i, n: o["num_virtual_tokens"] * i,
    # p_tuning's MLP: hidden -> h -> h -> hidden, each with a bias
    "p_tuning": lambda o, i, n: (o["num_virtual_tokens"] * i + (i * o["encoder_hidden_size"] + o["encoder_hidden_size"])
                                 + o["encoder_hidden_size"] * (o["encoder_hidden_size"] + 1)
                                 + (o["encoder_hidden_size"] * i + i)),
    "multitask_prompt_tuning": lambda o, i, n: (o["num_virtual_tokens"] * i
                                                + o["num_tasks"] * o["num_ranks"] * (o["num_virtual_tokens"] + i)),
    "cpt": lambda o, i, n: len(o["cpt_token_ids"]) * i,   # a trained offset per token (its embedding is frozen)
}
# trained tensors shared by every site, counted once per adapter: (options, number of sites) -> count
SHARED_ONCE = {
    "vblora": lambda o, sites: o["num_vectors"] * o["vector_length"],
    "tinylora": lambda o, sites: o["u"] * max(1, round(sites * (1 - o["weight_tying"]))),
    "unilora": lambda o, sites: o["theta_length"],
    # X-LoRA's classifier, hidden -> xlora_size -> n_experts (depth 2), each layer with a bias
    "xlora": lambda o, sites: o["hidden"] * o["xlora_size"] + o["xlora_size"] * (1 + o["n_experts"]) + o["n_experts"],
}
OPTIONS = {"lora": {"rank": 4, "alpha": 8}, "loha": {"rank": 2}, "lokr": {"rank": 2}, "ia3": {},
           "dora": {"rank": 4}, "bottleneck": {"rank": 4}, "ether": {"blocks": 2}, "ether_plus": {"blocks": 2},
           "rosa": {"rank": 2, "density": 0.05}, "lori": {"rank": 4, "density": 0.2},
           "road": {"variant": "road_2", "group_size": 16}, "fourierft": {"frequencies": 24, "scaling": 30.0},
           "waveft": {"frequencies": 24, "scaling": 30.0, "wavelet": "db2"},
           "frod": {"sparse_rate": 0.02},
           "hira": {"rank": 4}, "miss": {"rank": 8}, "randlora": {"rank": 6, "alpha": 12.0},
           "delora": {"rank": 4}, "psoft": {"rank": 4}, "deft": {"rank": 4, "alpha": 8}, "osf": {},
           "glora": {"rank": 2, "c": "none", "d_e": "none"}, "lily": {"rank": 4, "num_b": 2}, "adalora": {"rank": 4, "alpha": 8}, "peanut": {"rank": 4, "depth": 1}, "gralora": {"rank": 4, "blocks": 2, "hybrid_rank": 2}, "c3a": {"block_size": 16},
           "vblora": {"rank": 4, "num_vectors": 32, "vector_length": 16},
           "tinylora": {"rank": 2, "u": 8, "weight_tying": 0.5}, "unilora": {"rank": 4, "theta_length": 64},
           "pvera": {"rank": 4}, "ln_tuning": {}, "trainable_tokens": {"token_indices": [1, 5, 60, 90]}, "supertuning": {"sparsity": 0.95, "rank": 2}, "beft": {},
           "adamss": {"rank": 4, "num_subspaces": 3},
           "prefix": {"num_virtual_tokens": 3}, "adaption_prompt": {"adapter_len": 3},
           "oft": {"block_size": 8}, "boft": {"block_size": 4, "butterfly_factor": 2}, "hra": {"rank": 4},
           "delta": {}, "hydra": {"rank": 2}, "lora-xs": {"rank": 4}, "parallel-adapter": {"rank": 4},
           "s2ft": {"columns": 4}, "shira": {"rank": 2}, "vera": {"rank": 8},
           "prompt_tuning": {"num_virtual_tokens": 3}, "p_tuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 16},
           "multitask_prompt_tuning": {"num_virtual_tokens": 3, "num_tasks": 1, "num_ranks": 2},
           "cpt": {"cpt_token_ids": [5, 9, 17, 3], "cpt_tokens_type_mask": [1, 2, 3, 1]},
           # a fixed task: it runs without task_ids and merges (routing: rows is refused: test_poly)
           "poly": {"rank": 4, "n_tasks": 2, "n_skills": 2, "n_splits": 2, "routing": "task", "task_id": 1},
           "xlora": {"n_experts": 2, "rank": 2, "xlora_depth": 2, "xlora_size": 8}}


@dataclass(frozen=True)
class Case:
    kind: str
    model: str
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind}-{self.model}"


CASES = [Case(kind, model, OPTIONS[kind]) for kind in OPTIONS for model in KIND_MODELS.get(kind, MODELS)
         if model != "cnn" or "conv2d" in kinds()[kind].site_ops]


def _fans(model, targets) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every targeted module, read from the user's module (conv: in * kh * kw)."""
    fans = []
    for path, module in model.named_modules():
        if not any(fnmatch.fnmatchcase(path, t) or fnmatch.fnmatchcase(path, t[2:]) for t in targets):
            continue
        weight = module.weight
        if type(module).__name__ == "Conv1D":   # GPT-2 stores in x out
            fans.append((weight.shape[0], weight.shape[1]))
        else:
            fans.append((weight[0].numel(), weight.shape[0]))
        if weight.dim() == 1 and getattr(module, "bias", None) is not None:   # a norm's bias: a site of its own
            fans.append((1, module.bias.shape[0]))
    return fans


def _identity(compiled, model, args, kwargs, case):
    check = compiled.adapters[NAME].spec.kind.init_check({**compiled.adapters[NAME].spec.options})
    row = compiled.report.rows[-1]
    assert row.name == "insert" and row.matches > 0 and not row.rejections, row.rejections
    want, got = main_output(model, args, kwargs), main_output(compiled.module, args, kwargs)
    if check == "exact":
        assert row.check == "exact" and torch.equal(got, want)
    elif check == "none":   # the kind's init changes the function (ETHER: a reflection is never I; virtual
        # tokens lengthen the output by their count)
        assert row.check == "changes function" and (got.shape != want.shape or not torch.allclose(got, want))
    else:
        assert_close(got, want)


def _param_count(compiled, model, case):
    state, targets = compiled.adapters[NAME], _targets(case)
    if case.kind in ATTENTION_COUNTS:
        modules = [p for p, _ in model.named_modules()
                   if any(fnmatch.fnmatchcase(p, t) or fnmatch.fnmatchcase(p, t[2:]) for t in targets)]
        expected = len(modules) * ATTENTION_COUNTS[case.kind](state.spec.options, model.config)
        assert len(state.sites) == len(modules) and state.param_count == expected
        assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == expected
        return
    fans = _fans(model, targets)
    expected = sum(FORMULAS[case.kind](state.spec.options, i, n) for i, n in fans)
    hidden = _attention_shape(model.config)[0] if hasattr(model, "config") else None   # X-LoRA's classifier input
    expected += SHARED_ONCE.get(case.kind, lambda o, sites: 0)({**state.spec.options, "hidden": hidden}, len(fans))
    assert state.param_count == expected
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == expected


def _gradients(compiled, args, kwargs):
    module, state = compiled.module, compiled.adapters[NAME]
    trainable = {t for s in state.sites for p, t in s.params.items()
                 if p not in state.spec.kind.untrained}
    main_output(module, args, kwargs, grad=True).float().square().mean().backward()
    got = {name for name, p in module.named_parameters() if p.grad is not None}
    assert got == trainable
    module.zero_grad(set_to_none=True)


def _round_trip(compiled, model, args, kwargs, tmp_path):
    randomize_adapters(compiled.module, seed=3)
    expected = main_output(compiled.module, args, kwargs)
    compiled.save_adapter(NAME, tmp_path / "saved")
    again = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_dir": str(tmp_path / "saved")}]},
                            kwargs)
    assert torch.equal(main_output(again.module, args, kwargs), expected)


def _merge(compiled, args, kwargs):
    state = compiled.adapters[NAME]
    # per site, as the merge pass asks (RoAd refuses where a site has a bias: GPT-2, BERT)
    reason = next((r for s in state.sites if (r := state.spec.kind.refusal(s.options))), "")
    if reason:
        with pytest.raises(surgeon.SpecError, match="cannot merge") as refused:
            compiled.apply(["merge"])
        assert reason in str(refused.value)
        return
    before = main_output(compiled.module, args, kwargs)
    compiled.apply(["merge"])
    assert adapter_nodes(compiled.module) == []
    assert_close(main_output(compiled.module, args, kwargs), before)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kind_on_model(case: Case, tmp_path):
    factory, targets = MODELS[case.model][0], _targets(case)
    model, args, kwargs = model_inputs(factory)
    compiled = surgeon.compile(model, args, spec(case.kind, targets, **case.options), kwargs)
    _identity(compiled, model, args, kwargs, case)
    _param_count(compiled, model, case)
    _gradients(compiled, args, kwargs)
    _round_trip(compiled, model, args, kwargs, tmp_path)
    _merge(compiled, args, kwargs)


def test_the_matrix_covers_every_kind():
    assert set(OPTIONS) == set(kinds())
