"""Generated pointwise-chain kernels against their torch reference and the eager graph (TRITON_INTERPRET=1).

Programs come from real graphs (make_fx, torch.export). Sizes are awkward: [3, 7, 53] has 1113
elements, so the 1024-wide blocks leave a partial second one; broadcast inputs of every pattern
([B, T, 1], [H], [1, T, H], 0-dim) and outputs narrower than the full shape are read and written
through the generated index algebra. The reference must equal the eager graph exactly (it runs
the same ops); the kernel matches it within the table below.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from surgeon.kernels import pointwise as pw
from tests.kernels.golden_files import assert_matches_golden
from tests.kernels.sm90 import compile_sm90, jit_mode

aten = torch.ops.aten
# kernel vs reference: fp32 differs by the kernel's formulas (silu as z / (1 + exp(-z)), tanh via exp,
# x^e as 2^(e log2 x)) against torch's vectorized ones, a few ulp per op over a short chain; fp16
# rounds after every op as eager does, so the only differences are flips of a rounding when the fp32
# values straddle a half-ulp (2 ulp: 2^-10 relative each for fp16, 2^-7 for bf16)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
DTYPES = dict(argvalues=[torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
EXACT = dict(rtol=0, atol=0)
# masked-off lanes load 0.0 and run the ops on it (1 / 0, log2 0): numpy warns, the stores are masked
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def traced(fn, *inputs):
    """(program of every op fn records, the inputs in the program's order, fn's outputs in its order)."""
    gm = make_fx(fn)(*inputs)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    program = pw.program_from_nodes(nodes)
    assert isinstance(program, pw.Program), program
    by_node = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
    eager = fn(*inputs)
    eager = list(eager) if isinstance(eager, (tuple, list)) else [eager]
    returned = list(gm.graph.output_node().args[0]) if isinstance(gm.graph.output_node().args[0], (tuple, list)) \
        else [gm.graph.output_node().args[0]]
    expected = [eager[returned.index(n)] for n in program.output_nodes]
    return program, [by_node[n] for n in program.input_nodes], expected


def check(fn, *inputs):
    """Kernel == reference (within TOLERANCE) and reference == eager (exactly) for fn's program."""
    program, ins, expected = traced(fn, *inputs)
    text = program.encode()
    kernel, reference = pw.pointwise(ins, text), pw.reference(ins, text)
    assert len(kernel) == len(expected)
    for k, r, e in zip(kernel, reference, expected):
        assert k.shape == e.shape and k.dtype == e.dtype and k.is_contiguous()
        torch.testing.assert_close(r, e, **EXACT)
        torch.testing.assert_close(k, r, **TOLERANCE[e.dtype])
    return program


def rand(*shape, dtype=torch.float32, positive=False, seed=0):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (t.abs() + 0.5 if positive else t).to(dtype)


# one case per rule (and per operand form): fn(x, p) with x ~ N(0, 1) and p > 0.5
RULE_CASES = {
    "add": lambda x, p: x + p, "add_alpha": lambda x, p: torch.add(x, p, alpha=2.5),
    "add_scalar": lambda x, p: x + 0.5, "scalar_add": lambda x, p: aten.add.Tensor(0.5, x),
    "sub": lambda x, p: x - p, "sub_alpha": lambda x, p: torch.sub(x, p, alpha=0.5),
    "scalar_sub": lambda x, p: aten.sub.Tensor(1.5, x), "rsub": lambda x, p: 1 - x,
    "mul": lambda x, p: x * p, "mul_scalar": lambda x, p: x * 3, "scalar_mul": lambda x, p: aten.mul.Tensor(3, x),
    "div": lambda x, p: x / p, "div_scalar": lambda x, p: x / 3.0, "scalar_div": lambda x, p: aten.div.Tensor(2.0, p),
    "neg": lambda x, p: -x, "silu": lambda x, p: F.silu(x), "gelu": lambda x, p: F.gelu(x),
    "gelu_tanh": lambda x, p: F.gelu(x, approximate="tanh"), "relu": lambda x, p: F.relu(x),
    "sigmoid": lambda x, p: torch.sigmoid(x), "tanh": lambda x, p: torch.tanh(x),
    "tanh_small": lambda x, p: torch.tanh(x * 0.05), "rsqrt": lambda x, p: torch.rsqrt(p),
    "sqrt": lambda x, p: torch.sqrt(p), "reciprocal": lambda x, p: 1.0 / p, "exp": lambda x, p: torch.exp(x),
    "cos": lambda x, p: torch.cos(x), "sin": lambda x, p: torch.sin(x),
    "pow2": lambda x, p: x.pow(2), "pow3": lambda x, p: x.pow(3), "pow_neg2": lambda x, p: p.pow(-2),
    "pow_half": lambda x, p: p.pow(0.5), "pow_neg_half": lambda x, p: p.pow(-0.5), "pow_1_7": lambda x, p: p.pow(1.7),
    "to_copy": lambda x, p: (x * 3).to(torch.float16),
}


