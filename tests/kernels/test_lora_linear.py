"""The generated fused LoRA linear kernel against its torch reference, under TRITON_INTERPRET=1.

Shapes are awkward on purpose: M in (1, 7, 129), K = 70 and N = 40 (not multiples of the
32-wide interpreter tiles, three K steps, two column tiles), r in (1, 4, 16). The golden test
pins the generated source; the custom-op tests cover export, torch.compile and autograd.
"""
from __future__ import annotations

import pytest
import torch

from surgeon.kernels import lora_linear as kernel
from surgeon.kernels.epilogue import parse, steps
from tests.kernels.golden_files import assert_matches_golden
from tests.kernels.sm90 import compile_sm90, jit_mode

SPLIT_POINTERS = {"ws_ptr": "*fp32", "count_ptr": "*i32"}      # the split-K workspace and arrival counters

# kernel vs reference, both fp32 accumulation then one rounding to the output dtype: they differ
# by summation order (fp32: ~K eps relative) and for fp16 by at most a flip of the final rounding
# (2^-10 relative per ulp; 2 ulp allowed)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
EPILOGUES = ["", "silu", "gelu", "gelu_tanh", "relu", "mul:0", "add:0", "scale:0.25", "silu,mul:0,add:1,scale:0.5"]


def make(M, K, N, r, dtype, n_operands=0, seed=0, bias=True, layout="out_in"):
    """Inputs of a lora_linear call with O(1) outputs."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(dtype)  # noqa: E731
    weight = rand(N, K, s=K ** -0.5)
    return dict(x=rand(M, K), weight=weight if layout == "out_in" else weight.t().contiguous(),
                bias=rand(N) if bias else None, lora_a=rand(r, K, s=K ** -0.5), lora_b=rand(N, r, s=r ** -0.5),
                operands=[rand(M, N) for _ in range(n_operands)], scale=1.5, weight_layout=layout)


def n_operands(epilogue: str) -> int:
    return 1 + max((s.operand for s in parse(epilogue) if s.operand is not None), default=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [1, 7, 129])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_kernel_matches_reference_on_awkward_shapes(M, r, dtype):
    args = make(M, 70, 40, r, dtype, n_operands=2)
    epilogue = "silu,mul:0,add:1"
    out = kernel.lora_linear(**args, epilogue=epilogue)
    assert out.shape == (M, 40) and out.dtype == dtype
    torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **TOLERANCE[dtype])


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_epilogue_rule(epilogue, bias):
    args = make(7, 70, 40, 4, torch.float32, n_operands=n_operands(epilogue), bias=bias)
    out = kernel.lora_linear(**args, epilogue=epilogue)
    torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("scale", [0.75, -3.0, 2.0 ** -90, 0.0, 1e-39, 2.0 ** 110],
                         ids=["0.75", "-3", "2^-90", "0", "subnormal", "2^110"])
@pytest.mark.parametrize("mode", ["fused", "precomputed", "fused+splitk"])
def test_any_scale_gives_the_reference(mode, scale, monkeypatch):
    """The kernels accumulate the up-projection as s * (acc / s + h @ B^T); a scale whose inverse is
    not a normal fp32 number (0, subnormal, huge) runs the cuBLAS composition instead."""
    from surgeon.kernels import lora_linear_cublas

    composed = []
    real = lora_linear_cublas.cublas
    monkeypatch.setattr(kernel, "_cublas", lambda *a, **kw: composed.append(1) or real(*a, **kw))
    args = dict(make(7, 70, 40, 4, torch.float32, n_operands=1), scale=scale)
    out = kernel.lora_linear(**args, epilogue="add:0", mode=mode)
    assert bool(composed) == (not kernel.invertible(scale))
    torch.testing.assert_close(out, kernel.reference(**args, epilogue="add:0"), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("mode", ["fused", "precomputed", "fused+splitk"])
@pytest.mark.parametrize("scale, size", [(1e-30, 1e5), (2.0 ** -24, 1e5), (1e29, 1e-6), (2.0 ** 24, 1e-6)],
                         ids=["1e-30, acc 1e10", "2^-24, acc 1e10", "1e29, acc 1e-12", "2^24, acc 1e-12"])
def test_acc_over_s_stays_a_normal_fp32_number(mode, scale, size):
    """Where acc / s would overflow (large acc, tiny s) or turn subnormal (tiny acc, huge s), the
    call runs the cuBLAS composition (`invertible`); at the range's ends the kernel is still exact.
    B = 0 (LoRA's initialization) makes z = x @ W^T, the same to the last bit as with s = 1 where the
    kernel runs both; where the composition runs, the BLAS sums in its own order, so the bound is
    relative to the largest output (as small as 1e-12 here): a flushed acc / s would miss by 100%."""
    args = make(2, 16, 16, 4, torch.float32, bias=False)
    args.update(x=args["x"] * size, weight=args["weight"] * size, lora_b=torch.zeros(16, 4))
    unit = kernel.lora_linear(**dict(args, scale=1.0), mode=mode)
    out = kernel.lora_linear(**dict(args, scale=scale), mode=mode)
    assert torch.isfinite(out).all()
    if kernel.invertible(scale):
        torch.testing.assert_close(out, unit, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, unit, rtol=1e-6, atol=1e-6 * unit.abs().max().item())


@pytest.mark.parametrize("mode", ["fused", "precomputed", "cublas", "cublas+beta"])
def test_a_zero_scale_keeps_a_nan_of_the_lora_branch(mode):
    """z + 0 * up is NaN where up is, in the graph and the reference; BLAS's alpha or beta of 0
    would skip the product, so a zero scale takes an elementwise add."""
    args = dict(make(3, 16, 16, 4, torch.float32, bias=False), scale=0.0)
    args["lora_b"][0, 0] = float("nan")
    expected = kernel.reference(**args)
    assert expected.isnan().any()
    torch.testing.assert_close(kernel.lora_linear(**args, mode=mode), expected, equal_nan=True,
                               **TOLERANCE[torch.float32])


def test_no_input_features_give_the_bias():
    """K = 0: x @ W^T is a sum of nothing, so z is the bias on every row (not an empty output)."""
    args = dict(x=torch.randn(3, 0), weight=torch.randn(5, 0), bias=torch.randn(5), lora_a=torch.randn(2, 0),
                lora_b=torch.randn(5, 2), operands=[], scale=1.5)
    out = kernel.lora_linear(**args)
    torch.testing.assert_close(out, args["bias"].expand(3, 5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_conv1d_layout_and_leading_dims_and_strided_inputs(dtype):
    args = make(2 * 33, 37, 33, 16, dtype, n_operands=1, layout="in_out")     # GPT-2 Conv1D: W is in x out
    args["x"] = args["x"].reshape(2, 33, 37)
    args["operands"] = [torch.randn(33, 2, 33, generator=torch.Generator().manual_seed(3)).to(dtype).transpose(0, 1)]
    out = kernel.lora_linear(**args, epilogue="gelu,add:0")
    assert out.shape == (2, 33, 33)
    torch.testing.assert_close(out, kernel.reference(**args, epilogue="gelu,add:0"), **TOLERANCE[dtype])


def test_reference_is_the_unfused_graph_math():
    a = make(5, 24, 12, 4, torch.float64, n_operands=1)
    x, w, b = a["x"], a["weight"], a["bias"]
    unfused = torch.nn.functional.silu(torch.nn.functional.linear(x, w, b) +
                                       a["scale"] * (x @ a["lora_a"].T) @ a["lora_b"].T) * a["operands"][0]
    torch.testing.assert_close(kernel.reference(**a, epilogue="silu,mul:0"), unfused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("epilogue", ["gain:0", "gain:0,bias", "gain:0,bias,silu,mul:1"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "no-lora"])
def test_gain_vector_and_placed_bias_with_and_without_lora(epilogue, lora, dtype):
    """IA3 (no LoRA, z * l[n] after the bias) and DoRA (z * g[n] before the bias) regions."""
    args = make(7, 70, 40, 4, dtype, n_operands=2)
    args["operands"][0] = args["operands"][0][0].contiguous()          # the gain is one value per output
    if not lora:
        args.update(lora_a=None, lora_b=None)
    out = kernel.lora_linear(**args, epilogue=epilogue)
    torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **TOLERANCE[dtype])
    source = kernel.render(steps(epilogue, True), mode="fused" if lora else "none")
    assert ("x_lora_a" in source) == lora and "gain0[None, :]" in source


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [1, 7, 129])
@pytest.mark.parametrize("r", [1, 16])
def test_precomputed_mode_matches_the_fused_one(M, r, dtype):
    """x @ A^T computed before the launch (one dot in the K loop) gives the same values as the fused loop."""
    args = make(M, 70, 40, r, dtype, n_operands=1)
    fused = kernel.lora_linear(**args, epilogue="gelu,add:0", mode="fused")
    pre = kernel.lora_linear(**args, epilogue="gelu,add:0", mode="precomputed")
    torch.testing.assert_close(pre, kernel.reference(**args, epilogue="gelu,add:0"), **TOLERANCE[dtype])
    torch.testing.assert_close(pre, fused, **TOLERANCE[dtype])
    source = kernel.render(steps("gelu,add:0", True), mode="precomputed")
    loop = source.split("for k_start")[1].split("mask_out =")[0]
    assert loop.count("tl.dot(") == 2 and "a_t_tile" not in source     # the base dot, then h @ B^T after it
    with pytest.raises(ValueError, match="mode 'none' with LoRA tensors"):
        kernel.lora_linear(**args, mode="none")


# the cuBLAS composition rounds to fp16 after each op (GEMM, LoRA accumulate, each epilogue step: at
# most 4 here, 2^-11 relative each) where the reference rounds once
CUBLAS_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2.5e-3, atol=2.5e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("epilogue,lora", [("", True), ("silu,mul:1", True), ("gain:0,bias", True),
                                           ("gain:0,silu", False)])
@pytest.mark.parametrize("mode", ["cublas", "cublas+beta"])
def test_cublas_composition_matches_the_reference(mode, epilogue, lora, dtype, monkeypatch):
    """The torch-op strategies the GPU tuner weighs against the kernels (plain torch: run on the CPU):
    the GEMM then the LoRA term accumulated, or the LoRA term first as the GEMM's C (beta = s)."""
    args = make(7, 70, 40, 4, dtype, n_operands=2)
    if "gain:0" in epilogue:
        args["operands"][0] = args["operands"][0][0].contiguous()      # one value per output
    if not lora:
        args.update(lora_a=None, lora_b=None)
    out = kernel.lora_linear(**args, epilogue=epilogue, mode=mode)
    torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **CUBLAS_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["fused", "precomputed", "cublas", "none"])
