"""Compile with the weights loaded: capture, insert, merge and whole-compile time and peak RSS of LLaMA-shaped
models built from configs (random weights), LoRA r=16 on all 7 projections, pipeline ["insert", "merge"], input
ids 2 x 16. The table of issue 20 (2/8/32 layers at hidden 256 in fp32, the 22-layer TinyLlama-1.1B shape in
bf16), one fresh process per run, medians over --repeat runs.

    python benchmarks/bench_compile_merge.py
    python benchmarks/bench_compile_merge.py --models 2x256 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
# name -> (layers, hidden, intermediate, heads, kv heads, vocab, dtype)
MODELS = {
    "2x256": (2, 256, 704, 4, 4, 32000, "float32"),
    "8x256": (8, 256, 704, 4, 4, 32000, "float32"),
    "32x256": (32, 256, 704, 4, 4, 32000, "float32"),
    "22x2048": (22, 2048, 5632, 32, 4, 32000, "bfloat16"),   # TinyLlama-1.1B's shape
}


def one(name: str) -> dict:
    """Build, compile (insert + merge) and measure one model in this process."""
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import surgeon

    layers, hidden, mlp, heads, kv, vocab, dtype = MODELS[name]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    ids = torch.randint(0, vocab, (2, 16))
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}],
            "pipeline": ["insert", "merge"]}   # B = 0 at init: the merge does the same work for any B
    start = time.perf_counter()
    compiled = surgeon.compile(model, (ids,), spec)
    total = time.perf_counter() - start
    rows = {row.name: row for row in compiled.report.rows}
    return {"model": name, "dtype": dtype, "capture_s": rows["capture"].seconds, "insert_s": rows["insert"].seconds,
            "merge_s": rows["merge"].seconds, "compile_s": total,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(name: str, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{name}: the run failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k]
            for k in runs[0]}


def table(results: list[dict]) -> str:
    lines = ["| model | dtype | capture s | insert s | merge s | whole compile s | peak RSS GB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        layers, hidden = MODELS[r["model"]][:2]
        lines.append(f"| {layers} layers, hidden {hidden} | {r['dtype']} | {r['capture_s']:.1f} | {r['insert_s']:.1f} "
                     f"| {r['merge_s']:.1f} | {r['compile_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per model (median)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    results = []
    for name in args.models:
        results.append(measure(name, args.repeat))
        print(f"  {name}: {results[-1]['compile_s']:.1f} s", file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
