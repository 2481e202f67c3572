"""Row kernels (a pointwise program with a mean over the last dim) against the reference and eager,
under TRITON_INTERPRET=1: RMSNorm whole, awkward row lengths (N = 40 and 1000, not powers of two),
1 and 15 rows, fp32 and fp16, a per-row output, and the broadcasts a row kernel refuses."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from surgeon.kernels import pointwise as pw
from surgeon.kernels.pointwise_program import row_kinds
from tests.kernels.sm90 import compile_sm90, jit_mode

# kernel vs reference: the row sum runs in another order (fp32: ~N eps relative on the mean, which
# rsqrt halves); fp16 outputs: at most a flip of the last rounding
TOLERANCE = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float16: dict(rtol=1e-3, atol=1e-3)}


def rms_norm(x, weight):
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + 1e-6)).to(weight.dtype), variance


def program_for(fn, *inputs):
    gm = make_fx(fn)(*inputs)
    program = pw.program_from_nodes([n for n in gm.graph.nodes if n.op == "call_function"])
    assert not isinstance(program, str), program
    by_node = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
    return program, [by_node[n] for n in program.input_nodes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 40), (15, 1000)])
def test_rms_norm_is_one_row_kernel(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    program, inputs = program_for(rms_norm, x, weight)
    one_row = ((("row", "row"), ("scalar", "row")))     # a single row: the weight is as wide as the row
    assert program.has_reduction and row_kinds(program) == (one_row if shape[0] == 1 else
                                                            (("row", "col"), ("rowscalar", "row")))
    kernel, reference = pw.pointwise(inputs, program.encode()), pw.reference(inputs, program.encode())
    normed, variance = rms_norm(x, weight)
    for got, want, eager in zip(kernel, reference, (variance, normed)):     # outputs in graph order
        torch.testing.assert_close(want, eager, rtol=0, atol=0)      # the reference is the graph's math
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    source = pw.render(program, "norm")
    assert "def rows_" in source and "tl.reduce(tl.where(mask, v" in source and "# %1: input 1, " in source


def test_broadcasts_a_row_kernel_does_not_read_are_refused():
    def per_batch(x, scale):                        # scale is [B, 1, N]: neither a row, a column nor a scalar
        return x * x.mean(-1, keepdim=True) * scale

    gm = make_fx(per_batch)(torch.randn(2, 3, 8), torch.randn(2, 1, 8))
    why = pw.program_from_nodes([n for n in gm.graph.nodes if n.op == "call_function"])
    assert isinstance(why, str) and "a row kernel reads and writes only rows" in why


def test_row_kernel_compiles_for_an_h100_without_a_gpu(monkeypatch):
    x, weight = torch.randn(4, 64).half(), torch.rand(64).half()
    program, _ = program_for(rms_norm, x, weight)
    jit_mode(monkeypatch)
    fn = pw.load_kernel(program)
    pointers = dict(in0_ptr="*fp16", in1_ptr="*fp16", out0_ptr="*fp32", out1_ptr="*fp16")
    assert compile_sm90(fn, dict(BLOCK_N=4096), pointers, num_warps=8).asm["cubin"]