def test_x_gain_prologue_scales_the_input_columns(mode, dtype):
    """IA3 on a linear's input: x's K columns scaled by l inside the K loop ("x_gain:0|...")."""
    args = make(7, 70, 40, 4, dtype, n_operands=2)
    args["operands"][0] = (torch.rand(70, generator=torch.Generator().manual_seed(9)) + 0.5).to(dtype)
    if mode == "none":
        args.update(lora_a=None, lora_b=None)
    epilogue = "x_gain:0|silu,mul:1"
    out = kernel.lora_linear(**args, epilogue=epilogue, mode=mode)
    tolerance = CUBLAS_TOLERANCE if mode.startswith("cublas") else TOLERANCE
    torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **tolerance[dtype])
    scaled = dict(args, x=args["x"] * args["operands"][0], operands=[args["operands"][1]])
    torch.testing.assert_close(kernel.reference(**args, epilogue=epilogue),
                               kernel.reference(**scaled, epilogue="silu,mul:0"), rtol=0, atol=0)
    source = kernel.render(steps(epilogue, True), mode=mode if mode != "cublas" else "fused",
                           vectors=("x_gain",))
    assert "x_tile = x_tile * x_gain[None, :]" in source and "(x * x_gain[k]) @ W^T" in source


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["fused+tma", "precomputed+tma", "none+tma"])
@pytest.mark.parametrize("M", [1, 7, 129])
def test_tma_modes_match_the_reference(M, mode, dtype):
    """Descriptor (TMA) loads: edge tiles read zeros past M, N, K and R as the masked loads do.
    K = 72 and N = 40: rows 16-byte aligned in fp16 and fp32, neither a multiple of the 32-wide tile."""
    args = make(M, 72, 40, 4, dtype, n_operands=1)
    if mode == "none+tma":
        args.update(lora_a=None, lora_b=None)
    out = kernel.lora_linear(**args, epilogue="silu,add:0", mode=mode)
    torch.testing.assert_close(out, kernel.reference(**args, epilogue="silu,add:0"), **TOLERANCE[dtype])
    source = kernel.render(steps("silu,add:0", True), mode=mode)
    assert "x_desc.load([pid_m * BLOCK_M, k_start])" in source and ("a_desc" in source) == (mode == "fused+tma")


