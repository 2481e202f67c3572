"""Compile time and peak memory against depth and width: structure-only compiles (meta weights) of
LLaMA-shaped models, LoRA r=16 on all 7 projections, pipeline ["insert"].

Each point runs in a fresh subprocess (so peak RSS is that compile's alone): the model is built from a
`transformers.LlamaConfig` under `torch.device("meta")`, captured on meta input ids (2 x 16) and
rewritten with insert. Printed as a table (capture s, insert s, whole compile s, peak RSS MB, graph
ops) and drawn to a PNG with matplotlib when it is installed.

    python benchmarks/bench_compile_scaling.py                        # depth 2..64 at 256, width 256..4096 at 8
    python benchmarks/bench_compile_scaling.py --depths 2 8 --widths 256 1024 --repeat 1 --png out.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def one(layers: int, hidden: int) -> dict:
    """Build, compile and measure one shape in this process."""
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import surgeon

    heads = max(hidden // 128, 2)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    ids = torch.empty(2, 16, dtype=torch.long, device="meta")
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}],
            "pipeline": ["insert"]}
    start = time.perf_counter()
    compiled = surgeon.compile(model, (ids,), spec)
    total = time.perf_counter() - start
    rows = {row.name: row for row in compiled.report.rows}
    return {"layers": layers, "hidden": hidden, "capture_s": rows["capture"].seconds, "insert_s": rows["insert"].seconds,
            "compile_s": total, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ops": rows["insert"].nodes[1], "sites": len(compiled.adapters["a"].sites)}


def measure(layers: int, hidden: int, repeat: int) -> dict:
    """Medians over `repeat` fresh processes."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--one", str(layers), str(hidden)], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) if isinstance(runs[0][key], float) else runs[0][key]
            for key in runs[0]}


def table(results: list[dict]) -> str:
    lines = ["| layers | hidden | capture s | insert s | compile s | peak RSS MB | ops | sites |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['layers']} | {r['hidden']} | {r['capture_s']:.2f} | {r['insert_s']:.2f} | {r['compile_s']:.2f} "
              f"| {r['peak_rss_mb']:.0f} | {r['ops']} | {r['sites']} |" for r in results]
    return "\n".join(lines)


def plot(results: list[dict], depths: list[int], widths: list[int], depth_width: int, width_depth: int,
         path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written ({path}); `pip install matplotlib` to draw it")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (axis, values, fixed) in enumerate((("layers", depths, ("hidden", depth_width)),
                                                 ("hidden", widths, ("layers", width_depth)))):
        points = sorted((r for r in results if r[fixed[0]] == fixed[1] and r[axis] in values), key=lambda r: r[axis])
        xs = [r[axis] for r in points]
        for key in ("capture_s", "insert_s", "compile_s"):
            axes[0][col].plot(xs, [r[key] for r in points], marker="o", label=key[:-2])
        axes[0][col].set(xlabel=axis, ylabel="seconds", title=f"time vs {axis} ({fixed[0]} {fixed[1]})")
        axes[0][col].legend()
        axes[1][col].plot(xs, [r["peak_rss_mb"] for r in points], marker="o")
        axes[1][col].set(xlabel=axis, ylabel="peak RSS (MB)")
    fig.suptitle("surgeon.compile, structure only (meta weights), LoRA r=16 on 7 projections")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--depth-width", type=int, default=256, help="hidden size of the depth sweep")
    parser.add_argument("--width-depth", type=int, default=8, help="layers of the width sweep")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per point (median)")
    parser.add_argument("--png", type=Path, default=Path("benchmarks/results/compile_scaling.png"))
    parser.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    points = sorted({(d, args.depth_width) for d in args.depths} | {(args.width_depth, w) for w in args.widths})
    results = []
    for layers, hidden in points:
        results.append(measure(layers, hidden, args.repeat))
        print(f"  {layers} layers, hidden {hidden}: {results[-1]['compile_s']:.2f} s", file=sys.stderr, flush=True)
    print(table(results))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.depths, args.widths, args.depth_width, args.width_depth, args.png)


if __name__ == "__main__":
    main()
