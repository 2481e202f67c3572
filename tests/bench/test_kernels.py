"""The kernel benchmark's LoRA-linear row runs end to end on the CPU (tiny shape, interpreter, a
one-call timer); its tile column reads the launcher's tuning table. Timings need a GPU."""
from __future__ import annotations

import torch

from surgeon.bench.harness import Env
from surgeon.bench import kernels as bench
from surgeon.kernels import lora_linear


def test_linear_row_runs_and_reports_the_tuned_strategy(monkeypatch):
    env = Env("cpu", lambda fn, graph: (fn(), 1e-3)[1], lora_linear.lora_linear, {"lora": bench.unfused})
    case = bench.Case("lora", M=3, N=40, K=48, r=4, dtype=torch.float32)
    row = bench.linear_row(case, env)
    assert row["errors"] == {} and set(row["us"]) == {"base", "fused", "eager", "compile"}
    assert float(row["rel_err"]) < 1e-5 and row["tile"] == "-"          # nothing tuned on the CPU
    key = (16, 40, 48, 4, torch.float32, "", True, "cuda:0", "", ())
    monkeypatch.setitem(lora_linear._BEST, key, ("cublas", None))
    assert bench.tile(case) == "cuBLAS+addmm"
    monkeypatch.setitem(lora_linear._BEST, key, ("precomputed", lora_linear.GPU_CONFIGS[16][0]))
    assert bench.tile(case).startswith("pre 16x32x128")
    monkeypatch.setitem(lora_linear._BEST, key, ("precomputed+tma", lora_linear.GPU_CONFIGS[16][0]))
    assert bench.tile(case).startswith("pre tma 16x32x128")
    monkeypatch.setitem(lora_linear._BEST, key, ("fused+splitk", lora_linear.SPLITK_CONFIGS[16][2]))
    assert bench.tile(case) == "splitk8 16x128x128/w4s4"
    monkeypatch.setitem(lora_linear._BEST, key, ("fused+rows", lora_linear.GPU_CONFIGS[None][1]))
    assert bench.tile(case) == "rows 128x128x64/w8s3"
    monkeypatch.setitem(lora_linear._BEST, key, ("cublas+beta", None))
    assert bench.tile(case) == "cuBLAS, LoRA term as C (beta=s)"
