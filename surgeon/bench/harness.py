"""The measuring harness every benchmark table shares.

- `interleaved`: whole-model rows on any device. Every variant runs once per round, round-robin,
  so drift (thermal, other processes) hits all of them alike; a figure is the median over rounds of
  (variant time / baseline time in the same round). Timings on a shared CPU are noisy; ratios taken
  this way are what the tables report, and no test asserts one.
- `Env`, `gpu_timer`, `measure`: kernel rows on a GPU (triton's do_bench, or CUDA-graph replay for
  decode sizes), each variant's failure kept in its cell instead of stopping the table.
- `rel_err`, `table`, `print_table`, `write_json`: checking and printing rows, and keeping them.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REP_MS = 40          # timing window of each GPU measurement


def interleaved(fns: dict[str, Callable], rounds: int, inner: int, baseline: str = "eager base") -> dict[str, float]:
    """{variant: median over rounds of its time / the baseline's time in the same round} (no grad)."""
    ratios: dict[str, list[float]] = {k: [] for k in fns}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(rounds):
            times = {}
            for name, f in fns.items():
                sync()
                start = time.perf_counter()
                for _ in range(inner):
                    f()
                sync()
                times[name] = time.perf_counter() - start
            for name in fns:
                ratios[name].append(times[name] / times[baseline])
    return {k: statistics.median(v) for k, v in ratios.items()}


def write_json(path: str | Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


@dataclass
class Env:
    """Where rows run: the device, a timer (fn, cudagraph) -> ms, the LoRA launcher, compiled eager functions."""

    device: str
    timer: Callable[[Callable, bool], float]
    launcher: Callable
    compiled: dict


def gpu_timer(fn, cudagraph: bool) -> float:
    """Median milliseconds of fn on the GPU (one warm call first: it may tune or compile)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if cudagraph:
        return triton.testing.do_bench_cudagraph(fn, rep=REP_MS, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=REP_MS, return_mode="median")


def failure(error: Exception) -> str:
    text = str(error).splitlines()[0][:60] if str(error) else ""
    return f"FAILED {type(error).__name__}: {text}"


def measure(env: Env, fns: dict[str, Callable], graph: bool) -> tuple[dict, dict]:
    """({variant: microseconds}, {variant: error}) - a failing variant does not stop the others."""
    times, errors = {}, {}
    for name, fn in fns.items():
        try:
            times[name] = env.timer(fn, graph) * 1000
        except Exception as error:  # noqa: BLE001 - report and go on with the other variants
            errors[name] = failure(error)
    return times, errors


def rel_err(out_fn, ref_fn) -> str:
    try:
        out, expected = out_fn().float(), ref_fn().float()
        return f"{((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item():.1e}"
    except Exception as error:  # noqa: BLE001
        return failure(error)


def cell(row: dict, name: str, over: str | None = None) -> str:
    """A time in microseconds, a ratio (name's time / over's time), FAILED, or '-'."""
    if name in row["errors"] or (over is not None and over in row["errors"]):
        return row["errors"][name] if over is None else "FAILED"
    if name not in row["us"]:
        return "-"
    if over is None:
        return f"{row['us'][name]:.1f}"
    return f"{row['us'][name] / row['us'][over]:.2f}x" if over in row["us"] else "-"


def table(rows: list[dict], variants: list[str], extra: list[tuple[str, Callable]]) -> list[list[str]]:
    """Header and cells: case columns, each variant's time, each variant's ratio to base, then extras."""
    header = ["shape", "M", "r", "dtype", "timer"] + [f"{v} us" for v in variants] + \
             [f"{v}/base" for v in variants[1:]] + [title for title, _ in extra]
    lines = [header]
    for row in rows:
        case = [row["shape"], str(row["M"]), str(row["r"]), row["dtype"], row["timer"]]
        if "skipped" in row or "row" in row["errors"]:
            lines.append(case + [row.get("skipped") and "skipped: time budget" or row["errors"]["row"]])
            continue
        lines.append(case + [cell(row, v) for v in variants] + [cell(row, v, "base") for v in variants[1:]] +
                     [fn(row) for _, fn in extra])
    return lines


def print_table(lines: list[list[str]]) -> None:
    """Columns padded to the widest full row; a short row (skipped, failed) runs on past its last column."""
    full = [r for r in lines if len(r) == len(lines[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(lines[0]))]
    for r in [lines[0], ["-" * w for w in widths]] + lines[1:]:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]
        print("  ".join(cells).rstrip(), flush=True)
