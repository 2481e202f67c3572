"""The whole-model table of `surgeon bench`: LoRA overhead against the eager base model, surgeon vs PEFT.

A 4-layer LLaMA-style model (hidden 512, GQA 8/4 heads, intermediate 1376), LoRA r=16 on every
linear projection (q,k,v,o,gate,up,down), fp32, no grad. Shapes: decode (batch 1, 4 tokens) and
prefill (batch 4, 128 tokens). All variants run interleaved in one process, round-robin; each
figure is the median over rounds of (variant time / eager base time in the same round).

    surgeon bench [--rounds 30] [--threads 2] [--device cuda --dtype bfloat16] [--json out.json]

With a CUDA device the table has a "surgeon lowered" row (fuse + lower: LoRA, SwiGLU, RMSNorm and
rotary regions as generated kernels) and ", CUDA graph" rows for the eager base, merged and lowered
models (one captured forward replayed: no launch overhead, as a server runs a static-shape step;
still ratios to the eager base); it then runs the kernel tables (surgeon.bench.kernels: the
generated fused LoRA linear vs eager vs torch.compile vs the base GEMM; surgeon.bench.family).
On a CPU it says that kernel timings need a GPU.
"""
from __future__ import annotations

import copy

import torch

from .harness import interleaved


def build(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, hidden: int = 512,
          layers: int = 4):
    """The model above; `hidden` scales it (intermediate 2.6875 x hidden, head dim 64, GQA 2:1 as at 512)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = hidden // 64
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 43 // 16,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def surgeon_variants(model, ids, targets=TARGETS) -> dict:
    """surgeon unmerged (LoRA r=16 inserted, small random adapter weights) and merged (the same, merged)."""
    import surgeon

    spec = {"adapters": [{"name": "a", "type": "lora", "targets": targets, "rank": 16, "alpha": 32}],
            "pipeline": ["insert"]}
    unmerged = surgeon.compile(model, (ids,), spec, {"use_cache": False})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unmerged.module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    merged = surgeon.compile(model, (ids,), spec, {"use_cache": False})
    merged.module.load_state_dict(unmerged.module.state_dict())
    merged.apply(["merge"])
    found = {"surgeon merged": merged.module, "surgeon unmerged": unmerged.module}
    if ids.is_cuda:     # the generated kernels run on CUDA only (elsewhere lower runs the torch reference)
        lowered = surgeon.compile(model, (ids,), spec, {"use_cache": False})
        lowered.module.load_state_dict(unmerged.module.state_dict())
        found["surgeon lowered"] = lowered.apply(["fuse", "lower"]).module
    return found


def variants(model, ids):
    import peft

    ours = surgeon_variants(model, ids)
    merged, unmerged = ours["surgeon merged"], ours["surgeon unmerged"]
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=[t[2:] for t in TARGETS], lora_dropout=0.0)
    peft_unmerged = peft.get_peft_model(copy.deepcopy(model), config).eval()
    peft_merged = peft.get_peft_model(copy.deepcopy(model), config).eval().merge_and_unload()
    return {
        "eager base": lambda: model(ids, use_cache=False),
        "surgeon merged": lambda: merged(ids),
        "surgeon unmerged": lambda: unmerged(ids),
        **({"surgeon lowered": lambda: ours["surgeon lowered"](ids)} if "surgeon lowered" in ours else {}),
        "PEFT unmerged": lambda: peft_unmerged(ids, use_cache=False),
        "PEFT merged": lambda: peft_merged(ids, use_cache=False),
    }


GRAPHED = ("eager base", "surgeon merged", "surgeon lowered")


def cuda_graphed(fn):
    """fn captured once in a CUDA graph, as a server replays a static-shape step: its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):          # warm up off the capture stream: kernels compile, tuners choose
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph.replay


def with_graphs(fns: dict, capture=cuda_graphed, log=print) -> dict:
    """fns plus a "<name>, CUDA graph" replay of each GRAPHED variant (launch overhead removed); a
    variant that cannot be captured is reported and left out."""
    found = dict(fns)
    for name in GRAPHED:
        if name in fns:
            try:
                found[f"{name}, CUDA graph"] = capture(fns[name])
            except Exception as error:  # noqa: BLE001 - report, keep the other rows
                log(f"  {name}: no CUDA graph ({type(error).__name__}: {str(error).splitlines()[0][:80]})")
    return found


def run(rounds: int, threads: int, device: str, dtype: str) -> dict:
    """The graph-level table: {shape label: {variant: median ratio to eager base}}."""
    torch.set_num_threads(threads)
    model = build(device=device, dtype=getattr(torch, dtype))
    rows = {}
    for label, shape, inner in (("decode 1x4", (1, 4), 10), ("prefill 4x128", (4, 128), 2 if device == "cpu" else 10)):
        ids = torch.randint(0, 2048, shape, generator=torch.Generator().manual_seed(0)).to(device)
        fns = variants(model, ids)
        rows[label] = interleaved(with_graphs(fns) if device.startswith("cuda") else fns, rounds, inner)
    return rows
