"""Generated pointwise kernels: one Triton kernel for a chain of elementwise aten ops.

A Program is the chain in SSA form: values %0..%k-1 are the kernel's inputs (tensors the
chain reads from outside), %k.. are its ops in graph order, each with its dtype and shape
(from node.meta["val"]; symbolic sizes kept as strings). Shapes broadcast: the full shape F
is the broadcast of every value's shape, and each program instance owns BLOCK flat offsets
of F. A tensor of shape S (an input, or an output narrower than F) is read or written at

    index(offs) = sum over dims d with S[d] != 1 of  i_d(offs) * prod(S[e], e > d),
    i_d(offs)   = (offs // prod(F[e], e > d)) % F[d]

built with sympy over the sizes of F after adjacent dims with the same broadcast pattern
are collapsed (so [H] against [B, T, H] reads `offs % size1`, [B, T, 1] reads `offs // size1`).
Sizes are runtime arguments: symbolic batch and sequence dims need no recompile. Every op
computes in fp32 and is rounded to its node's dtype after it (`.to(tl.float16).to(tl.float32)`),
so fp16 and bf16 results round as the eager graph does op by op. Outputs are contiguous.

A program travels as a string (`Program.encode`, JSON) in the `str` argument of the custom op
`surgeon::pointwise(Tensor[] inputs, str program) -> Tensor[]`, registered when this module is
imported. fp64 (or any non-kernel dtype) and machines without Triton run `reference`, the same
op list in torch; the op's gradient is the reference's, recomputed in backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch
from sympy.printing.str import StrPrinter

from . import codegen
from .dispatch import on_device, planned, runs_kernel
from . import pointwise_rows
from .pointwise_program import (BY_NAME, REDUCTIONS, RULES, Op, Program, Value, broadcast_shape, op_lines, operand,
                                program_from_nodes)

__all__ = ["BY_NAME", "RULES", "Op", "Program", "Value", "program_from_nodes", "pointwise", "reference", "render",
           "load_kernel", "index_expr", "layout"]

aten = torch.ops.aten
BLOCK = 1024          # offsets per program instance (GPU and interpreter alike: few instances in tests)
NUM_WARPS = 4


# ---------------------------------------------------------------- layout and index algebra


@dataclass(frozen=True)
class Layout:
    """The full shape's dims grouped by broadcast pattern, and which groups each tensor spans."""

    rank: int                        # of the full shape
    groups: tuple[tuple[int, ...], ...]   # full-shape dims per collapsed group (dims of size 1 dropped)
    spans: dict                      # value id -> tuple[bool] per group: whether the tensor has that group


def _broadcast(shapes: list[tuple]) -> tuple:
    full = broadcast_shape(shapes)
    if full is None:
        raise ValueError(f"shapes {shapes} do not broadcast to one shape")
    return full


def layout(program: Program) -> Layout:
    """Group the full shape's dims: adjacent dims that every read or written tensor has or lacks alike."""
    values = program.values()
    full = _broadcast([v.shape for v in values])
    indexed = [*range(len(program.inputs)), *program.outputs]
    pad = lambda s: (1,) * (len(full) - len(s)) + tuple(s)  # noqa: E731
    groups, patterns = [], []
    for d, size in enumerate(full):
        if size == 1:
            continue
        pattern = tuple(pad(values[i].shape)[d] != 1 for i in indexed)
        if patterns and patterns[-1] == pattern:     # dims of size 1 between them do not count
            groups[-1].append(d)
        else:
            groups.append([d])
            patterns.append(pattern)
    spans = {i: tuple(p[k] for p in patterns) for k, i in enumerate(indexed)}
    return Layout(len(full), tuple(map(tuple, groups)), spans)


class _TritonPrinter(StrPrinter):
    """sympy -> Triton integer arithmetic: floor(a / b) prints as a // b, Mod(a, b) as a % b."""

    def _print_floor(self, expr):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        return f"({self.parenthesize(num, 49)} // {self.parenthesize(den, 50)})" if den != 1 else self._print(num)

    def _print_Mod(self, expr):
        return f"({self.parenthesize(expr.args[0], 50)} % {self.parenthesize(expr.args[1], 50)})"


