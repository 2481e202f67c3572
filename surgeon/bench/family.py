"""GPU benchmark of the other lowered regions: DoRA, IA3 (input), bottleneck, RMSNorm's tail, a GELU program.

    python benchmarks/bench_family_kernels.py [--json out.json]   # or part of `surgeon bench` on a GPU

One row per (region, M), bf16, hidden 4096, r = 16, M in (16, 4096); median microseconds of:

  base      the layer without its adapter: F.linear(x, W) (rmsnorm: the eager norm itself)
  fused     what `lower` emits for the region (surgeon's launchers, tuned per shape bucket)
  eager     the region's ops as the unlowered graph runs them
  compile   torch.compile of eager

  dora        g (x W^T + s B A x), g one value per output (the weight-side norm is not timed)
  ia3-input   (x * l) W^T, l one value per input feature (PEFT's IA3 on down_proj)
  bottleneck  y = x W^T, then y + U relu(D y)
  rmsnorm     w * (x * rsqrt(mean(x^2) + eps)): one row kernel (the mean inside it)
  gelu-fc     0.5 z (1 + tanh(c (z + 0.044715 z^3))), z = x W^T + b + s B A x (GPT-2's c_fc)
  loha        x W^T + s ((W1a W1b) ⊙ (W2a W2b)) x at r = 8, as surgeon runs it: a rank-64 LoRA with
              D = rows W1b[i] ⊙ W2b[j] and U = columns W1a[:, i] ⊙ W2a[:, j], built per call in
              both fused and eager (PEFT builds the 4096 x 4096 delta instead)

Decode rows (M <= 64) replay a CUDA graph. The measuring and printing are surgeon.bench.harness's.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .harness import Env, gpu_timer, measure, print_table, rel_err, table, write_json

SCALE = 2.0
KINDS = ("dora", "ia3-input", "bottleneck", "rmsnorm", "gelu-fc", "loha")


@dataclass(frozen=True)
class Row:
    kind: str
    M: int
    N: int = 4096
    K: int = 4096
    r: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def graph(self) -> bool:
        return self.M <= 64


def rows() -> list[Row]:
    """Every row, decode first (the time budget cuts from the end)."""
    return [Row(kind, M, r=8 if kind == "loha" else 16) for M in (16, 4096) for kind in KINDS]


def new_gelu(z):
    """GPT-2's activation, as its graph holds it (eight pointwise ops)."""
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0))))


def gelu_program(z: torch.Tensor) -> str:
    """new_gelu's pointwise Program with z as %0 (the accumulator), encoded for lora_linear."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ..kernels.pointwise_program import program_from_nodes

    gm = make_fx(new_gelu)(z)
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return program_from_nodes([n for n in gm.graph.nodes if n.op == "call_function"], first=first).encode()


def rms_norm(x, weight):
    """LLaMA's RMSNorm as its graph holds it: to, pow, mean (last dim), add, rsqrt, mul, to, mul."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(weight.dtype)


