"""`surgeon bench`: the command line over surgeon.bench's tables (prints; not a test).

    surgeon bench [--rounds 30] [--threads 2] [--device cuda --dtype bfloat16] [--json out.json]

The whole-model table (surgeon.bench.models) on any device; with a CUDA device also the kernel
tables (surgeon.bench.kernels: the generated fused LoRA linear vs eager vs torch.compile vs the
base GEMM; surgeon.bench.family: the other lowered regions). On a CPU it says that kernel timings
need a GPU.
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from ..bench import family as bench_family, generate, kernels as kernel_bench, models
from ..bench.harness import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="surgeon bench")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", help="also write the figures to this JSON file (on CUDA, the kernel tables "
                                       "to F_kernels.json and F_family.json beside it)")
    parser.add_argument("--kernel-budget", type=float, help="on CUDA, seconds after which each kernel table "
                                                             "starts no new row (default: each table's own)")
    parser.add_argument("--generate", action="store_true",
                        help="also the generation table: a 128-token prompt, 64 new tokens, batch 1 and 8, per "
                             "generated token against transformers' generate (F_generate.json beside --json)")
    parser.add_argument("--generate-only", action="store_true", help="only the generation table")
    parser.add_argument("--generate-rounds", type=int, default=5, help="rounds of the generation table (default: 5)")
    ns = parser.parse_args(argv)
    where = (torch.cuda.get_device_name() if ns.device.startswith("cuda") else
             f"CPU ({platform.processor() or platform.machine()}), {ns.threads} threads")
    print(f"device: {where}, torch {torch.__version__}")
    stem = str(Path(ns.json).with_suffix("")) if ns.json else None   # --json F: the other tables beside it
    if ns.generate or ns.generate_only:
        threads = (1, 2) if ns.device == "cpu" else (ns.threads,)
        print(f"generation: LLaMA-style 4 layers, hidden 512, LoRA r=16 on all 7 projections, {ns.dtype}, prompt 128, "
              "64 new tokens, greedy; median of interleaved rounds")
        table = generate.run(ns.generate_rounds, threads, device=ns.device, dtype=ns.dtype)
        generate.print_rows(table)
        if stem:
            write_json(f"{stem}_generate.json", {"device": where, "dtype": ns.dtype, "prompt": 128, "new_tokens": 64,
                                                 "rows": table})
        if ns.generate_only:
            return 0
        print()
    print(f"LLaMA-style 4 layers, hidden 512, LoRA r=16 on all 7 projections, {ns.dtype}; "
          "ratio to eager base (median of interleaved rounds)")
    rows = models.run(ns.rounds, ns.threads, ns.device, ns.dtype)
    names = list(dict.fromkeys(name for row in rows.values() for name in row))
    print(f"{'variant':<30}" + "".join(f"{label:>16}" for label in rows))
    for name in names:
        print(f"{name:<30}" + "".join(f"{rows[label][name]:>15.2f}x" if name in rows[label] else f"{'-':>16}"
                                      for label in rows))
    if ns.device.startswith("cuda"):
        budget = ["--budget", str(ns.kernel_budget)] if ns.kernel_budget else []
        print()
        kernel_bench.main((["--json", f"{stem}_kernels.json"] if stem else []) + budget)
        print()
        bench_family.main((["--json", f"{stem}_family.json"] if stem else []) + budget)
    else:
        print("\nkernel timings (the generated Triton LoRA kernels) need a CUDA GPU: run `surgeon bench` there.")
    if ns.json:
        write_json(ns.json, {"device": where, "dtype": ns.dtype, "ratios_to_eager_base": rows})
    return 0
