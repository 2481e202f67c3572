"""The family benchmark's rows run end to end (tiny shapes, interpreter, a one-call timer): every
variant computes, and the fused result matches eager. Timings themselves need a GPU."""
from __future__ import annotations

import pytest
import torch

from surgeon.bench import family as bench_family
from surgeon.bench.harness import Env


@pytest.mark.parametrize("kind", bench_family.KINDS)
def test_every_row_runs_and_fused_matches_eager(kind):
    env = Env("cpu", lambda fn, graph: (fn(), 1e-3)[1], None, {"compile": lambda fn: fn})
    row = bench_family.family_row(bench_family.Row(kind, M=3, N=40, K=48, r=4, dtype=torch.float32), env)
    assert row["errors"] == {} and set(row["us"]) == {"base", "fused", "eager", "compile"}
    assert float(row["rel_err"]) < 1e-5, row["rel_err"]


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert bench_family.main([]) == 0 and "no CUDA device" in capsys.readouterr().out