@pytest.mark.parametrize("case", RULE_CASES)
def test_every_rule(case):
    program = check(RULE_CASES[case], rand(3, 7, 13), rand(3, 7, 13, positive=True, seed=1))
    assert {op.rule for op in program.ops} <= set(pw.BY_NAME)


def test_rule_table_covers_the_aten_ops():
    wanted = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
              aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
              aten.rsqrt.default, aten.exp.default, aten.pow.Tensor_Scalar, aten.cos.default, aten.sin.default,
              aten.to.dtype, aten._to_copy.default]
    assert all(op in pw.RULES for op in wanted)


@pytest.mark.parametrize("dtype", **DTYPES)
def test_awkward_sizes_and_dtypes(dtype):
    """1113 elements: one full 1024 block and a masked partial one."""
    check(lambda x, y: F.silu(x) * y + 1.0, rand(3, 7, 53, dtype=dtype), rand(3, 7, 53, dtype=dtype, seed=1))
    check(lambda x, y: torch.tanh(aten.div.Tensor(2.0, y) - x * 0.5), rand(3, 7, 13, dtype=dtype),
          rand(3, 7, 13, dtype=dtype, positive=True, seed=1))


@pytest.mark.parametrize("dtype", **DTYPES)
def test_broadcast_inputs(dtype):
    shapes = [(3, 7, 13), (3, 7, 1), (13,), (1, 7, 13), ()]
    inputs = [rand(*s, dtype=dtype, seed=i) for i, s in enumerate(shapes)]
    program = check(lambda a, b, c, d, e: (a * b + c) * d - e, *inputs)
    source = pw.kernel_source(program)
    assert "v4 = tl.load(in4_ptr).to(tl.float32)" in source          # the 0-dim input is one scalar load
    assert "tl.load(in0_ptr + offs," in source                          # the full-shape input is contiguous


def test_collapsed_index_expressions():
    """[H] and [B, T, 1] against [B, T, H]: two collapsed dims, offs % H and offs // H."""
    program, _, _ = traced(lambda x, w, v: x * w + v, rand(3, 7, 13), rand(13), rand(3, 7, 1))
    assert pw.layout(program).groups == ((0, 1), (2,))
    source = pw.kernel_source(program)
    assert "tl.load(in1_ptr + (offs % size1)" in source and "tl.load(in2_ptr + (offs // size1)" in source
    assert pw.index_expr((False, True, False)) == "((offs // size2) % size1)"


def test_multiple_outputs_and_an_output_narrower_than_the_full_shape():
    def fn(x, v):
        r = torch.rsqrt(v + 1.0)          # [3, 7, 1], used outside: stored through its broadcast index
        s = F.silu(x)
        return r, s, s * r
    program = check(fn, rand(3, 7, 53), rand(3, 7, 1, positive=True))
    assert len(program.outputs) == 3


def rms_norm_export(dtype=torch.float16, H=13):
    """A Llama-style RMSNorm exported with dynamic batch and sequence dims, and its pointwise tail."""
    class RMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(rand(H, dtype=dtype, seed=5))

        def forward(self, x):
            h = x.to(torch.float32)
            variance = h.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(variance + 1e-6)
            return self.weight * h.to(dtype)

    module = RMSNorm()
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    ep = torch.export.export(module, (rand(3, 7, H, dtype=dtype),), dynamic_shapes=dims)
    graph = ep.graph
    for node in list(graph.nodes):      # metadata asserts read values but compute nothing
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    mean = next(i for i, n in enumerate(nodes) if n.target is aten.mean.dim)
    return module, nodes[mean + 1:]


def test_program_from_an_exported_rms_norm():
    module, tail = rms_norm_export()
    program = pw.program_from_nodes(tail)
    assert [op.rule for op in program.ops] == ["add", "rsqrt", "mul", "to", "mul"]
    assert [n.name for n in program.input_nodes] == ["mean", "to", "p_weight"]
    assert program.output_nodes == (tail[-1],) and isinstance(program.inputs[0].shape[0], str)   # symbolic batch
    for shape in [(2, 5, 13), (4, 3, 13)]:          # other batch and sequence sizes: the same kernel
        x = rand(*shape, dtype=torch.float16, seed=9)
        h = x.to(torch.float32)
        ins = [h.pow(2).mean(-1, keepdim=True), h, module.weight.detach()]
        kernel, reference = pw.pointwise(ins, program.encode())[0], pw.reference(ins, program.encode())[0]
        with torch.no_grad():
            torch.testing.assert_close(reference, module(x), **EXACT)
        torch.testing.assert_close(kernel, reference, **TOLERANCE[torch.float16])


