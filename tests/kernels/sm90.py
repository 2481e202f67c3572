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


def compile_like_launch(fn, args: list, meta: dict, **options):
    """fn compiled for sm_90 as a launch with these argument values specializes it: ints equal to 1
    become constants, ints divisible by 16 and 16-byte aligned pointers are marked so (what lets
    Triton vectorize loads and pipeline them with async copies)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(fn.arg_names, list(args) + [None] * len(meta))):
        kind, attr = ("constexpr", meta[name]) if name in meta else native_specialize_impl(BaseBackend, arg, False,
                                                                                          True, True)
        signature[name] = kind
        if kind == "constexpr":
            constants[(i,)] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(compiled) -> dict:
    """{"registers": per thread, "stack": bytes of local memory per thread (register spills),
    "loop_spills": spill loads and stores (LDL/STL) inside the loop that issues the tensor-core
    instructions} read from the cubin with the cuobjdump that ships with Triton's NVIDIA backend
    (skip without it). A loop is a backward branch's span; spans of 600+ instructions (out-of-line
    barrier waits that jump back) are not counted as the K loop."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("no cuobjdump in this Triton build")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
    lines = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    address = {int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16): i for i, line in enumerate(lines)}
    mma = [i for i, line in enumerate(lines) if re.search(r"\bH(G)?MMA", line)]
    loops = []
    for i, line in enumerate(lines):
        jump = re.search(r"BRA (0x[0-9a-f]+)", line)
        start = address.get(int(jump.group(1), 16)) if jump else None
        if start is not None and start < i and i - start < 600 and any(start <= j <= i for j in mma):
            loops.append((start, i))
    spills = [i for i, line in enumerate(lines) if re.search(r"\b(STL|LDL)", line)]
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "loop_spills": sum(any(a <= i <= b for a, b in loops) for i in spills)}