def test_tma_modes_are_refused_where_rows_are_not_aligned():
    args = make(7, 70, 40, 4, torch.float16)                  # a row of 70 halves is 140 bytes
    assert not kernel.tma_ready(args["x"], args["weight"], args["lora_a"], "out_in")
    with pytest.raises(ValueError, match="TMA cannot read"):
        kernel.lora_linear(**args, mode="fused+tma")
    aligned = make(7, 72, 40, 4, torch.float16, layout="in_out")
    assert not kernel.tma_ready(aligned["x"], aligned["weight"], aligned["lora_a"], "in_out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["fused+splitk", "precomputed+splitk", "none+splitk"])
@pytest.mark.parametrize("M,split", [(1, 2), (7, 4), (129, 2)])
def test_splitk_modes_match_the_reference(M, split, mode, dtype):
    """Split-K: K = 70 is three 32-wide steps, so 2 slices take two steps and one, 4 slices leave one
    empty. The last program of each tile sums the slices in order and resets its counter: a second
    launch on the same workspace is right too, and every counter is back at zero."""
    args = make(M, 70, 40, 4, dtype, n_operands=1)
    if mode == "none+splitk":
        args.update(lora_a=None, lora_b=None)
    expected = kernel.reference(**args, epilogue="silu,add:0")
    config = (*kernel.INTERPRET_CONFIG, split)
    for _ in range(2):
        out = kernel.lora_linear(**args, epilogue="silu,add:0", mode=mode, config=config)
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    from surgeon.kernels import dispatch

    counters = dispatch.SPLIT_WORKSPACES[("cpu", 0)][1]
    assert counters.abs().sum() == 0 and counters.numel() >= kernel.triton_cdiv(M, 32) * 2
    source = kernel.render(steps("silu,add:0", True), mode=mode)
    assert "range(k_first, k_last, BLOCK_K)" in source and "if arrived == SPLIT_K - 1:" in source
    assert ("x_lora_a += tl.load(h_ws" in source) == (mode == "fused+splitk")


@pytest.mark.parametrize("mode", ["fused+splitk", "precomputed+splitk"])
def test_splitk_with_prologue_vectors(mode):
    """IA3 on x (inside the split loop), VeRA's d and b, LoRA-XS's R (after the slices are summed)."""
    gen = torch.Generator().manual_seed(4)
    for epilogue, extra in [("x_gain:0|relu", [torch.rand(70, generator=gen) + 0.5]),
                            ("vera_d:0,vera_b:1|silu", [torch.rand(4, generator=gen) + 0.5,
                                                        torch.rand(40, generator=gen) + 0.5]),
                            ("xs_r:0|", [torch.randn(4, 4, generator=gen) * 0.5])]:
        args = dict(make(7, 70, 40, 4, torch.float32), operands=extra)
        out = kernel.lora_linear(**args, epilogue=epilogue, mode=mode)
        torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,N", [(1, 100), (7, 100), (129, 40), (7, 33)])
@pytest.mark.parametrize("r", [1, 16])
def test_rows_mode_matches_the_reference(M, N, r, dtype):
    """"fused+rows": a program per row tile and chunk of column tiles. Under the interpreter a row
    tile's columns split in two chunks where it is the only row tile: N = 100 (four 32-wide tiles)
    gives two chunks of two, so x @ A^T is computed in a chunk's first tile and reused by the next;
    129 rows (five row tiles) give one chunk of all the columns; N = 33 leaves a 1-wide last tile."""
    args = make(M, 70, N, r, dtype, n_operands=2)
    chunks = kernel.column_chunks(torch.device("cpu"), M, N, kernel.INTERPRET_CONFIG)
    assert chunks == (2 if M < 32 else 1)
    out = kernel.lora_linear(**args, epilogue="silu,mul:0,add:1", mode="fused+rows")
    torch.testing.assert_close(out, kernel.reference(**args, epilogue="silu,mul:0,add:1"), **TOLERANCE[dtype])


def test_rows_mode_with_prologue_vectors_and_where_it_is_refused():
    """x's gain is read in both K loops and VeRA's b scales each tile's up-projection; VeRA's d and
    LoRA-XS's R would rewrite the x @ A^T the chunk's tiles share, so "+rows" refuses them."""
    gen = torch.Generator().manual_seed(4)
    for epilogue, extra in [("x_gain:0|relu", [torch.rand(70, generator=gen) + 0.5]),
                            ("vera_b:0|silu", [torch.rand(100, generator=gen) + 0.5])]:
        args = dict(make(7, 70, 100, 4, torch.float32), operands=extra)
        out = kernel.lora_linear(**args, epilogue=epilogue, mode="fused+rows")
        torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **TOLERANCE[torch.float32])
    for epilogue, extra in [("vera_d:0|", [torch.rand(4)]), ("xs_r:0|", [torch.randn(4, 4)])]:
        with pytest.raises(ValueError, match="'fused\\+rows' \\(LoRA without VeRA's d or LoRA-XS's R\\)"):
            kernel.lora_linear(**dict(make(7, 70, 100, 4, torch.float32), operands=extra), epilogue=epilogue,
                               mode="fused+rows")
    with pytest.raises(ValueError, match="'fused\\+rows'"):
        kernel.lora_linear(**dict(make(7, 70, 100, 4, torch.float32), lora_a=None, lora_b=None), mode="fused+rows")