def rms_program(x: torch.Tensor, weight: torch.Tensor) -> tuple[str, list[int]]:
    """RMSNorm as one row Program (what `lower` emits), and the order its inputs take in (x, weight)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ..kernels.pointwise_program import program_from_nodes

    gm = make_fx(rms_norm)(x, weight)
    program = program_from_nodes([n for n in gm.graph.nodes if n.op == "call_function"])
    position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    return program.encode(), [position[n] for n in program.input_nodes]


def variants(row: Row, device: str) -> tuple[dict, str, str]:
    """({variant: fn}, the variant checked, its reference) for a row; compile wraps eager."""
    from ..kernels.bottleneck import bottleneck
    from ..kernels.lora_linear import lora_linear
    from ..kernels.pointwise import pointwise

    gen = torch.Generator(device=device).manual_seed(row.M + len(row.kind))
    rand = lambda *s, scale=1.0: (torch.randn(*s, device=device, generator=gen) * scale).to(row.dtype)  # noqa: E731
    x, w = rand(row.M, row.K), rand(row.N, row.K, scale=row.K ** -0.5)
    a, b = rand(row.r, row.K, scale=row.K ** -0.5), rand(row.N, row.r, scale=0.1)
    base = lambda: F.linear(x, w)  # noqa: E731
    if row.kind == "dora":
        g = (torch.rand(row.N, device=device, generator=gen) + 0.5).to(row.dtype)
        fused = lambda: lora_linear(x, w, None, a, b, [g], SCALE, "out_in", "gain:0")  # noqa: E731

        def eager():
            y = F.linear(x, w)
            return torch.add(y + (g - 1) * y, g * F.linear(F.linear(x, a), b), alpha=SCALE)
    elif row.kind == "ia3-input":
        l_in = (torch.rand(row.K, device=device, generator=gen) + 0.5).to(row.dtype)
        fused = lambda: lora_linear(x, w, None, None, None, [l_in], 1.0, "out_in", "x_gain:0|")  # noqa: E731
        eager = lambda: F.linear(x * l_in, w)  # noqa: E731
    elif row.kind == "bottleneck":
        d, u = rand(row.r, row.N, scale=row.N ** -0.5), rand(row.N, row.r, scale=0.1)
        fused = lambda: (lambda y: bottleneck(y, y, d, u, [], 1.0, "relu", ""))(F.linear(x, w))  # noqa: E731

        def eager():
            y = F.linear(x, w)
            return torch.add(y, F.linear(F.relu(F.linear(y, d)), u))
    elif row.kind == "rmsnorm":
        weight = rand(row.K)
        program, order = rms_program(x, weight)
        eager = lambda: rms_norm(x, weight)  # noqa: E731
        fused = lambda: pointwise([(x, weight)[i] for i in order], program)[0]  # noqa: E731
        base = eager
    elif row.kind == "loha":
        w1a, w2a = rand(row.N, row.r, scale=0.3), rand(row.N, row.r, scale=0.3)
        w1b, w2b = rand(row.r, row.K, scale=row.K ** -0.25), rand(row.r, row.K, scale=row.K ** -0.25)

        def factors():
            down = (w1b[:, None, :] * w2b[None, :, :]).reshape(row.r * row.r, row.K)
            return down, (w1a[:, :, None] * w2a[:, None, :]).reshape(row.N, row.r * row.r)

        fused = lambda: lora_linear(x, w, None, *factors(), [], SCALE, "out_in", "")  # noqa: E731

        def eager():
            down, up = factors()
            return torch.add(F.linear(x, w), F.linear(F.linear(x, down), up), alpha=SCALE)
    else:   # gelu-fc
        bias = rand(row.N)
        program = gelu_program(torch.empty(row.M, row.N, dtype=row.dtype))
        fused = lambda: lora_linear(x, w, bias, a, b, [], SCALE, "out_in", "", program=program)  # noqa: E731
        eager = lambda: new_gelu(F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * SCALE)  # noqa: E731
    return {"base": base, "fused": fused, "eager": eager}, "fused", "eager"


def family_row(row: Row, env: Env) -> dict:
    fns, checked, reference = variants(row, env.device)
    fns["compile"] = env.compiled.get("compile", torch.compile)(fns["eager"])
    times, errors = measure(env, fns, row.graph)
    return {"kind": row.kind, "shape": f"{row.N}x{row.K}", "M": row.M, "r": row.r,
            "dtype": str(row.dtype).replace("torch.", ""), "timer": "graph" if row.graph else "events",
            "us": times, "errors": errors, "rel_err": rel_err(fns[checked], fns[reference])}


def print_family(results: list[dict]) -> None:
    for kind in KINDS:
        mine = [r for r in results if r["kind"] == kind]
        if mine:
            print(f"\n{kind}")
            print_table(table(mine, ["base", "fused", "eager", "compile"],
                              [("eager/fused", lambda r: _ratio(r, "eager", "fused")),
                               ("compile/fused", lambda r: _ratio(r, "compile", "fused")),
                               ("rel err", lambda r: r.get("rel_err", "-"))]))


def _ratio(row: dict, name: str, over: str) -> str:
    us = row["us"]
    return f"{us[name] / us[over]:.2f}x" if name in us and over in us else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_family_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every row (times in microseconds) to this JSON file")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds after which no new row starts")
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_family_kernels: no CUDA device here; skipping (the kernels' timings need a GPU).")
        return 0
    start, results = time.perf_counter(), []
    env = Env("cuda", gpu_timer, None, {})
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}; bf16; "
          "median microseconds; x/base = variant time / base time")
    for row in rows():
        if time.perf_counter() - start > ns.budget:
            break
        try:
            results.append(family_row(row, env))
        except Exception as error:  # noqa: BLE001 - report the row, keep going
            results.append({"kind": row.kind, "shape": f"{row.N}x{row.K}", "M": row.M, "r": row.r, "dtype": "bf16",
                            "timer": "-", "us": {}, "errors": {"row": f"FAILED {type(error).__name__}: {error}"[:90]}})
        torch.cuda.empty_cache()
        print(f"  done {row.kind} M={row.M} at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print_family(results)
    if ns.json:
        write_json(ns.json, {"device": props.name, "torch": torch.__version__, "rows": results})
    return 0
