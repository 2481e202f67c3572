"""Benchmark: the generated fused LoRA linear kernel vs eager unfused vs torch.compile (unfused).

    python benchmarks/bench_lora_kernel.py          # or part of `surgeon bench` on a GPU; ~1-3 minutes

For y = x W^T + s (x A^T) B^T with K = N = 4096, r = 16, at decode (M = 1, 4, 16) and prefill
(M = 512, 2048, 4096) token counts, in fp16 and bf16, it prints one table row per shape:
median times (triton.testing.do_bench; decode rows replay a CUDA graph, do_bench_cudagraph, so
launch overhead does not hide the kernels), the fused kernel's speedups, its relative error
against eager, and the tile config the launcher picked. A SwiGLU gate row (silu(.) * up, the
epilogue fused) follows. A variant that fails prints its error in its cell; the run goes on.
Without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")           # Triton 3.9's default, without its warning

K = N = 4096
RANK = 16
SCALE = 2.0
DECODE, PREFILL = (1, 4, 16), (512, 2048, 4096)
DEVICE = "cuda"
BUDGET_S = 170.0     # stop starting new rows after this, so the script ends in about 3 minutes


def kernel_module():
    """surgeon.kernels.lora_linear (the launcher and its tuned-config cache)."""
    from surgeon.kernels import lora_linear

    return lora_linear


def unfused(x, w, a, b, gate=None):
    """The graph before lowering: base linear, two LoRA GEMMs, one add (and SwiGLU's gate)."""
    y = F.linear(x, w) + SCALE * F.linear(F.linear(x, a), b)
    return y if gate is None else F.silu(y) * gate


def fused(x, w, a, b, gate=None):
    """The generated kernel, called through its launcher (no custom-op dispatch)."""
    lora_linear = kernel_module().lora_linear
    if gate is None:
        return lora_linear(x, w, None, a, b, [], SCALE, "out_in", "")
    return lora_linear(x, w, None, a, b, [gate], SCALE, "out_in", "silu,mul:0")


def timed(fn, cudagraph: bool) -> str:
    """Median milliseconds of fn as a table cell, or the error that stopped it."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        if cudagraph:
            ms = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        else:
            ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        return f"{ms * 1000:.1f}"
    except Exception as error:  # noqa: BLE001 - report and go on with the other variants
        return f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:60] if str(error) else ''}"


def rel_err(fn, ref, args) -> str:
    try:
        out, expected = fn(*args).float(), ref(*args).float()
        return f"{((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item():.1e}"
    except Exception as error:  # noqa: BLE001
        return f"FAILED {type(error).__name__}"


def speedup(base: str, new: str) -> str:
    try:
        return f"{float(base) / float(new):.2f}x"
    except ValueError:
        return "-"


def row(label, M, dtype, compiled, gate: bool) -> list[str]:
    kernel = kernel_module()
    gen = torch.Generator(device=DEVICE).manual_seed(M)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE, generator=gen) * scale).to(dtype)  # noqa: E731
    args = (rand(M, K), rand(N, K, scale=K ** -0.5), rand(RANK, K, scale=K ** -0.5), rand(N, RANK, scale=0.1))
    if gate:
        args += (rand(M, N),)
    graph = M <= 16
    t_base = timed(lambda: F.linear(args[0], args[1]), graph)
    t_fused = timed(lambda: fused(*args), graph)
    t_eager = timed(lambda: unfused(*args), graph)
    t_compiled = timed(lambda: compiled(*args), graph)
    epilogue = "silu,mul:0" if gate else ""
    best = [cfg for key, cfg in kernel._BEST.items()
            if key[:2] == (kernel.triton_next_pow2(M), N) and key[4:6] == (dtype, epilogue)]
    config = "x".join(map(str, best[-1][:3])) + f"/w{best[-1][4]}s{best[-1][5]}" if best else "-"
    return [label, str(M), str(dtype).replace("torch.", ""), "graph" if graph else "events", t_base, t_fused,
            t_eager, t_compiled, speedup(t_fused, t_base), speedup(t_eager, t_fused), speedup(t_compiled, t_fused), rel_err(fused, unfused, args), config]


def print_table(rows: list[list[str]]) -> None:
    header = ["shape", "M", "dtype", "timer", "base us", "fused us", "eager us", "compile us", "fused/base",
              "vs eager", "vs compile",
              "rel err", "fused tile"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_lora_kernel: no CUDA device here; skipping the GPU benchmark "
              "(on a CPU, surgeon::lora_linear runs its torch reference path, which is not a kernel to time).")
        return 0
    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"K=N={K}, r={RANK}, s={SCALE}; medians in microseconds; 'vs' = other time / fused time")
    print("fused = surgeon::lora_linear's launcher: the generated Triton kernel (base GEMM + LoRA in one K loop) "
          "below M=256, cuBLAS GEMM + addmm-accumulated LoRA update from M=256 on (bias-only epilogues); "
          "eager = F.linear x3 + add; "
          "compile = torch.compile(eager, dynamic=True); base = F.linear(x, W) alone; fused/base = fused time / base time\n", flush=True)
    rows: list[list[str]] = []
    cases = [("lora", M, dtype, False) for dtype in (torch.float16, torch.bfloat16) for M in DECODE + PREFILL]
    cases += [("swiglu gate", M, torch.float16, True) for M in (16, 4096)]
    compiled = {}
    for label, M, dtype, gate in cases:
        if time.perf_counter() - start > BUDGET_S:
            rows.append([label, str(M), str(dtype).replace("torch.", ""), "-", "skipped: time budget"] + [""] * 8)
            continue
        compiled.setdefault(gate, torch.compile(unfused, dynamic=True))
        try:
            rows.append(row(label, M, dtype, compiled[gate], gate))
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: report the row, keep going
            rows.append([label, str(M), str(dtype), "-", f"FAILED {type(error).__name__}: {error}"[:80]] + [""] * 8)
        torch.cuda.empty_cache()
        print(f"  done {label} M={M} {dtype} at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s on {props.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