def test_program_from_nodes_says_why_not():
    module, tail = rms_norm_export()
    reductions = make_fx(lambda x: x.mean(0, keepdim=True) * x.amax(-1, keepdim=True))(rand(3, 4))
    mean_0, amax = [n for n in reductions.graph.nodes if n.op == "call_function"][:2]
    assert "a mean over other dims than the last" in pw.program_from_nodes([mean_0])
    assert "no pointwise rule" in pw.program_from_nodes([amax])
    del tail[0].args[0].meta["val"]
    assert "no tensor meta['val']" in pw.program_from_nodes(tail)
    gm = make_fx(lambda x: x.pow(7) + x.to(torch.int32))(rand(4))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert "exponent 7" in pw.program_from_nodes(calls[:1])
    assert "dtype torch.int32" in pw.program_from_nodes(calls[1:2])


def test_encode_decode_round_trip_and_errors():
    program, _, _ = traced(lambda x, y: F.gelu(x, approximate="tanh") * torch.add(y, x, alpha=-0.25),
                           rand(3, 7, 13), rand(7, 1))
    text = program.encode()
    assert pw.Program.decode(text) == program and pw.Program.decode(text).encode() == text
    import pickle
    assert pickle.loads(pickle.dumps(program)) == program       # the graph nodes stay behind
    for bad, why in [("not json", "Expecting value"), (text.replace('"gelu"', '"erfc"'), "no rule 'erfc'"),
                     (text.replace('"%3"', '"%99"'), "undefined value %99"),
                     (text.replace('"float32"', '"int64"', 1), "dtype 'int64'")]:
        with pytest.raises(ValueError, match=f"cannot decode program .*{why}"):
            pw.Program.decode(bad)


def test_launcher_rejects_inputs_that_do_not_fit_the_program():
    program, ins, _ = traced(lambda x, w: x * w, rand(3, 7, 13), rand(13))
    with pytest.raises(ValueError, match=r"input 1 is torch.float32\[7\]"):
        pw.pointwise([ins[0], rand(7)], program.encode())
    with pytest.raises(ValueError, match="reads 2 inputs, got 1"):
        pw.pointwise(ins[:1], program.encode())
    assert pw.pointwise([rand(0, 7, 13), ins[1]], program.encode())[0].shape == (0, 7, 13)



def test_a_repeated_call_reuses_its_plan_and_reads_the_new_values(monkeypatch):
    """A plan (checks, output shapes, grid, kernel) is kept per program and inputs' shapes, dtypes and
    device: a call with new values reuses it, a new shape makes a new one whose checks run."""
    made = []
    real = pw._Plan.make
    monkeypatch.setattr(pw._Plan, "make", staticmethod(lambda *a: made.append(a) or real(*a)))
    program, ins, _ = traced(lambda x, w: F.silu(x) * w, rand(3, 7, 13), rand(13))
    text = program.encode()
    for inputs in (ins, [rand(3, 7, 13, seed=1), rand(13, seed=2)], [rand(5, 2, 13), rand(13)], ins):
        torch.testing.assert_close(pw.pointwise(inputs, text)[0], pw.reference(inputs, text)[0],
                                   **TOLERANCE[torch.float32])
    assert len(made) == 2
    with pytest.raises(ValueError, match=r"input 1 is torch.float32\[7\]"):
        pw.pointwise([ins[0], rand(7)], text)
    assert len(pw._PLANS) == 2                                  # a call that failed its checks leaves no plan
    monkeypatch.setattr(pw, "PLAN_LIMIT", 2)
    pw.pointwise([rand(1, 1, 13), rand(13)], text)
    assert len(pw._PLANS) == 1                                  # full: emptied, then the new plan

