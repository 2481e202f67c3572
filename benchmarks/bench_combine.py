"""combine time per merge method, and adapter quantization error vs bits (prints; not a test).

Model: a 4-layer LLaMA-style model (hidden 512, GQA 8/4 heads, intermediate 1376, vocab 2048),
fp32, example input batch 2 x 32 tokens. Adapters: LoRA r=16 alpha=32 on all 7 projections
(28 modules), weights ~ N(0, 0.01^2) as after training. Times are the combine / quantize pass
alone (its report row), median over --rounds fresh compiles, on this CPU.

    python benchmarks/bench_combine.py [--rounds 1] [--threads 2] [--adapters 3]
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics

import torch

TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
METHODS = [  # (label, combine options)
    ("linear", {"method": "linear"}),
    ("linear rank 16", {"method": "linear", "rank": 16}),
    ("ties d=0.3", {"method": "ties", "density": 0.3}),
    ("dare_linear d=0.3", {"method": "dare_linear", "density": 0.3}),
    ("dare_ties d=0.3", {"method": "dare_ties", "density": 0.3}),
    ("magnitude_prune d=0.3", {"method": "magnitude_prune", "density": 0.3}),
    ("svd rank 16", {"method": "svd", "rank": 16}),
    ("ties d=0.3 rank 16", {"method": "ties", "density": 0.3, "rank": 16}),
]
QUANT = [(1, "sign"), (2, "ternary"), (2, "affine"), (4, "affine"), (8, "affine")]


def build(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    return model, (torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(seed)),)


def compiled_with(model, args, names: list[str]):
    import surgeon

    spec = {"adapters": [{"name": n, "type": "lora", "targets": TARGETS, "rank": 16, "alpha": 32} for n in names],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, {"use_cache": False}, verify=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return compiled


def logits_of(compiled, args) -> torch.Tensor:
    with torch.no_grad():
        return compiled.module(*args).logits


def combine_table(model, args, names: list[str], rounds: int) -> list[list[str]]:
    rows, reference = [], None
    for label, options in METHODS:
        seconds, worst_error, out = [], 0.0, None
        for _ in range(rounds):
            compiled = compiled_with(model, args, names)
            compiled.apply([{"combine": {"adapters": names, "into": "merged", **options}}], verify=False)
            row = compiled.report.rows[-1]
            seconds.append(row.seconds)
            errors = [float(n.rsplit(" ", 1)[1]) for n in row.notes if "truncation" in n]
            worst_error = max(errors, default=0.0)
            out = logits_of(compiled, args)
        reference = out if reference is None else reference
        diff = ((out - reference).norm() / reference.norm()).item()
        rows.append([label, f"{statistics.median(seconds) * 1000:.0f}", f"{worst_error:.2e}" if "rank" in options
                     else "-", f"{diff:.2e}"])
    return rows


def quant_table(model, args, rounds: int) -> list[list[str]]:
    rows = []
    for bits, method in QUANT:
        seconds, note = [], ""
        for _ in range(rounds):
            compiled = compiled_with(model, args, ["a"])
            compiled.apply([{"quantize-adapters": {"bits": bits, "method": method, "group_size": 64}}])
            seconds.append(compiled.report.rows[-1].seconds)
            note = compiled.report.rows[-1].notes[0]
        stored, fp32 = (int(x.replace(",", "")) for x in re.findall(r"([\d,]+) B ", note)[:2])
        output, delta = re.search(r"output rel err (\S+) .* delta rel err (\S+)", note).groups()
        rows.append([f"{bits}", method, f"{stored:,}", f"{fp32 / stored:.1f}x", output, delta,
                     f"{statistics.median(seconds) * 1000:.0f}"])
    return rows


def main() -> None:
    from surgeon.report import table

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--adapters", type=int, default=3)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    model, args = build()
    names = [f"task{i}" for i in range(ns.adapters)]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine()) if platform.system() == "Linux" else platform.machine()
    print(f"device: CPU ({cpu}), {ns.threads} threads, torch {torch.__version__}")
    print(f"LLaMA-style 4 layers, hidden 512, fp32; {ns.adapters} LoRA r=16 on all 7 projections (28 modules); "
          f"input 2x32 tokens; median of {ns.rounds}\n")
    print("combine (the pass alone; output diff = ||logits - logits(linear)|| / ||logits(linear)||)")
    print(table(["method", "time ms", "max trunc err", "output diff vs linear"],
                combine_table(model, args, names, ns.rounds)))
    print("\nquantize-adapters, one adapter, groups of 64 (errors vs the unquantized adapter; "
          "output = ||y_q - y|| / ||y|| on the example input, delta = ||dW_q - dW||_F / ||dW||_F)")
    print(table(["bits", "method", "stored B", "vs fp32", "output rel err", "delta rel err", "time ms"],
                quant_table(model, args, ns.rounds)))


if __name__ == "__main__":
    main()
