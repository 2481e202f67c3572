"""pytest-benchmark suite for generation with a KV cache (CPU), the JSON beside the table's.

    pytest benchmarks/test_bench_generate.py --benchmark-only -p no:logging --benchmark-json gen.json

Not part of the test suite (benchmarks/ is outside testpaths). Group "generate-cpu": a 2-layer
LLaMA-style Hugging Face model (hidden 256, GQA 4/2 heads, intermediate 688, vocab 1024, fp32),
LoRA r=16 on all 7 projections, a batch of 2 left-padded prompts of 32 positions, 16 new tokens,
greedy with no end-of-sequence stop: transformers' generate on the base model, surgeon's generate
merged and unmerged, peft's generate unmerged. No timing is asserted; the module checks that
surgeon unmerged and peft unmerged generate the same tokens. The per-token table with ratios is
`surgeon bench --generate` (surgeon/bench/generate.py).
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from surgeon.bench.generate import prompts
from surgeon.bench.models import TARGETS

HAS_PEFT = importlib.util.find_spec("peft") is not None
VARIANTS = ["eager base", "surgeon merged", "surgeon unmerged"] + (["PEFT unmerged"] if HAS_PEFT else [])
NEW = 16


@pytest.fixture(scope="module")
def generators():
    from transformers import LlamaConfig, LlamaForCausalLM

    import surgeon

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    ids, mask = prompts(2, 32, vocab=1024)
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}]}
    unmerged = surgeon.compile(model, (ids[:, :8],), spec, {"attention_mask": mask[:, :8], "use_cache": False})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unmerged.module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    merged = copy.deepcopy(unmerged).apply(["merge"])
    settings = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    fns = {"eager base": lambda: model.generate(ids, **settings),
           "surgeon merged": lambda: merged.generate(ids, **settings),
           "surgeon unmerged": lambda: unmerged.generate(ids, **settings)}
    if HAS_PEFT:
        import peft

        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=16, lora_alpha=32, target_modules=[t[2:] for t in TARGETS], lora_dropout=0.0)).eval()
        found = peft_model.load_state_dict(peft_names(unmerged.module.state_dict()), strict=False)
        assert not found.unexpected_keys and not [k for k in found.missing_keys if "lora_" in k]
        fns["PEFT unmerged"] = lambda: peft_model.generate(input_ids=ids, **settings)
    return fns


def peft_names(state: dict) -> dict:
    """surgeon's adapter tensors (`<path>.adapter_a.lora_A`) under PEFT's names (`base_model.model.<path>.lora_A.default.weight`)."""
    return {f"base_model.model.{k.replace('.adapter_a.', '.')}.default.weight": v
            for k, v in state.items() if ".adapter_a." in k}


@pytest.mark.benchmark(group="generate-cpu")
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate(benchmark, generators, variant):
    with torch.no_grad():
        tokens = benchmark(generators[variant])
        assert tokens.shape == (2, 32 + NEW)
        if variant == "PEFT unmerged":
            torch.testing.assert_close(tokens, generators["surgeon unmerged"](), rtol=0, atol=0)