GOLDEN_PROGRAM = pw.Program(
    inputs=(pw.Value("float32", ("s0", "s1", 1)), pw.Value("float32", ("s0", "s1", 4096)),
            pw.Value("float16", (4096,))),
    ops=(pw.Op("add", ("%0", 1e-06), {}, pw.Value("float32", ("s0", "s1", 1))),
         pw.Op("rsqrt", ("%3",), {}, pw.Value("float32", ("s0", "s1", 1))),
         pw.Op("mul", ("%1", "%4"), {}, pw.Value("float32", ("s0", "s1", 4096))),
         pw.Op("to", ("%5",), {}, pw.Value("float16", ("s0", "s1", 4096))),
         pw.Op("mul", ("%2", "%6"), {}, pw.Value("float16", ("s0", "s1", 4096)))),
    outputs=(7,), names=("mean", "to", "p_weight", "add", "rsqrt", "mul", "to_1", "mul_1"))


def test_generated_source_matches_golden():
    text = pw.render(GOLDEN_PROGRAM, "pointwise@model.layers.0.input_layernorm")
    assert_matches_golden(text, "pointwise_rms_norm_tail.py")


def test_kernels_are_shared_between_programs_that_differ_only_in_names():
    renamed = pw.Program(GOLDEN_PROGRAM.inputs, GOLDEN_PROGRAM.ops, GOLDEN_PROGRAM.outputs, ("a",) * 8)
    assert pw.load_kernel(renamed) is pw.load_kernel(GOLDEN_PROGRAM)


def test_generated_kernel_compiles_for_an_h100_without_a_gpu(monkeypatch):
    """Compile to sm_90 machine code (the interpreter checks semantics, not that Triton can lower it)."""
    jit_mode(monkeypatch)
    fn = pw.load_kernel(GOLDEN_PROGRAM)
    pointers = dict(zip([n for n in fn.arg_names if n.endswith("_ptr")], ["*fp32", "*fp32", "*fp16", "*fp16"]))
    assert compile_sm90(fn, dict(BLOCK=1024, INDEX_64=False), pointers, num_warps=4).asm["cubin"]


# ---------------------------------------------------------------- the custom op


class Chain(torch.nn.Module):
    """silu(x) * y + tanh(y) as one surgeon::pointwise call, and as eager ops."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        program, _, _ = traced(self.unfused, rand(3, 7, 13, dtype=dtype), rand(13, dtype=dtype))
        self.program = program.encode()

    def forward(self, x, y):
        return torch.ops.surgeon.pointwise([x, y], self.program)[0]

    @staticmethod
    def unfused(x, y):
        return F.silu(x) * y + torch.tanh(y)


def test_custom_op_exports_with_dynamic_dims():
    module, x, y = Chain(), rand(3, 7, 13), rand(13, seed=1)
    dims = {"x": {0: torch.export.Dim("batch")}, "y": None}
    ep = torch.export.export(module, (x, y), dynamic_shapes=dims)
    assert torch.ops.surgeon.pointwise.default in [n.target for n in ep.graph.nodes]
    x2 = rand(5, 7, 13, seed=2)
    torch.testing.assert_close(ep.module()(x2, y), Chain.unfused(x2, y), **TOLERANCE[torch.float32])


def test_custom_op_autograd_matches_eager():
    module = Chain()
    grads = []
    for forward in (module.forward, Chain.unfused):
        x, y = rand(3, 7, 13).requires_grad_(), rand(13, seed=1).requires_grad_()
        (forward(x, y) ** 2).sum().backward()
        grads.append((x.grad, y.grad))
    for fused, eager in zip(*grads):
        torch.testing.assert_close(fused, eager, **TOLERANCE[torch.float32])


def test_custom_op_runs_fp64_through_the_reference_and_gradchecks():
    module = Chain(torch.float64)
    x, y = rand(2, 3, 13, dtype=torch.float64).requires_grad_(), rand(13, dtype=torch.float64).requires_grad_()
    torch.testing.assert_close(module(x, y), Chain.unfused(x, y), **EXACT)
    assert torch.autograd.gradcheck(module, (x, y))


def test_eval_dropout_is_the_identity_and_training_dropout_has_no_rule():
    """An eval-mode capture keeps dropout(x, p, train=False) nodes (export drops them for F.dropout)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(3, 5)
    scaled = graph.call_function(aten.mul.Tensor, (x, 3.0))
    nodes = [scaled] + [graph.call_function(aten.dropout.default, (scaled, 0.1, train)) for train in (False, True)]
    for node in nodes:
        node.meta["val"] = torch.empty(3, 5)
    program = pw.program_from_nodes(nodes[:2])
    assert [op.rule for op in program.ops] == ["mul", "dropout"]
    value = rand(3, 5)
    torch.testing.assert_close(pw.pointwise([value], program.encode())[0], value * 3, **EXACT)
    assert "training mode" in pw.program_from_nodes([nodes[0], nodes[2]])
