"""Registers and spills of every LoRA-linear candidate the GPU tuner tries, compiled for sm_90 without a GPU.

    python benchmarks/sm90_resources.py [--M 4096] [--N 4096] [--K 4096] [--r 16] [--epilogue ""]

Each (mode, tile config) the tuner would time for this shape bucket is compiled with Triton's own
compiler for an H100 (sm_90) exactly as a bf16 launch with these sizes specializes it (ints equal
to 1 constant, 16-divisible ints and 16-byte aligned pointers marked), and `cuobjdump -res-usage`
reads the registers per thread and the local-memory stack (register spills) from the machine
code, and its disassembly how many spill loads and stores sit inside the K loop (the loop issuing
the tensor-core instructions). Prints one row per candidate and the count of those that spill. It says nothing about time:
that needs a GPU (`surgeon bench --device cuda`). Needs Triton's NVIDIA backend (it ships ptxas
and cuobjdump); run from the repository root.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ.pop("TRITON_INTERPRET", None)                 # compile real kernels, not interpreted ones
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from surgeon.kernels import lora_linear as kernel
    from tests.kernels.sm90 import compile_like_launch, resource_usage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("M", 4096), ("N", 4096), ("K", 4096), ("r", 16)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--epilogue", default="", help='e.g. "silu,mul:0" (a SwiGLU gate reading one tile)')
    args = parser.parse_args(argv)
    launched = []
    kernel._launch = lambda fn, call, M, N, cfg, block_r, precision, grid=None: launched.append(
        (fn, call, block_r, precision))
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)  # noqa: E731
    x, w, a, b = rand(args.M, args.K), rand(args.N, args.K), rand(args.r, args.K), rand(args.N, args.r)
    operands = [rand(args.M, args.N) for _ in range(args.epilogue.count(":"))]
    limit = next(k for k in (16, 64, None) if k is None or args.M <= k)
    print(f"sm_90 (compiled here, no GPU), bf16, M={args.M} N={args.N} K={args.K} r={args.r}, "
          f"epilogue {args.epilogue!r}")
    print(f"{'mode':20s} {'BLOCK M x N x K, GROUP_M, warps, stages[, split]':48s} {'registers':>9s} {'spill B':>8s} "
          f"{'in K loop':>9s}")
    spilled = in_loop = total = 0
    for mode in ("fused", "precomputed", "fused+tma", "precomputed+tma", "fused+splitk", "precomputed+splitk",
                 "fused+rows"):
        if mode.endswith("+splitk") and limit is None or mode.endswith("+rows") and limit is not None:
            continue
        for cfg in (kernel.SPLITK_CONFIGS[limit or 64] if mode.endswith("+splitk") else kernel.GPU_CONFIGS[limit]):
            kernel.lora_linear(x, w, None, a, b, operands, 2.0, "out_in", args.epilogue, config=cfg, mode=mode)
            fn, call, block_r, precision = launched.pop()
            meta = dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_K=cfg[2], BLOCK_R=block_r, GROUP_M=cfg[3],
                        DOT_PRECISION=precision, **({"SPLIT_K": cfg[6]} if len(cfg) > 6 else {}))
            try:
                usage = resource_usage(compile_like_launch(fn, call, meta, num_warps=cfg[4], num_stages=cfg[5]))
            except Exception as error:  # noqa: BLE001 - a config Triton cannot compile: say so, go on
                print(f"{mode:20s} {str(cfg):48s} failed: {str(error).splitlines()[0][:60]}")
                continue
            total, spilled = total + 1, spilled + (usage["stack"] > 0)
            in_loop += usage["loop_spills"] > 0
            print(f"{mode:20s} {str(cfg):48s} {usage['registers']:9d} {usage['stack']:8d} {usage['loop_spills']:9d}")
    print(f"{spilled} of {total} candidates spill, {in_loop} of them inside the K loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
