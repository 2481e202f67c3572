"""The fused LoRA launcher's per-call plans (kernels/lora_linear.py `_Plan`, `plan_key`).

A plan holds what a call decides from its arguments' metadata: the checks, the step list, the
strategy. A repeated call reuses it; what a plan may not hide is checked here: new values with the
same metadata give the reference's answer, a new stride or dtype makes a new plan (whose checks run),
a GPU's tuned choice stays in the tuner's table, and TMA's alignment is part of the key.
"""
from __future__ import annotations

import pytest
import torch

from surgeon.kernels import lora_linear as kernel, tuning
from tests.kernels.test_lora_linear import TOLERANCE, make


@pytest.fixture
def plans(monkeypatch):
    """A list of the plans made while the test runs (the table starts empty: conftest.py)."""
    made = []
    real = kernel._Plan.make
    monkeypatch.setattr(kernel._Plan, "make", staticmethod(lambda *a: made.append(a) or real(*a)))
    return made


@pytest.fixture
def gpu_tuning(monkeypatch):
    """The GPU's tuning path on interpreted kernels: every candidate times 1 ms, one tile config per
    kind, an empty tuning table."""
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: (fn(), 1.0)[1])
    monkeypatch.setattr(kernel, "_tunes", lambda x: True)
    monkeypatch.setattr(kernel, "_has_tma", lambda device: False)
    monkeypatch.setitem(kernel.GPU_CONFIGS, 16, [(16, 32, 32, 1, 1, 1)])
    monkeypatch.setitem(kernel.SPLITK_CONFIGS, 16, [(16, 32, 32, 1, 1, 1, 2)])
    monkeypatch.setattr(kernel, "_BEST", {})


def test_a_repeated_call_reuses_its_plan_and_reads_the_new_values(plans):
    first = make(7, 70, 40, 4, torch.float32, n_operands=2, seed=0)
    second = make(7, 70, 40, 4, torch.float32, n_operands=2, seed=1)        # same metadata, other values
    for args in (first, second, first):
        out = kernel.lora_linear(**args, epilogue="silu,mul:0,add:1")
        torch.testing.assert_close(out, kernel.reference(**args, epilogue="silu,mul:0,add:1"),
                                   **TOLERANCE[torch.float32])
    assert len(plans) == 1 and len(kernel._PLANS) == 1


def test_new_strides_dtypes_or_epilogues_make_new_plans(plans):
    args = make(7, 70, 40, 4, torch.float32, n_operands=1)
    kernel.lora_linear(**args, epilogue="add:0")
    strided = dict(args, x=torch.randn(70, 7).t())                           # same shape, column-major
    out = kernel.lora_linear(**strided, epilogue="add:0")
    torch.testing.assert_close(out, kernel.reference(**strided, epilogue="add:0"), **TOLERANCE[torch.float32])
    kernel.lora_linear(**args, epilogue="silu,add:0")
    half = make(7, 70, 40, 4, torch.float16, n_operands=1)
    kernel.lora_linear(**half, epilogue="add:0")
    assert len(plans) == 4


def test_a_bad_call_after_a_good_one_is_still_checked(plans):
    args = make(7, 70, 40, 4, torch.float32, n_operands=1)
    kernel.lora_linear(**args, epilogue="add:0")
    bad = dict(args, operands=[args["operands"][0].half()])
    with pytest.raises(ValueError, match=r"operands\[0\] is torch.float16"):
        kernel.lora_linear(**bad, epilogue="add:0")
    with pytest.raises(ValueError, match="epilogue reads operands"):
        kernel.lora_linear(**dict(args, operands=[]), epilogue="add:0")
    assert len(kernel._PLANS) == 1       # a call that failed its checks leaves no plan


def test_the_table_empties_when_full(plans, monkeypatch):
    monkeypatch.setattr(kernel, "PLAN_LIMIT", 2)
    for M in (1, 2, 3):
        kernel.lora_linear(**make(M, 40, 24, 4, torch.float32))
    assert len(plans) == 3 and len(kernel._PLANS) == 1