@pytest.mark.parametrize("mode", ["fused", "precomputed", "fused+splitk", "fused+rows", "cublas"])
def test_no_output_columns_give_an_empty_output(mode):
    """N = 0: an M x 0 output whatever the mode ("+rows" has no column tile to split in chunks)."""
    assert kernel.lora_linear(**make(7, 70, 0, 4, torch.float32), mode=mode).shape == (7, 0)


@pytest.mark.parametrize("vectors", [("vera_d",), ("xs_r",)])
def test_the_header_lists_only_the_modes_a_gpu_times(vectors):
    """A region whose x @ A^T VeRA's d or LoRA-XS's R rewrite is not timed in "+rows"; its generated
    header (passes/lower.py writes one per region) does not list it either."""
    header = kernel.render(steps("silu", True), "layer", mode="fused", vectors=vectors).partition('"""\nimport')[0]
    assert "fused+splitk" in header and "fused+rows" not in header
    assert "fused+rows" in kernel.render(steps("silu", True), "layer", mode="fused").partition('"""\nimport')[0]


def test_column_chunks_fill_the_gpu_and_leave_no_chunk_empty(monkeypatch):
    """On a 132-SM GPU: 32 row tiles of 128 (M = 4096) split 16 column tiles of 256 in 4 chunks of 4
    (128 programs); 8 row tiles (M = 1024) in 16 chunks of 1; 132 or more row tiles need no split;
    and 5 chunks of 16 tiles would leave the fifth empty, so it is 4."""
    monkeypatch.setattr(kernel, "_sm_count", lambda index: 132)
    monkeypatch.delenv("TRITON_INTERPRET")
    cuda, cfg = torch.device("cuda", 0), (128, 256, 64, 8, 8, 3)
    assert kernel.column_chunks(cuda, 4096, 4096, cfg) == 4
    assert kernel.column_chunks(cuda, 1024, 4096, cfg) == 16
    assert kernel.column_chunks(cuda, 132 * 128, 4096, cfg) == 1
    assert kernel.column_chunks(cuda, 4096, 14336, cfg) == 5      # 56 tiles: 5 chunks of 12, the last of 8


