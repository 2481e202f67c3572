"""pytest-benchmark suite for LoRA: graph-level variants on a CPU, the lowered LoRA linear on CUDA.

    pytest benchmarks/test_bench_lora.py --benchmark-only -p no:logging      # ~30 s on 2 CPU cores

Not part of the test suite (benchmarks/ is outside testpaths). Group "llama-cpu": one forward of
a 2-layer LLaMA-style model (hidden 256, GQA 4/2 heads, intermediate 688, fp32, batch 1 x 32
tokens, no grad) with LoRA r=16 on all 7 projections: eager base (no adapter), surgeon merged,
surgeon unmerged, and PEFT unmerged when peft imports. Groups "lora-linear-decode" and
"lora-linear-prefill" (CUDA only, skipped otherwise): y = x W^T + 2 (x A^T) B^T, K = N = 4096,
r = 16, bf16, M = 16 and 4096, surgeon's launcher (surgeon.kernels.lora_linear) vs eager
(three F.linear and an add), each call followed by a device synchronize. No timing is asserted;
the module checks only that the variants compute the same function.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from surgeon.bench.models import TARGETS, surgeon_variants
HAS_PEFT = importlib.util.find_spec("peft") is not None
CPU_VARIANTS = ["eager base", "surgeon merged", "surgeon unmerged"] + (["PEFT unmerged"] if HAS_PEFT else [])


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_variants():
    model = small_llama()
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0))
    mods = surgeon_variants(model, ids)
    fns = {"eager base": lambda: model(ids, use_cache=False).logits,
           "surgeon merged": lambda: mods["surgeon merged"](ids),
           "surgeon unmerged": lambda: mods["surgeon unmerged"](ids)}
    if HAS_PEFT:
        import copy

        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=[t[2:] for t in TARGETS], lora_dropout=0.0)
        peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
        fns["PEFT unmerged"] = lambda: peft_model(ids, use_cache=False).logits
    return fns


def logits(out) -> torch.Tensor:
    """The logits tensor of a forward's output (a tensor, a tuple/list, or a mapping)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"]
    return out[0]


@pytest.mark.benchmark(group="llama-cpu")
@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_llama_forward(benchmark, llama_variants, variant):
    fn = llama_variants[variant]
    with torch.no_grad():
        out = logits(benchmark(fn))
        if variant == "surgeon merged":      # merging must not change the function
            torch.testing.assert_close(out, logits(llama_variants["surgeon unmerged"]()), rtol=1e-4, atol=1e-4)
    assert out.shape == (1, 32, 1024) and torch.isfinite(out).all()


def lora_operands(M: int, K: int = 4096, N: int = 4096, r: int = 16):
    """x, W, A, B in bf16 on the GPU; W and A scaled by 1 / sqrt(K), B by 0.1."""
    gen = torch.Generator(device="cuda").manual_seed(M)
    shapes = [((M, K), 1.0), ((N, K), K ** -0.5), ((r, K), K ** -0.5), ((N, r), 0.1)]
    return [(torch.randn(*s, device="cuda", generator=gen) * c).to(torch.bfloat16) for s, c in shapes]


def eager_lora(x, w, a, b):
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0


def lowered_lora(x, w, a, b):
    from surgeon.kernels.lora_linear import lora_linear

    return lora_linear(x, w, None, a, b, [], 2.0, "out_in", "")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the lowered LoRA linear's kernel needs a CUDA device")
@pytest.mark.parametrize("M", [16, 4096], ids=["decode-M16", "prefill-M4096"])
@pytest.mark.parametrize("impl", ["lowered", "eager"])
def test_lora_linear_cuda(benchmark, M, impl):
    benchmark.group = f"lora-linear-{'decode' if M <= 64 else 'prefill'}"
    args = lora_operands(M)
    fn = lowered_lora if impl == "lowered" else eager_lora
    expected = eager_lora(*args).float()
    out = fn(*args)                   # the first call tunes the launcher's tile config for this shape
    torch.cuda.synchronize()

    def call():
        fn(*args)
        torch.cuda.synchronize()

    benchmark(call)
    if impl == "lowered":
        err = (out.float() - expected).abs().max() / expected.abs().max()
        assert err < 2e-2, f"lowered M={M}: relative error {err:.1e} against eager (bf16)"