def test_a_tuned_plan_looks_its_choice_up_in_the_tuners_table(plans, gpu_tuning, monkeypatch):
    """On a GPU the choice stays in the tuner's table: a choice set there is what the next call runs,
    and emptying it (a new process) makes the same plan read the disk cache, or tune again."""
    ran = []
    real_launch = kernel._Plan.launch
    monkeypatch.setattr(kernel._Plan, "launch", lambda self, *a, **kw: ran.append(a[7]) or real_launch(self, *a, **kw))
    args = make(3, 70, 40, 4, torch.float32)
    kernel.lora_linear(**args)
    assert len(kernel._BEST) == 1 and len(ran) > 1                  # tuned: every candidate launched
    (bucket, _), = kernel._BEST.items()
    kernel._BEST[bucket] = ("cublas+beta", None)
    ran.clear()
    out = kernel.lora_linear(**args)
    assert ran == ["cublas+beta"]
    torch.testing.assert_close(out, kernel.reference(**args), **TOLERANCE[torch.float32])
    kernel._BEST.clear()                                            # a new process: the disk cache answers
    ran.clear()
    kernel.lora_linear(**args)
    assert ran == [kernel._BEST[bucket][0]]
    kernel._BEST.clear()
    tuning.cache_path().unlink()                                    # and without it, the plan tunes again
    ran.clear()
    kernel.lora_linear(**args)
    assert len(ran) > 1 and len(plans) == 1


def test_the_key_holds_tma_alignment_where_tma_may_run(monkeypatch):
    args = make(8, 64, 32, 4, torch.float16, bias=False)
    storage = torch.empty(8 * 64 + 1, dtype=torch.float16)
    shifted = storage[1:].view(8, 64).copy_(args["x"])              # same shape and strides, 2 bytes off
    assert shifted.data_ptr() % 16 != 0 and shifted.stride() == args["x"].stride()
    key = lambda x, mode=None: kernel.plan_key(x, args["weight"], None, args["lora_a"], args["lora_b"], [],  # noqa: E731
                                               "out_in", "", None, mode, "")
    assert key(args["x"]) == key(shifted)                            # no TMA here: alignment is not read
    assert key(args["x"], "fused+tma") != key(shifted, "fused+tma")
    untuned = key(args["x"])
    monkeypatch.setattr(kernel, "_tunes", lambda x: True)
    assert key(args["x"]) != key(shifted)
    assert key(args["x"]) != untuned                                 # whether the call tunes is part of it


def test_a_first_call_inside_a_cuda_graph_capture_says_to_warm_up(plans, gpu_tuning, monkeypatch):
    """Under capture nothing can be timed: the first call of a bucket says so; after a warm-up call
    (outside the capture) the same shapes run the tuned choice, capture or not."""
    capturing = [True]
    monkeypatch.setattr(tuning, "capture_reason", lambda x: "inside a capture: warm up first" if capturing[0] else "")
    args = make(3, 70, 40, 4, torch.float32)
    with pytest.raises(RuntimeError, match="lora_linear: no tuned choice .* inside a capture: warm up first"):
        kernel.lora_linear(**args)
    capturing[0] = False
    kernel.lora_linear(**args)                                       # the warm-up tunes
    capturing[0] = True
    torch.testing.assert_close(kernel.lora_linear(**args), kernel.reference(**args), **TOLERANCE[torch.float32])


def test_the_tuners_strategies_by_rows_and_vectors(monkeypatch):
    """What a GPU times: split-K up to 64 rows, "+rows" above (not with VeRA's d or LoRA-XS's R, whose
    rewrite of x @ A^T the chunk's tiles would share), TMA where rows are aligned, both cuBLAS forms."""
    monkeypatch.setattr(kernel, "_tunes", lambda x: True)
    monkeypatch.setattr(kernel, "_has_tma", lambda device: True)

    def modes(M, epilogue="", operands=()):
        args = dict(make(M, 64, 32, 4, torch.float16, bias=False), operands=list(operands))
        return kernel._Plan.make(args["x"], args["weight"], None, args["lora_a"], args["lora_b"], args["operands"],
                                 "out_in", epilogue, None, None, "").modes

    assert modes(16) == ("fused", "precomputed", "fused+tma", "precomputed+tma", "fused+splitk",
                         "precomputed+splitk", "cublas", "cublas+beta")
    assert modes(65) == ("fused", "precomputed", "fused+tma", "precomputed+tma", "fused+rows", "cublas",
                         "cublas+beta")
    assert "fused+rows" not in modes(65, "vera_d:0|", [torch.rand(4).half()])
