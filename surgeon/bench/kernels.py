"""GPU benchmark: the generated fused LoRA linear and a lowered LoRA SwiGLU MLP vs eager, torch.compile, base GEMMs.

    python benchmarks/bench_lora_kernel.py [--json out.json]   # or part of `surgeon bench`; ~2-2.5 min on an H200

Table 1, y = x W^T + s (x A^T) B^T (s = 2, bf16 unless marked), one row per case: the base GEMM
F.linear(x, W) alone, surgeon's launcher (surgeon.kernels.lora_linear.lora_linear), eager
unfused (three F.linear and an add) and torch.compile of the eager function; median
microseconds, each variant's time over the base GEMM's, the fused launcher's speedup over
eager and compile, its relative error against eager and the tile config it picked. Cases:
N x K in (4096 x 4096, 14336 x 4096), decode M in (1, 16, 64) and prefill M in (512, 4096, 8192)
at r = 16; r in (8, 64) at M = 16 and 4096 on 4096 x 4096; fp16 at M = 16 and 4096.

Table 2, a LoRA SwiGLU MLP (hidden 4096, intermediate 14336, r = 16 on gate, up and down) at
M = 16 and 4096: base (three plain GEMMs + silu * mul), merged (the same with W + s B A),
eager unfused (PEFT-style: base + B(A x) * s per projection), torch.compile of that, and the
lowered path as the lower pass emits it (up as a plain lora_linear, gate with the epilogue
"silu,mul:0" reading up, then down), each with its ratio to base.

Decode rows (M <= 64) replay a CUDA graph (do_bench_cudagraph), so launch overhead does not hide
the kernels; prefill rows use do_bench. A variant that fails prints FAILED in its cell and the
run goes on; after BUDGET_S seconds no new row starts (it is listed as skipped). `--json PATH`
writes every row. Without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .harness import Env, cell, failure, gpu_timer, measure, print_table, rel_err, table, write_json

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")           # Triton 3.9's default, without its warning

SCALE = 2.0
HIDDEN, INTERMEDIATE = 4096, 14336
BUDGET_S = 130.0     # stop starting new rows after this, so the whole run stays near 150 s


@dataclass(frozen=True)
class Case:
    kind: str            # "lora" (one linear) or "mlp" (the SwiGLU block)
    M: int
    N: int = HIDDEN
    K: int = HIDDEN
    r: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def graph(self) -> bool:
        """Whether this row is timed by CUDA-graph replay (decode sizes)."""
        return self.M <= 64


def cases() -> list[Case]:
    """Every row, most important first (the time budget cuts from the end)."""
    rows = [Case("lora", M) for M in (1, 16, 64, 512, 4096, 8192)]
    rows += [Case("lora", M, N=INTERMEDIATE) for M in (1, 16, 64, 512, 4096, 8192)]
    rows += [Case("mlp", M, N=INTERMEDIATE) for M in (16, 4096)]
    rows += [Case("lora", M, r=r) for r in (8, 64) for M in (16, 4096)]
    rows += [Case("lora", M, dtype=torch.float16) for M in (16, 4096)]
    return rows


# ---------------------------------------------------------------- the variants


def unfused(x, w, a, b):
    """One LoRA projection as the graph holds it before lowering (PEFT's order: base + B(A x) * s)."""
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * SCALE


def unfused_mlp(x, p):
    """The LoRA SwiGLU MLP, unfused: down(silu(gate(x)) * up(x)) with every projection as `unfused`."""
    gate = unfused(x, p["w_gate"], p["a_gate"], p["b_gate"])
    up = unfused(x, p["w_up"], p["a_up"], p["b_up"])
    return unfused(F.silu(gate) * up, p["w_down"], p["a_down"], p["b_down"])


def plain_mlp(x, w_gate, w_up, w_down):
    """Three GEMMs and silu * mul: the base model's MLP (or the merged one, given merged weights)."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def lowered_mlp(launcher, x, p):
    """The calls the lower pass emits: up plain, gate with silu * up fused in its epilogue, then down."""
    up = launcher(x, p["w_up"], None, p["a_up"], p["b_up"], [], SCALE, "out_in", "")
    hidden = launcher(x, p["w_gate"], None, p["a_gate"], p["b_gate"], [up], SCALE, "out_in", "silu,mul:0")
    return launcher(hidden, p["w_down"], None, p["a_down"], p["b_down"], [], SCALE, "out_in", "")


def merged(w, a, b):
    """W + s B A, summed in fp32 and rounded once."""
    return (w.float() + SCALE * (b.float() @ a.float())).to(w.dtype)


def tensors(case: Case, device: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Seeded random operands; weights scaled by 1 / sqrt(fan-in), B by 0.1 so the LoRA term is visible."""
    gen = torch.Generator(device=device).manual_seed(case.M * 31 + case.N + case.r)
    out = {}
    for name, shape in shapes.items():
        scale = 0.1 if name.startswith("b") else (1.0 if name == "x" else shape[-1] ** -0.5)
        out[name] = (torch.randn(*shape, device=device, generator=gen) * scale).to(case.dtype)
    return out


def tile(case: Case) -> str:
    """The config the launcher's tuner picked for this case, or '-' (cuBLAS path, or no tuning here)."""
    from surgeon.kernels import lora_linear as kernel

    best = [found for key, found in kernel._BEST.items()
            if key[:4] == (kernel.bucket_m(case.M), case.N, case.K, case.r) and key[4:6] == (case.dtype, "")]
    if not best:
        return "-"
    mode, cfg = best[-1]
    if mode.startswith("cublas"):
        return "cuBLAS, LoRA term as C (beta=s)" if mode == "cublas+beta" else "cuBLAS+addmm"
    tags = ("pre " if mode.startswith("precomputed") else "") + ("tma " if mode.endswith("+tma") else "") + \
        (f"splitk{cfg[6]} " if mode.endswith("+splitk") else "") + ("rows " if mode.endswith("+rows") else "")
    return tags + "x".join(map(str, cfg[:3])) + f"/w{cfg[4]}s{cfg[5]}"


def linear_row(case: Case, env: Env) -> dict:
    t = tensors(case, env.device, {"x": (case.M, case.K), "w": (case.N, case.K), "a": (case.r, case.K),
                                   "b": (case.N, case.r)})
    x, w, a, b = t["x"], t["w"], t["a"], t["b"]
    fused = lambda: env.launcher(x, w, None, a, b, [], SCALE, "out_in", "")  # noqa: E731
    fns = {"base": lambda: F.linear(x, w), "fused": fused, "eager": lambda: unfused(x, w, a, b),
           "compile": lambda: env.compiled["lora"](x, w, a, b)}
    times, errors = measure(env, fns, case.graph)
    return {**describe(case), "us": times, "errors": errors, "rel_err": rel_err(fused, fns["eager"]),
            "tile": tile(case)}


def mlp_row(case: Case, env: Env) -> dict:
    names = {"w_gate": (INTERMEDIATE, HIDDEN), "w_up": (INTERMEDIATE, HIDDEN), "w_down": (HIDDEN, INTERMEDIATE),
             "a_gate": (case.r, HIDDEN), "a_up": (case.r, HIDDEN), "a_down": (case.r, INTERMEDIATE),
             "b_gate": (INTERMEDIATE, case.r), "b_up": (INTERMEDIATE, case.r), "b_down": (HIDDEN, case.r)}
    p = tensors(case, env.device, {"x": (case.M, HIDDEN), **names})
    x = p["x"]
    w_merged = [merged(p[f"w_{n}"], p[f"a_{n}"], p[f"b_{n}"]) for n in ("gate", "up", "down")]
    lowered = lambda: lowered_mlp(env.launcher, x, p)  # noqa: E731
    fns = {"base": lambda: plain_mlp(x, p["w_gate"], p["w_up"], p["w_down"]),
           "merged": lambda: plain_mlp(x, *w_merged), "eager": lambda: unfused_mlp(x, p),
           "compile": lambda: env.compiled["mlp"](x, p), "lowered": lowered}
    times, errors = measure(env, fns, case.graph)
    return {**describe(case), "us": times, "errors": errors, "rel_err": rel_err(lowered, fns["eager"]),
            "tile": "-"}


def describe(case: Case) -> dict:
    return {"kind": case.kind, "shape": f"{case.N}x{case.K}" if case.kind == "lora" else
            f"{HIDDEN}->{INTERMEDIATE}->{HIDDEN}", "M": case.M, "r": case.r,
            "dtype": str(case.dtype).replace("torch.", ""), "timer": "graph" if case.graph else "events"}


def run_rows(env: Env, todo: list[Case], budget_s: float, log=print) -> list[dict]:
    """Every case's row; a row that raises (e.g. out of memory) is kept with its error."""
    start, rows = time.perf_counter(), []
    for case in todo:
        if time.perf_counter() - start > budget_s:
            rows.append({**describe(case), "us": {}, "errors": {}, "skipped": "time budget"})
            continue
        try:
            rows.append((mlp_row if case.kind == "mlp" else linear_row)(case, env))
        except Exception as error:  # noqa: BLE001 - report the row, keep going
            rows.append({**describe(case), "us": {}, "errors": {"row": failure(error)}})
        if env.device == "cuda":
            torch.cuda.empty_cache()
        log(f"  done {case.kind} M={case.M} N={case.N} r={case.r} {case.dtype} at {time.perf_counter() - start:.0f} s")
    return rows


def print_tables(rows: list[dict]) -> None:
    lora = [r for r in rows if r["kind"] == "lora"]
    mlp = [r for r in rows if r["kind"] == "mlp"]
    print_table(table(lora, ["base", "fused", "eager", "compile"],
                      [("eager/fused", lambda r: cell(r, "eager", "fused")),
                       ("compile/fused", lambda r: cell(r, "compile", "fused")),
                       ("rel err", lambda r: r.get("rel_err", "-")), ("fused tile", lambda r: r.get("tile", "-"))]))
    print(f"\nLoRA SwiGLU MLP (hidden {HIDDEN}, intermediate {INTERMEDIATE}, LoRA on gate/up/down; "
          "base = 3 GEMMs + silu*mul, merged = the same with W + s B A; lowered = up, gate+silu*up, down launches)")
    print_table(table(mlp, ["base", "merged", "eager", "compile", "lowered"],
                      [("eager/lowered", lambda r: cell(r, "eager", "lowered")),
                       ("rel err", lambda r: r.get("rel_err", "-"))]))


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_lora_kernel", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every row (times in microseconds) to this JSON file")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds after which no new row starts")
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_kernel: no CUDA device here; skipping the GPU benchmark "
              "(on a CPU, surgeon::lora_linear runs its torch reference path, which is not a kernel to time).")
        return 0
    from surgeon.kernels.lora_linear import lora_linear

    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    device = f"{props.name} ({props.multi_processor_count} SMs)"
    print(f"device: {device}, torch {torch.__version__}; s={SCALE}; medians in microseconds; "
          "x/base = variant time / base time")
    print("fused = surgeon's lora_linear launcher (per shape bucket, the fastest the tuner measured of: the "
          "generated kernel with x A^T in its K loop, the kernel with x A^T precomputed ('pre'), either with TMA "
          "descriptor loads ('tma', sm_90+) or, for M <= 64, its K loop split over N programs per tile ('splitkN'), "
          "for M > 64 the first kernel in row-stationary order ('rows': x A^T computed once per chunk of column "
          "tiles), cuBLAS GEMM + addmm LoRA update + one epilogue pass, or the LoRA term first and the GEMM adding "
          "it as C (beta=s); the 'fused tile' column names it); eager = F.linear x3 + add; compile = "
          "torch.compile(eager, dynamic=True); base = F.linear(x, W) alone\n", flush=True)
    env = Env("cuda", gpu_timer, lora_linear, {"lora": torch.compile(unfused, dynamic=True),
                                               "mlp": torch.compile(unfused_mlp, dynamic=True)})
    rows = run_rows(env, cases(), ns.budget, log=lambda text: print(text, file=sys.stderr, flush=True))
    print_tables(rows)
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s on {props.name}")
    if ns.json:
        write_json(ns.json, {"device": device, "torch": torch.__version__, "scale": SCALE, "total_s": round(total, 1),
                       "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
