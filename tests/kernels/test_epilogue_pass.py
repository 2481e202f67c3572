"""The epilogue as one generated pass over a GEMM's output (the cuBLAS strategies' tail), under
TRITON_INTERPRET=1, against the same steps as torch ops. M = 33 and N = 40 are not multiples of
the 32-wide interpreter tiles."""
from __future__ import annotations

import pytest
import torch

from surgeon.kernels import epilogue_pass, lora_linear as kernel
from surgeon.kernels.epilogue import as_tiles, steps
from tests.kernels.sm90 import compile_sm90, jit_mode
from tests.kernels.test_lora_linear import CUBLAS_TOLERANCE, EPILOGUES, TOLERANCE, make, n_operands
from tests.kernels.test_program_epilogue import PROGRAM_TOLERANCE, case


def pass_inputs(epilogue: str, dtype, M=33, N=40):
    """z and the step operands of a pass, in the launcher's order."""
    chain = steps(epilogue, has_bias=True)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(M, N, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    operands = [torch.randn(M, N, generator=gen).to(dtype) for _ in range(n_operands(epilogue))]
    tiles = as_tiles(chain, operands, (M, N))
    tensors, strides = kernel._epilogue_arguments(chain, bias, tiles, {}, None, [], (), M, N)
    return chain, z, bias, tiles, tensors, strides


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_pass_matches_the_steps_as_torch_ops(epilogue, dtype, monkeypatch):
    """Before: one torch op per step (each rounds to dtype). After: one kernel, fp32 inside, one rounding."""
    chain, z, bias, tiles, tensors, strides = pass_inputs(epilogue, dtype)
    monkeypatch.delenv("TRITON_INTERPRET")                  # the torch path: what runs on a CPU without Triton
    ops = epilogue_pass.run(z.clone(), chain, bias, tiles, tensors, strides, None, [], ())
    fp32 = epilogue_pass.run(z.float(), chain, bias.float(), [t.float() for t in tiles],
                             [], [], None, [], ())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z_in = z.clone()
    out = epilogue_pass.run(z_in, chain, bias, tiles, tensors, strides, None, [], ())
    assert out.data_ptr() == z_in.data_ptr()                            # written in place over z
    torch.testing.assert_close(out, fp32.to(dtype), **TOLERANCE[dtype])   # one rounding, as the fused kernel
    torch.testing.assert_close(out, ops, **CUBLAS_TOLERANCE[dtype])       # the op-by-op roundings


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["cublas", "cublas+beta"])
def test_cublas_strategies_run_their_epilogue_as_one_generated_pass(mode, dtype, monkeypatch):
    """The launcher's cuBLAS strategies end with the pass (a GELU program after a residual step here)."""
    args, program, extra, eager = case(7, dtype)
    loaded = []
    real = epilogue_pass.load_kernel
    monkeypatch.setattr(epilogue_pass, "load_kernel", lambda *a: loaded.append(a) or real(*a))
    call = dict(args, operands=extra, program=program.encode())
    out = kernel.lora_linear(**call, mode=mode)
    torch.testing.assert_close(out, kernel.reference(**call), **PROGRAM_TOLERANCE[dtype])
    # "cublas" adds the bias in F.linear; "cublas+beta"'s GEMM adds the LoRA term as C, the pass the bias
    assert len(loaded) == 1 and loaded[0][1] is not None
    assert [s.rule for s in loaded[0][0]] == ([] if mode == "cublas" else ["bias"])
    plain = make(7, 70, 40, 4, dtype, bias=False)
    assert kernel.lora_linear(**plain, mode=mode).shape == (7, 40) and len(loaded) == 1   # no steps: no pass


def test_generated_source_reads_z_once_and_stores_once():
    args, program, extra, _ = case(7, torch.float32)
    from surgeon.kernels import program_epilogue

    source = epilogue_pass.render(steps("silu,mul:0", True), program, program_epilogue.kinds(extra, 7, 40))
    assert source.count("tl.load(z_ptr") == 1 and source.count("tl.store(") == 1
    assert "def epilogue_bias_silu_mul_pointwise_kernel(" in source
    assert "out = " in source and "silu(z + bias) * gate0" in source


def test_pass_compiles_for_an_h100_without_a_gpu(monkeypatch):
    jit_mode(monkeypatch)
    fn = epilogue_pass.load_kernel(steps("gelu,mul:0,add:1", True))
    assert compile_sm90(fn, dict(BLOCK_M=32, BLOCK_N=128), pointer="*bf16", num_warps=4).asm["cubin"]