def index_expr(spans: tuple[bool, ...]) -> str:
    """The Triton expression for a tensor's flat index, given which collapsed groups it has."""
    if all(spans):
        return "offs"
    offs = sympy.Symbol("offs", integer=True, nonnegative=True)
    sizes = [sympy.Symbol(f"size{g}", integer=True, positive=True) for g in range(len(spans))]
    index = sympy.Integer(0)
    for g, has in enumerate(spans):
        if has:
            position = sympy.floor(offs / sympy.Mul(*sizes[g + 1:]))
            position = position if g == 0 else sympy.Mod(position, sizes[g])
            index += position * sympy.Mul(*(s for s, h in zip(sizes[g + 1:], spans[g + 1:]) if h))
    return _TritonPrinter().doprint(index)


# ---------------------------------------------------------------- code generation

_KERNEL = '''@triton.jit
def {name}(
    # pointers: inputs, then outputs (contiguous)
    {pointers},
    # sizes: the full shape's dims, adjacent dims with one broadcast pattern collapsed; numel = their product
    {sizes}numel,
    # meta
    BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
):
    """{doc}"""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
{body}'''
def formula(program: Program, value: int) -> str:
    """The math behind a value, e.g. mul(%1, to(mul(%0, rsqrt(add(%0, 1e-06)))))."""
    if value < len(program.inputs):
        return f"%{value}"
    op = program.ops[value - len(program.inputs)]
    args = [formula(program, int(a[1:])) if isinstance(a, str) else repr(a) for a in op.args]
    return f"{op.rule}({', '.join(args + [f'{k}={v!r}' for k, v in op.params.items()])})"


def kernel_name(program: Program) -> str:
    """The kernel's name, from its first ops: e.g. pointwise_add_rsqrt_mul_to_mul_kernel."""
    rules = [op.rule for op in program.ops]
    return "_".join(["pointwise", *rules[:6], *(["etc"] if len(rules) > 6 else []), "kernel"])


def kernel_source(program: Program) -> str:
    """The Triton function for a program (names never appear in it: equal math, equal text)."""
    lay, n_in = layout(program), len(program.inputs)
    lines = [*_load_lines(program, lay), *op_lines(program)]
    for j, value in enumerate(program.outputs):
        spans = lay.spans[value]
        index = index_expr(spans) if any(spans) else "offs * 0"
        lines.append(f"    tl.store(out{j}_ptr + {index}, v{value}.to(out{j}_ptr.dtype.element_ty), mask=mask)")
    pointers = [f"in{i}_ptr" for i in range(n_in)] + [f"out{j}_ptr" for j in range(len(program.outputs))]
    sizes = "".join(f"size{g}, " for g in range(len(lay.groups)))
    doc = "; ".join(f"out{j} = {formula(program, v)}" for j, v in enumerate(program.outputs))
    return _KERNEL.format(name=kernel_name(program), pointers=", ".join(pointers), sizes=sizes, doc=doc,
                          body="\n".join(lines) + "\n")


def _load_lines(program: Program, lay: Layout) -> list[str]:
    lines = []
    for i, value in enumerate(program.inputs):
        spans = lay.spans[i]
        if not any(spans):
            lines += [f"    # %{i}: input {i}, {value.dtype}, one element",
                      f"    v{i} = tl.load(in{i}_ptr).to(tl.float32)"]
            continue
        how = "contiguous" if all(spans) else "broadcast"
        lines += [f"    # %{i}: input {i}, {value.dtype}, {how}",
                  f"    v{i} = tl.load(in{i}_ptr + {index_expr(spans)}, mask=mask, other=0.0).to(tl.float32)"]
    return lines