def vera_args(M, dtype, r=4):
    """A LoRA call plus VeRA's vectors: operand 0 is d (r values), operand 1 is b (N values)."""
    args = make(M, 72, 40, r, dtype)
    gen = torch.Generator().manual_seed(11)
    args["operands"] = [(torch.rand(r, generator=gen) + 0.5).to(dtype), (torch.rand(40, generator=gen) + 0.5).to(dtype)]
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["fused", "precomputed", "cublas", "cublas+beta", "fused+tma"])
def test_vera_vectors_scale_the_lora_branch(mode, dtype):
    """VeRA: z = x W^T + ((x A^T) * d) B^T * b, the vectors in a prologue "vera_d:0,vera_b:1|"."""
    args = vera_args(7, dtype)
    epilogue = "vera_d:0,vera_b:1|silu"
    out = kernel.lora_linear(**args, epilogue=epilogue, mode=mode)
    tolerance = CUBLAS_TOLERANCE if mode.startswith("cublas") else TOLERANCE
    torch.testing.assert_close(out, kernel.reference(**args, epilogue=epilogue), **tolerance[dtype])
    assert "((x @ A^T) * d[r]) @ B^T * b[n]" in kernel.render(steps(epilogue, True), vectors=("vera_d", "vera_b"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["fused", "precomputed", "cublas", "cublas+beta", "precomputed+tma"])
@pytest.mark.parametrize("r", [1, 16])
def test_lora_xs_middle_matrix(r, mode, dtype):
    """LoRA-XS: z = x W^T + s ((x A^T) R^T) B^T, R (r x r) as prologue operand "xs_r:0|"."""
    args = make(7, 72, 40, r, dtype)
    args["operands"] = [(torch.randn(r, r, generator=torch.Generator().manual_seed(5)) * r ** -0.5).to(dtype)]
    out = kernel.lora_linear(**args, epilogue="xs_r:0|relu", mode=mode)
    tolerance = CUBLAS_TOLERANCE if mode.startswith("cublas") else TOLERANCE
    torch.testing.assert_close(out, kernel.reference(**args, epilogue="xs_r:0|relu"), **tolerance[dtype])
    double = {k: v.double() if torch.is_tensor(v) else [o.double() for o in v] if isinstance(v, list) else v
              for k, v in args.items()}
    x, a = double["x"], double["lora_a"]
    unfused = x @ double["weight"].T + double["bias"] + \
        args["scale"] * ((x @ a.T) @ double["operands"][0].T) @ double["lora_b"].T
    torch.testing.assert_close(kernel.reference(**double, epilogue="xs_r:0|"), unfused)


def test_reference_of_the_vera_form_is_the_unfused_math():
    a = vera_args(5, torch.float64)
    x, w, b = a["x"], a["weight"], a["bias"]
    d, bvec = a["operands"]
    vera = x @ w.T + b + a["scale"] * (((x @ a["lora_a"].T) * d) @ a["lora_b"].T) * bvec
    torch.testing.assert_close(kernel.reference(**a, epilogue="vera_d:0,vera_b:1|"), vera)


def test_reference_of_the_gain_and_no_lora_forms_is_the_unfused_math():
    a = make(5, 24, 12, 4, torch.float64, n_operands=1)
    x, w, b, g = a["x"], a["weight"], a["bias"], a["operands"][0][0]
    dora = g * (x @ w.T + a["scale"] * (x @ a["lora_a"].T) @ a["lora_b"].T) + b
    torch.testing.assert_close(kernel.reference(**{**a, "operands": [g]}, epilogue="gain:0,bias"), dora)
    ia3 = (x @ w.T + b) * g
    torch.testing.assert_close(kernel.reference(**{**a, "operands": [g], "lora_a": None, "lora_b": None},
                                                epilogue="gain:0"), ia3)


def test_bf16_is_skipped_under_the_interpreter():
    pytest.skip("bf16 tl.dot is wrong in Triton's interpreter (errors ~1e10 on this CPU build); "
                "bf16 is checked on a GPU by benchmarks/bench_lora_kernel.py")


def test_launcher_rejects_bad_arguments():
    args = make(3, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="lora_b is"):
        kernel.lora_linear(**{**args, "lora_b": args["lora_b"].t()})
    with pytest.raises(ValueError, match="operands"):
        kernel.lora_linear(**args, epilogue="mul:0")
    with pytest.raises(ValueError, match="no rule 'tanh'"):
        kernel.lora_linear(**args, epilogue="tanh")
    with pytest.raises(ValueError, match="places the bias 1 times, with no bias"):
        kernel.lora_linear(**{**args, "bias": None}, epilogue="gain:0,bias")
    with pytest.raises(ValueError, match="both tensors or both None"):
        kernel.lora_linear(**{**args, "lora_a": None})
    with pytest.raises(ValueError, match=r"operands\[0\] is .*expected torch.float32\[8\]"):
        kernel.lora_linear(**{**args, "operands": [torch.ones(3, 8)]}, epilogue="gain:0")
    assert kernel.lora_linear(**{**args, "x": args["x"][:0]}).shape == (0, 8)


def test_generated_source_matches_golden():
    chain = steps("silu,mul:0,add:1", has_bias=True)
    text = kernel.render(chain, "lora_linear@model.layers.0.mlp.gate_proj",
                         ["linear          aten.linear.default  model.layers.0.mlp.gate_proj",
                          "silu            aten.silu.default    model.layers.0.mlp.act_fn"])
    assert_matches_golden(text, "lora_linear_bias_silu_mul_add.py")


def test_kernel_body_is_shared_between_regions_with_the_same_steps():
    chain = steps("relu", has_bias=False)
    a, b = kernel.render(chain, "lora_linear@a", ["x"]), kernel.render(chain, "lora_linear@b", ["y"])
    assert a != b and a.split("@triton.jit")[1] == b.split("@triton.jit")[1]
    assert kernel.load_kernel(chain) is kernel.load_kernel(chain)


@pytest.mark.parametrize("vectors", [(), ("x_gain", "vera_d", "vera_b")], ids=["", "vectors"])
@pytest.mark.parametrize("mode", ["fused", "precomputed", "none", "fused+tma", "precomputed+tma", "none+tma",
                                  "fused+splitk", "none+splitk", "fused+rows"])
def test_generated_kernel_compiles_for_an_h100_without_a_gpu(monkeypatch, mode, vectors):
    """Compile to sm_90 machine code (the interpreter checks semantics, not that Triton can lower it)."""
    jit_mode(monkeypatch)
    if mode == "fused+rows":              # its tiles share x @ A^T: VeRA's d (which rewrites it) is refused
        vectors = tuple(v for v in vectors if v != "vera_d")
    fn = kernel.load_kernel(steps("silu,mul:0", has_bias=True), mode, vectors=vectors)
    meta = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, BLOCK_R=16, GROUP_M=8, DOT_PRECISION="tf32",
                **({"SPLIT_K": 4} if mode.endswith("+splitk") else {}))
    compiled = compile_sm90(fn, meta, SPLIT_POINTERS, ("lora_scale",), num_warps=4, num_stages=3)
    assert compiled.asm["cubin"] and compiled.metadata.shared > 0


