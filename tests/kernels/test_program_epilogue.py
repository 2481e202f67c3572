"""A pointwise program ending lora_linear's epilogue, under TRITON_INTERPRET=1.

The program is traced from a function of the GEMM output y (GPT-2's tanh GELU times a per-column
vector, plus a residual tile and a scalar), so its inputs are y (%0), then the others in order
of first use. Shapes are awkward: M in (1, 7, 33), K = 70, N = 40 (two 32-wide column tiles).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from surgeon.kernels import lora_linear as kernel
from surgeon.kernels import program_epilogue
from surgeon.kernels.pointwise_program import program_from_nodes
from tests.kernels.sm90 import compile_sm90, jit_mode
from tests.kernels.test_lora_linear import SPLIT_POINTERS, TOLERANCE, make


# %0 is the accumulator rounded to fp16: a flip of that rounding (summation order differs from the
# reference's) moves y by one fp16 ulp (<= 2^-11 * 4 for |y| < 4 here), which the program carries
# through gelu' (<= 1.13) and the column scale (<= 1.5): up to ~3.3e-3 absolute, before the output's
# own rounding; fp32 as the plain kernel
PROGRAM_TOLERANCE = {torch.float32: TOLERANCE[torch.float32], torch.float16: dict(rtol=2e-3, atol=4e-3)}


def new_gelu(y, residual, column, scalar):
    """GPT-2's activation (eight pointwise ops reading y three times), scaled per column, plus a residual."""
    inner = math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0))
    return 0.5 * y * (1.0 + torch.tanh(inner)) * column + residual * scalar


def program_for(fn, y, *others):
    """fn's Program with y as %0 (the accumulator), and the other inputs in the program's order."""
    gm = make_fx(fn)(y, *others)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    program = program_from_nodes(nodes, first=placeholders[0])
    assert not isinstance(program, str), program
    by_node = dict(zip(placeholders, (y, *others)))
    return program, [by_node[n] for n in program.input_nodes[1:]]


def case(M, dtype, seed=0):
    args = make(M, 70, 40, 4, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    residual = torch.randn(M, 40, generator=gen).to(dtype)
    column, scalar = (torch.rand(40, generator=gen) + 0.5).to(dtype), torch.tensor(0.75, dtype=dtype)
    y = kernel.reference(**args)
    program, extra = program_for(new_gelu, y, residual, column, scalar)
    return args, program, extra, new_gelu(y, residual, column, scalar)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [1, 7, 33])
def test_program_epilogue_kernel_matches_reference_and_eager(M, dtype):
    args, program, extra, eager = case(M, dtype)
    assert [op.rule for op in program.ops].count("tanh") == 1 and len(program.inputs) == 4
    assert program_epilogue.kinds(extra, M, 40) == (("vec", "tile", "scalar") if M > 1 else
                                                   ("vec", "vec", "scalar"))   # M = 1: a row is a vector
    text = program.encode()
    call = dict(args, operands=extra, program=text)
    out = kernel.lora_linear(**call)
    reference = kernel.reference(**call)
    torch.testing.assert_close(reference, eager, rtol=0, atol=0)     # the reference is the graph's op-by-op math
    torch.testing.assert_close(out, reference, **PROGRAM_TOLERANCE[dtype])
    torch.testing.assert_close(kernel.lora_linear(**call, mode="cublas"), reference, **PROGRAM_TOLERANCE[dtype])
    # split-K: the program runs in the tile's last program, after the slices are summed
    torch.testing.assert_close(kernel.lora_linear(**call, mode="fused+splitk"), reference, **PROGRAM_TOLERANCE[dtype])
    # row-stationary: the program runs once per column tile of the chunk
    torch.testing.assert_close(kernel.lora_linear(**call, mode="fused+rows"), reference, **PROGRAM_TOLERANCE[dtype])


def test_generated_source_runs_the_program_on_the_accumulator():
    args, program, extra, _ = case(7, torch.float32)
    chain = kernel.steps("", True)
    source = kernel.render(chain, "lora_linear@h.0.mlp.c_fc", program=program,
                           input_kinds=program_epilogue.kinds(extra, 7, 40))
    assert "def lora_linear_bias_pointwise_kernel(" in source and "tanh" in source
    assert "v0 = acc.to(out_ptr.dtype.element_ty).to(tl.float32)" in source
    assert "p1_ptr, p2_ptr, p3_ptr," in source and "stride_p1_n, stride_p2_m, stride_p2_n," in source
    compile(source, "generated", "exec")


def test_program_epilogue_autograd_on_the_reference_path(monkeypatch):
    from surgeon.kernels import registry  # noqa: F401 - registers the op

    monkeypatch.delenv("TRITON_INTERPRET")
    args, program, extra, _ = case(3, torch.float64)
    tensors = [args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], *extra]
    leaves = [t.clone().requires_grad_() for t in tensors]

    def fused(x, w, b, a, bb, residual, column, scalar):
        return torch.ops.surgeon.lora_linear(x, w, b, a, bb, [residual, column, scalar], args["scale"], "out_in",
                                             "", program.encode())

    assert torch.autograd.gradcheck(fused, leaves)


def test_bad_program_inputs_are_refused():
    args, program, extra, _ = case(7, torch.float32)
    with pytest.raises(ValueError, match="reads 3 inputs after %0, got 2"):
        kernel.lora_linear(**dict(args, operands=extra[:2], program=program.encode()))
    rows = program_for(lambda y: y * y.mean(-1, keepdim=True), torch.randn(7, 40))[0]
    with pytest.raises(ValueError, match="reduces no row"):
        kernel.lora_linear(**dict(args, operands=[], program=rows.encode()))
    with pytest.raises(ValueError, match=r"input %1 has shape \[7, 3\]"):
        kernel.lora_linear(**dict(args, operands=[torch.ones(7, 3), *extra[1:]], program=program.encode()))


def test_lowered_gpt2_runs_its_gelu_inside_the_c_fc_kernels():
    """fuse + lower on GPT-2 with LoRA on c_fc: the tanh GELU group ends the c_fc kernels' epilogue."""
    import copy

    import surgeon
    from tests.conftest import hf_gpt2, lora_spec, randomize_adapters

    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.c_fc"]), {"use_cache": False})
    randomize_adapters(compiled.module)
    unlowered = copy.deepcopy(compiled.module)
    compiled.apply(["fuse", "lower"])
    calls = [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    assert len(calls) == 2 and all(n.args[-1] and len(n.args[5]) == 0 for n in calls)   # program, no extra inputs
    assert "triton-interpreter" in compiled.report.rows[-1].notes[0]
    assert "tanh" in compiled.kernels["lora_linear@transformer.h.0.mlp.c_fc"]
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(*args).logits, unlowered(*args).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["precomputed", "fused+splitk", "fused+rows"])
def test_program_epilogue_kernel_compiles_for_an_h100_without_a_gpu(monkeypatch, mode):
    """sm_90 machine code for the GELU-program kernel (the interpreter checks semantics, not lowering)."""
    _, program, extra, _ = case(7, torch.float16)
    jit_mode(monkeypatch)
    fn = kernel.load_kernel(kernel.steps("", True), mode, program, program_epilogue.kinds(extra, 7, 40))
    meta = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, BLOCK_R=16, GROUP_M=8, DOT_PRECISION="tf32",
                **({"SPLIT_K": 4} if mode.endswith("+splitk") else {}))
    compiled = compile_sm90(fn, meta, SPLIT_POINTERS, ("lora_scale",), num_warps=4, num_stages=3)
    assert compiled.asm["cubin"]