def render(program: Program, region: str = "") -> str:
    """A whole module: a header (region, the graph nodes each value stands for), imports, the kernel."""
    title = f"region `{region}`" if region else "a pointwise chain"
    names = program.names or ("",) * len(program.values())
    header = [f'"""Generated by surgeon (kernels/pointwise.py) for {title}.', "", "values (inputs, then ops):"]
    for i, value in enumerate(program.values()):
        op = program.ops[i - len(program.inputs)] if i >= len(program.inputs) else None
        what = f"{op.rule}({', '.join(operand(a, names=True) for a in op.args)})" if op else "input"
        shape = ", ".join(map(str, value.shape))
        header.append(f"    %{i:<3} {names[i]:<16} {what:<24} {value.dtype}[{shape}]".rstrip())
    header.append("outputs: " + ", ".join(f"out{j} = %{v}" + (f" ({names[v]})" if names[v] else "")
                                          for j, v in enumerate(program.outputs)))
    header.append('"""')
    body = pointwise_rows.kernel_source(program) if program.has_reduction else kernel_source(program)
    return "\n".join(header) + "\nimport triton\nimport triton.language as tl\n\n\n" + body


_KERNELS: dict[tuple, object] = {}


def load_kernel(program: Program):
    """The compiled-on-demand Triton function for a program (one per math, whatever the names)."""
    anonymous = program.anonymous()
    key = (anonymous.encode(), codegen.interpreting())
    if key not in _KERNELS:
        name = (pointwise_rows.kernel_name if program.has_reduction else kernel_name)(program)
        _KERNELS[key] = getattr(codegen.load(render(anonymous), name), name)
    return _KERNELS[key]


# ---------------------------------------------------------------- launcher and reference


def value_shapes(shapes: list, program: Program) -> list[tuple]:
    """Every value's shape, from the inputs' shapes (ints or SymInts) by broadcasting through the ops."""
    out = [tuple(s) for s in shapes]
    for op in program.ops:
        shape = tuple(torch.broadcast_shapes(*(out[int(a[1:])] for a in op.args if isinstance(a, str))))
        out.append(shape[:-1] + (1,) if op.rule in REDUCTIONS else shape)
    return out


def _decoded(program: "str | Program") -> Program:
    return program if isinstance(program, Program) else Program.decode(program)


def pointwise(inputs: list[torch.Tensor], program: "str | Program") -> list[torch.Tensor]:
    """Run the generated kernel: check the inputs, allocate contiguous outputs, launch one grid."""
    text = program if isinstance(program, str) else program.encode()
    key = (text, codegen.interpreting(), tuple((t.shape, t.dtype, t.device) for t in inputs))
    return planned(_PLANS, key, lambda: _Plan.make(inputs, Program.decode(text)), PLAN_LIMIT).run(inputs)


# what a call decides from its inputs' shapes, dtypes and device and the program (the checks, the
# output shapes, the grid, the kernel), kept per such key: a repeated call only allocates and launches
_PLANS: dict[tuple, "_Plan"] = {}
PLAN_LIMIT = 4096