@pytest.mark.parametrize("mode", ["fused", "precomputed", "precomputed+tma", "fused+rows"])
@pytest.mark.parametrize("config", [(128, 256, 64, 8, 8, 3), (128, 128, 32, 8, 4, 4), (256, 128, 64, 8, 8, 3)],
                         ids=["128x256w8", "128x128w4", "256x128w8"])
def test_prefill_tiles_keep_their_registers_on_an_h100(monkeypatch, mode, config):
    """Compiled for sm_90 as a bf16 launch specializes them, the large prefill tiles spill no register
    (in "+rows", none inside its K loops).
    Before the up-projection accumulated into acc (s * (acc / s + h @ B^T)), its own fp32 tile beside
    acc's made each of these spill 260-550 bytes per thread, with 64-128 spill loads and stores inside
    the K loop."""
    from tests.kernels.sm90 import compile_like_launch, resource_usage

    jit_mode(monkeypatch)
    launched = []
    monkeypatch.setattr(kernel, "_launch", lambda fn, args, M, N, cfg, block_r, precision, grid=None:
                        launched.append((fn, args, block_r, precision)))
    args = make(256, 256, 256, 16, torch.bfloat16, bias=False)
    kernel.lora_linear(**args, config=config, mode=mode)
    fn, launch_args, block_r, precision = launched[-1]
    bm, bn, bk, group_m, warps, stages = config
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=group_m, DOT_PRECISION=precision)
    usage = resource_usage(compile_like_launch(fn, launch_args, meta, num_warps=warps, num_stages=stages))
    assert usage["loop_spills"] == 0, usage
    if mode != "fused+rows":    # which carries x @ A^T across its tiles: some spill once per tile, not per K step
        assert usage["stack"] == 0, usage


# ---------------------------------------------------------------- the custom op


@pytest.fixture
def op():
    from surgeon.kernels import registry

    return registry


def test_custom_op_runs_the_interpreted_kernel_and_has_a_fake(op):
    assert op.backend("cpu") == "triton-interpreter"
    args = make(7, 70, 40, 4, torch.float32, n_operands=1)
    out = torch.ops.surgeon.lora_linear(*args.values(), "silu,mul:0", "")
    torch.testing.assert_close(out, kernel.reference(**args, epilogue="silu,mul:0"), **TOLERANCE[torch.float32])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.surgeon.lora_linear(*(mode.from_tensor(t) if torch.is_tensor(t) else
                                               [mode.from_tensor(o) for o in t] if isinstance(t, list) else t
                                               for t in args.values()), "silu,mul:0", "")
    assert fake.shape == (7, 40) and fake.dtype == torch.float32


class Fused(torch.nn.Module):
    def __init__(self, K=24, N=12, r=4):
        super().__init__()
        a = make(1, K, N, r, torch.float32)
        self.weight, self.bias = torch.nn.Parameter(a["weight"], requires_grad=False), torch.nn.Parameter(a["bias"])
        self.lora_a, self.lora_b = torch.nn.Parameter(a["lora_a"]), torch.nn.Parameter(a["lora_b"])

    def forward(self, x, gate):
        return torch.ops.surgeon.lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, [gate], 2.0,
                                             "out_in", "gelu,mul:0", "")

    def unfused(self, x, gate):
        z = torch.nn.functional.linear(x, self.weight, self.bias) + 2.0 * (x @ self.lora_a.T) @ self.lora_b.T
        return torch.nn.functional.gelu(z) * gate


def test_custom_op_exports(op):
    module, x, gate = Fused(), torch.randn(3, 24), torch.randn(3, 12)
    ep = torch.export.export(module, (x, gate))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.surgeon.lora_linear.default in targets
    torch.testing.assert_close(ep.module()(x, gate), module.unfused(x, gate), rtol=1e-5, atol=1e-5)


