"""Compiling generated kernels to sm_90 (H100) machine code without a GPU.

The interpreter checks what a kernel computes, not that Triton can lower it for a GPU; these
tests compile each template with Triton's own compiler for a Hopper target. Use:

    jit_mode(monkeypatch)                  # before loading the kernel: a JIT function, not an interpreted one
    compiled = compile_sm90(fn, meta, pointers={"out0_ptr": "*fp32"}, floats=("lora_scale",))
"""
from __future__ import annotations

import pytest


def jit_mode(monkeypatch) -> None:
    """Skip where Triton has no NVIDIA backend; else make kernels loaded from here on compilable."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


def compile_sm90(fn, meta: dict, pointers: dict | None = None, floats: tuple = (), pointer: str = "*fp16",
                 **options):
    """fn compiled for sm_90 with `meta` as its constexprs: pointer arguments typed by `pointers`
    (name -> type) or `pointer`, the scalars named in `floats` fp32, the other scalars i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = pointers or {}
    signature = {n: "constexpr" if n in meta else pointers.get(n, pointer) if n.endswith("_ptr") else
                 "fp32" if n in floats else "i32" for n in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in meta.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