@dataclass(frozen=True)
class _Plan:
    """One call's decisions: its outputs' shapes and dtypes, and how the kernel is launched."""

    outputs: tuple[tuple[tuple, torch.dtype], ...]
    full: torch.Size
    rows: bool                    # a row reduction: pointwise_rows launches one program per row
    kernel: object
    sizes: tuple[int, ...]        # the collapsed dim sizes (kernel arguments)
    meta: dict

    @staticmethod
    def make(inputs: list[torch.Tensor], program: Program) -> "_Plan":
        """Check the inputs against the program (ValueError naming the first misfit) and decide the rest."""
        full = _check(inputs, program)
        shapes, values = value_shapes([t.shape for t in inputs], program), program.values()
        outputs = tuple((shapes[v], getattr(torch, values[v].dtype)) for v in program.outputs)
        sizes = tuple(math.prod(full[d] for d in group) for group in layout(program).groups)
        meta = dict(BLOCK=BLOCK, INDEX_64=full.numel() + BLOCK >= 2 ** 31)
        if not codegen.interpreting():
            meta.update(num_warps=NUM_WARPS)
        return _Plan(outputs, full, program.has_reduction, load_kernel(program), sizes, meta)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Allocate the outputs and launch."""
        device = inputs[0].device
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self.outputs]
        if self.rows:
            pointwise_rows.launch(self.kernel, inputs, outs, self.full)
        elif self.full.numel():
            numel = self.full.numel()
            self.kernel[(-(-numel // BLOCK),)](*(t.contiguous() for t in inputs), *outs, *self.sizes, numel,
                                               **self.meta)
        return outs


def _check(inputs: list[torch.Tensor], program: Program) -> torch.Size:
    """The full shape, after checking the inputs against the program (ValueError naming the first misfit)."""
    if len(inputs) != len(program.inputs):
        raise ValueError(f"pointwise: the program reads {len(program.inputs)} inputs, got {len(inputs)}")
    try:
        full = torch.broadcast_shapes(*(t.shape for t in inputs))
    except RuntimeError:
        full = None
    for i, (t, value) in enumerate(zip(inputs, program.inputs)):
        # a dim of size 1 in the program broadcasts; every other dim spans the full shape's
        expect = [1 if s == 1 else full[d] if full is not None else s
                  for d, s in enumerate(value.shape, start=len(full or value.shape) - len(value.shape))]
        if str(t.dtype) != f"torch.{value.dtype}" or list(t.shape) != expect or t.device != inputs[0].device:
            raise ValueError(f"pointwise: input {i} is {t.dtype}{list(t.shape)} on {t.device}, the program "
                             f"expects {value.dtype}{expect} (from {list(value.shape)}) on {inputs[0].device}")
    return full


def reference(inputs: list[torch.Tensor], program: "str | Program") -> list[torch.Tensor]:
    """The program's op list run in torch, op by op in each node's dtype (the eager graph's math)."""
    program = _decoded(program)
    values = list(inputs)
    for op in program.ops:
        args = [values[int(a[1:])] if isinstance(a, str) else a for a in op.args]
        result = BY_NAME[op.rule].torch(*args, **op.params)
        values.append(result.to(getattr(torch, op.value.dtype)))
    return [values[v] for v in program.outputs]


# ---------------------------------------------------------------- the custom op

@torch.library.custom_op("surgeon::pointwise", mutates_args=())
def pointwise_op(inputs: list[torch.Tensor], program: str) -> list[torch.Tensor]:
    """A pointwise chain (see the module docstring): the generated kernel, or the reference where none runs."""
    if not runs_kernel("pointwise", inputs[0].device, _dtypes(program) | {t.dtype for t in inputs}):
        return [out.contiguous() for out in reference(inputs, program)]
    with on_device(inputs[0].device):
        return pointwise(inputs, program)


@lru_cache(maxsize=1024)
def _dtypes(program: str) -> frozenset:
    """Every dtype the program's values have."""
    return frozenset(getattr(torch, v.dtype) for v in Program.decode(program).values())


@pointwise_op.register_fake
def _(inputs, program):
    decoded = Program.decode(program)
    shapes, values = value_shapes([t.shape for t in inputs], decoded), decoded.values()
    return [inputs[0].new_empty(shapes[v], dtype=getattr(torch, values[v].dtype)) for v in decoded.outputs]


def _setup_context(ctx, inputs, output):
    tensors, program = inputs
    ctx.save_for_backward(*tensors)
    ctx.program = program
    ctx.wants = [t.requires_grad for t in tensors]


def _backward(ctx, grads):
    # the reference is the eager graph's math: recompute it with grad and differentiate that
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(want) for t, want in zip(ctx.saved_tensors, ctx.wants)]
        outs = reference(leaves, ctx.program)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
            if pairs else [None] * len(wanted)
    found = iter(found)
    return [next(found) if want else None for want in ctx.wants], None


pointwise_op.register_autograd(_backward, setup_context=_setup_context)