def test_custom_op_autograd_matches_unfused(op):
    module, x, gate = Fused(), torch.randn(3, 24, requires_grad=True), torch.randn(3, 12, requires_grad=True)
    grads = []
    for forward in (module.forward, module.unfused):
        module.zero_grad()
        x.grad = gate.grad = None
        (forward(x, gate) ** 2).sum().backward()
        grads.append([t.grad.clone() for t in (x, gate, module.bias, module.lora_a, module.lora_b)])
    assert module.weight.grad is None
    for fused, unfused in zip(*grads):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_custom_op_gradcheck_on_the_reference_path(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    gen = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w, b, a, bb, g, res = t(2, 3, 5), t(5, 6), t(6), t(2, 5), t(6, 2), t(2, 3, 6), t(2, 3, 6)
    f = lambda x, w, b, a, bb, g, res: torch.ops.surgeon.lora_linear(  # noqa: E731
        x, w, b, a, bb, [g, res], 1.7, "in_out", "gelu_tanh,mul:0,relu,add:1,scale:0.5", "")
    assert torch.autograd.gradcheck(f, (x, w, b, a, bb, g, res))
    gain = t(6)
    dora = lambda x, w, b, a, bb, gain: torch.ops.surgeon.lora_linear(  # noqa: E731
        x, w, b, a, bb, [gain], 1.7, "in_out", "gain:0,bias,silu", "")
    assert torch.autograd.gradcheck(dora, (x, w, b, a, bb, gain))
    ia3 = lambda x, w, b, gain: torch.ops.surgeon.lora_linear(  # noqa: E731
        x, w, b, None, None, [gain], 1.0, "in_out", "gain:0", "")
    assert torch.autograd.gradcheck(ia3, (x, w, b, gain))
    x_gain = t(5)
    ia3_input = lambda x, w, b, a, bb, x_gain, g: torch.ops.surgeon.lora_linear(  # noqa: E731
        x, w, b, a, bb, [x_gain, g], 1.7, "in_out", "x_gain:0|silu,mul:1", "")
    assert torch.autograd.gradcheck(ia3_input, (x, w, b, a, bb, x_gain, g))
    vera_d, vera_b = t(2), t(6)
    vera = lambda x, w, b, a, bb, vera_d, vera_b, x_gain: torch.ops.surgeon.lora_linear(  # noqa: E731
        x, w, b, a, bb, [vera_d, vera_b, x_gain], 1.7, "in_out", "vera_d:0,vera_b:1,x_gain:2|gelu", "")
    assert torch.autograd.gradcheck(vera, (x, w, b, a, bb, vera_d, vera_b, x_gain))
    xs_r = t(2, 2)
    lora_xs = lambda x, w, b, a, bb, xs_r: torch.ops.surgeon.lora_linear(  # noqa: E731
        x, w, b, a, bb, [xs_r], 1.7, "in_out", "xs_r:0|silu", "")
    assert torch.autograd.gradcheck(lora_xs, (x, w, b, a, bb, xs_r))


def test_custom_op_under_torch_compile(op):
    module, x, gate = Fused(), torch.randn(3, 24), torch.randn(3, 12)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(x, gate)
    torch.testing.assert_close(out, module.unfused(x, gate), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert module.lora_b.grad is not None and module.lora_b.grad.abs().sum() > 0


def test_lowered_llama_runs_the_generated_kernels_and_equals_peft(op, tmp_path):
    """fuse + lower on a LoRA Llama, every region's kernel run through the interpreter, against PEFT."""
    import copy

    peft = pytest.importorskip("peft")
    import surgeon
    from tests.conftest import hf_llama, lora_spec, randomize_adapters

    model, args = hf_llama(layers=1)
    targets = ["*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
    compiled = surgeon.compile(model, args, lora_spec(targets), {"use_cache": False})
    randomize_adapters(compiled.module)
    unlowered = copy.deepcopy(compiled.module)
    compiled.apply(["fuse", "lower"])                 # the pipeline's own check runs the kernels once
    assert "triton-interpreter" in compiled.report.rows[-1].notes[0]
    compiled.save_adapter("chat", tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        out = compiled.module(*args).logits
        torch.testing.assert_close(out, unlowered(*args).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, reference(*args, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_gpu_tuner_times_every_strategy_and_keeps_the_fastest(monkeypatch):
    """The tuner's bookkeeping, with do_bench replaced by a table (the timing itself needs a GPU)."""
    import triton.testing

    launched = []
    fake_ms = lambda mode, cfg: 1.0 if mode == "precomputed" and cfg == kernel.GPU_CONFIGS[16][2] else 2.0  # noqa: E731
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: fn())
    monkeypatch.setattr(kernel, "_BEST", {})

    def launch(mode, cfg):
        launched.append((mode, cfg))
        return fake_ms(mode, cfg)

    modes = ["fused", "precomputed", "fused+splitk", "cublas"]
    key = (3, 4096, 4096, 16, torch.bfloat16, "", True, "cuda:0")
    best = kernel._tuned(launch, modes, key)
    assert best == ("precomputed", kernel.GPU_CONFIGS[16][2])
    n = 2 * len(kernel.GPU_CONFIGS[16]) + len(kernel.SPLITK_CONFIGS[16]) + 1
    assert launched.count(("cublas", None)) == 1 and len(launched) == n
    assert {cfg for mode, cfg in launched if mode == "fused+splitk"} == set(kernel.SPLITK_CONFIGS[16])
    for M in (1, 4, 16):                   # up to 16 rows: one bucket (one 16-row tile, the same grid)
        assert kernel._tuned(launch, modes, (M, *key[1:])) == best
    assert len(launched) == n
    # a candidate whose output disagrees with the cuBLAS composition's is never timed nor chosen
    best = kernel._tuned(launch, modes, (40, *key[1:]), agrees=lambda c: c[0] != "precomputed")
    assert best[0] != "precomputed" and not any(mode == "precomputed" for mode, _ in launched[n:])


def test_tuner_agreement_check_catches_a_lost_split():
    """What the GPU tuner's check tells apart: rounding differences pass, a split-K slice missing fails."""
    from surgeon.kernels import tuning

    args = make(7, 70, 40, 4, torch.float16)
    expected = kernel.lora_linear(**args, mode="cublas")
    assert tuning.agrees(kernel.lora_linear(**args, mode="fused+splitk"), expected)
    lost = kernel.lora_linear(**dict(args, x=torch.cat([args["x"][:, :32], 0 * args["x"][:, 32:]], 1)))
    assert not tuning.agrees(lost, expected)
    assert not tuning.agrees(torch.full_like(expected, float("nan")), expected)


def lowered_llama_matches_unlowered(spec: dict, regions: str) -> None:
    """fuse + lower on a one-layer Llama with `spec`'s adapters (randomized): the lower row names
    `regions` and the interpreted kernels give the unlowered module's logits."""
    import copy

    import surgeon
    from tests.conftest import hf_llama, randomize_adapters

    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, spec, {"use_cache": False})
    randomize_adapters(compiled.module)
    unlowered = copy.deepcopy(compiled.module)
    compiled.apply(["fuse", "lower"])
    note = compiled.report.rows[-1].notes[0]
    assert regions in note and "triton-interpreter" in note and "not Triton" not in note
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(*args).logits, unlowered(*args).logits, rtol=1e-5, atol=1e-5)


def test_lowered_llama_with_ia3_on_inputs_and_outputs_runs_the_generated_kernels(op):
    """IA3 as PEFT applies it (k/v outputs, down_proj input): the kernels through the interpreter."""
    from tests.passes.test_fuse import IA3

    lowered_llama_matches_unlowered(IA3, "3 lora_linear regions")


def test_lowered_llama_with_dynamic_dims_serves_other_shapes_through_the_kernels(op):
    """Sizes are kernel arguments and broadcast indices sympy expressions over them: a module captured
    with symbolic batch and sequence runs its kernels at a shape it was not captured at."""
    import copy

    from torch.export import Dim

    import surgeon
    from tests.conftest import hf_llama, lora_spec, randomize_adapters

    model, args = hf_llama(layers=1)
    dynamic = {"input_ids": {0: Dim("batch", max=16), 1: Dim("seq", max=64)}}
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]),
                               {"use_cache": False}, dynamic_shapes=dynamic)
    randomize_adapters(compiled.module)
    unlowered = copy.deepcopy(compiled.module)
    compiled.apply(["fuse", "lower"])
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(ids).logits, unlowered(ids).logits, rtol=1e-5, atol=1e-5)


