"""Mixed-batch LoRA kernels on one linear, on a GPU: decode and prefill, batch 16, rows over 1 / 4 / 16 adapters.

One linear K = N = 4096 (a LLaMA-7B projection), a bank of 16 LoRA adapters of rank 16, a batch of 16
sequences (decode: one token each, M = 16, BGMV; prefill: PROMPT tokens each, M = 16 * PROMPT, SGMV), rows
spread round-robin over 1, 4 or 16 adapters. Columns, each the median of `--rounds` CUDA-event timings
in microseconds (every variant timed interleaved in each round):

  base            y = linear(x, W, b): the base GEMM alone (the floor)
  torch grouped   y, then `mixed_lora_reference` (one GEMM pair per adapter present)
  unfused         y, then `mixed_lora` (shrink + expand kernels, y updated in place): the mixed graph today
  unfused+epi     unfused, then silu(.) * gate in torch (two more passes over y)
  region          the mixed_lora_linear region with epilogue "silu,mul:0": y, the shrink kernel, and the
                  expand kernel that applies the epilogue before its one store (kernels/mixed_lora_region.py)

    python benchmarks/bench_mixed_kernels.py [--dtype bfloat16] [--rounds 50] [--prompt 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.kernels import mixed_lora as kernel  # noqa: E402
from surgeon.kernels import mixed_lora_region as region  # noqa: E402
from surgeon.kernels.epilogue import steps  # noqa: E402

K = N = 4096
BANK, RANK, BATCH = 16, 16, 16
COLUMNS = ("base", "torch grouped", "unfused", "unfused+epi", "region")


def variants(x, w, b, gate, bank, index) -> dict:
    chain = steps("silu,mul:0", False)

    def unfused():
        return kernel.mixed_lora(x, F.linear(x, w, b), bank, index, inplace=True, check_index=False)

    return {
        "base": lambda: F.linear(x, w, b),
        "torch grouped": lambda: kernel.mixed_lora_reference(x, F.linear(x, w, b), bank, index, inplace=True),
        "unfused": unfused,
        "unfused+epi": lambda: F.silu(unfused()) * gate,
        "region": lambda: region.mixed_lora_linear(x, F.linear(x, w, b), bank, index, chain, [gate]),
    }


def timed(fn, rounds_out: list) -> None:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rounds_out.append(start.elapsed_time(end) * 1000.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--spreads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mixed_kernels: no CUDA device here")
    dtype, device = getattr(torch, opts.dtype), torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device, dtype)
    b = (torch.randn(N, generator=gen) * 0.1).to(device, dtype)
    bank = kernel.LoraBank.build([(torch.randn(RANK, K, generator=gen) * K ** -0.5,
                                   torch.randn(N, RANK, generator=gen) * 0.01, 2.0) for _ in range(BANK)],
                                 dtype=dtype, device=device)
    rows = []
    print(f"{torch.cuda.get_device_name()}: K = N = {K}, rank {RANK}, bank {BANK}, batch {BATCH}, {opts.dtype}; "
          f"median us over {opts.rounds} rounds")
    print(f"{'phase':<9}{'rows':>6}{'adapters':>10}" + "".join(f"{c:>16}" for c in COLUMNS))
    for phase, tokens in (("decode", 1), ("prefill", opts.prompt)):
        M = BATCH * tokens
        x = torch.randn(M, K, generator=gen).to(device, dtype)
        gate = torch.randn(M, N, generator=gen).to(device, dtype)
        for spread in opts.spreads:
            index = (torch.arange(BATCH) % spread).repeat_interleave(tokens).to(device=device, dtype=torch.int32)
            fns = variants(x, w, b, gate, bank, index)
            for fn in fns.values():     # compile and warm up
                fn()
            torch.cuda.synchronize()
            times = {name: [] for name in fns}
            for _ in range(opts.rounds):
                for name, fn in fns.items():
                    timed(fn, times[name])
            medians = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"phase": phase, "rows": M, "adapters": spread, "mode": kernel.choose_mode(M), **medians})
            print(f"{phase:<9}{M:>6}{spread:>10}" + "".join(f"{medians[c]:>16.1f}" for c in COLUMNS), flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": opts.dtype,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