def test_lowered_llama_with_vera_and_lora_xs_runs_the_generated_kernels(op):
    """VeRA (shared A and B sliced per site, trained d and b) and LoRA-XS (a trained R between frozen
    A and B) sites through the interpreted kernels."""
    spec = {"adapters": [{"name": "v", "type": "vera", "rank": 4, "targets": ["*.q_proj"]},
                         {"name": "x", "type": "lora-xs", "rank": 4, "targets": ["*.gate_proj"]}],
            "pipeline": ["insert"]}
    lowered_llama_matches_unlowered(spec, "2 lora_linear regions")


@pytest.mark.parametrize("broken", [False, True], ids=["sound", "broken-split"])
def test_launcher_tuning_skips_a_fast_candidate_that_computes_something_else(broken, monkeypatch):
    """The GPU tuning path end to end, on interpreted kernels: one tile config per mode, do_bench
    replaced by a table in which split-K is fastest. With the arrival counters starting at 1 (what a
    lost update would leave) a tile's first program finishes it from a slot not yet written: the
    check fills the workspace with NaN first, so even a slot an earlier launch left right cannot hide
    it. Split-K then disagrees with the reference and the tuner takes the next fastest, precomputed."""
    import triton.testing

    last = []
    real_load, real_cublas, real_buffers = kernel.load_kernel, kernel._cublas, kernel._split_buffers
    monkeypatch.setattr(kernel, "load_kernel", lambda chain, mode, *a: last.append(mode) or real_load(chain, mode, *a))
    monkeypatch.setattr(kernel, "_cublas", lambda *a, **kw: last.append("cublas") or real_cublas(*a, **kw))

    def buffers(*a):
        workspace, counters = real_buffers(*a)
        return workspace, counters.fill_(1) if broken else counters

    monkeypatch.setattr(kernel, "_split_buffers", buffers)
    from surgeon.kernels import dispatch

    monkeypatch.setattr(dispatch, "SPLIT_WORKSPACES", {})  # the broken counters stay in this test's table
    times = {"fused+splitk": 1.0, "precomputed+splitk": 1.0, "precomputed": 1.5}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: (fn(), times.get(last[-1], 2.0))[1])
    monkeypatch.setattr(kernel, "_tunes", lambda x: True)
    monkeypatch.setattr(kernel, "_has_tma", lambda device: False)
    monkeypatch.setitem(kernel.GPU_CONFIGS, 16, [(16, 32, 32, 1, 1, 1)])
    monkeypatch.setitem(kernel.SPLITK_CONFIGS, 16, [(16, 32, 32, 1, 1, 1, 2)])
    monkeypatch.setattr(kernel, "_BEST", {})
    args = make(3, 70, 40, 4, torch.float32, n_operands=1)
    out = kernel.lora_linear(**args, epilogue="silu,add:0")
    chosen = next(iter(kernel._BEST.values()))
    assert chosen == (("precomputed", (16, 32, 32, 1, 1, 1)) if broken else ("fused+splitk", (16, 32, 32, 1, 1, 1, 2)))
    torch.testing.assert_close(out, kernel.reference(**args, epilogue="silu,add:0"), **TOLERANCE[torch.float32])
