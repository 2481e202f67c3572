"""fuse + lower, fuzzed on GEMM regions: an adapted linear, its epilogue and program tail keep their function.

Each seed builds (random.Random(seed)) a module: x [*lead, K] (lead (2, 3), (3, 5), (6,) or (17,);
K, N in 8..40, never a multiple of 32), `proj` an nn.Linear (bias or not) or a GPT-2 Conv1D (addmm,
in x out weight), sometimes a second linear `gate`, targeted by one adapter kind (KINDS: LoRA, DoRA,
IA3 on the output or the input, VeRA, LoRA-XS, LoHa; weights randomized as training would). On
proj's output a random chain: the epilogue rules (kernels/epilogue.py: silu, gelu, gelu_tanh, relu,
a gate multiply by gate(x), a residual add of a same-shape input or x, a constant scale, a
per-column gain), row views and eval dropouts between them; sometimes a pointwise tail (tanh-GELU as
its eight ops, sigmoid, swish, an added per-column vector: a program epilogue); sometimes a
consumer that stops the region (a sum over the last dim, a transpose, a matmul, a split of the last
dim into heads, a second use). Under Triton's interpreter, for every seed:
  - the partition is sound (tests/passes/test_fuse_fuzz.assert_sound_regions);
  - fuse + lower gives one surgeon call per region, removes every node the regions held, and each
    output is within its error bound of the exact (fp64) function, as eager's is;
  - a second lower (and fuse) finds nothing and leaves the code as it is;
  - for AUTOGRAD_SEEDS, one backward in train mode gives the adapters' gradients as close to the
    fp64 ones as eager's (see GRAD_FACTOR).
The bound is test_fuse_fuzz's running bound (its step_bound for each op after the linears); the
linears' outputs get LEAF times their magnitude (below).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.passes.fuse import partition
from tests.conftest import randomize_adapters
from tests.passes.test_fuse_fuzz import (UNIT, Step, assert_lowers_within, assert_sound_regions, assert_within,
                                         outputs, rounded, run_step, step_bound)

SEEDS = [*range(60), 352]             # 352: IA3 on the input, its linear read twice (see the regressions)
FP16_SEEDS = [*range(200, 212), 1048, 1121]
AUTOGRAD_SEEDS = (1, 3, 5, 8, 13, 21)
KINDS = [("lora", {"rank": 4}), ("dora", {"rank": 4}), ("ia3", {}), ("ia3", {"on": "input"}),
         ("vera", {"rank": 4}), ("lora-xs", {"rank": 4}), ("loha", {"rank": 2})]
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- ops beyond test_fuse_fuzz's table

# linear maps that only move values (their bound moves the same way), and a matmul by a parameter
STRUCTURAL = {
    "rows": lambda a, c: a.reshape(-1, a.shape[-1]),                 # a row view: same last dim
    "unrows": lambda a, c: a.reshape(*c, a.shape[-1]),
    "dropout": lambda a, c: F.dropout(a, 0.25, training=False),      # captured as dropout(train=False)
    "transpose": lambda a, c: a.transpose(-1, -2),
    "heads": lambda a, c: a.unflatten(-1, (c, -1)).flatten(-2),      # splits the last dim: not a row view
}


def run(step: Step, values: list) -> torch.Tensor:
    """The value a step computes (test_fuse_fuzz's ops, STRUCTURAL ones, or `matmul`)."""
    if step.op in STRUCTURAL:
        return STRUCTURAL[step.op](values[step.args[0]], step.const)
    if step.op == "matmul":
        return values[step.args[0]] @ values[step.args[1]]
    return run_step(step, values)


def bound(step: Step, values: list, errors: list, dtype: torch.dtype) -> tuple:
    """(exact value, bound) of a step: moves move the bound alike; a @ P (P exact) carries e_a |P| and
    adds ACC of |a| |P| and its rounding; the others are test_fuse_fuzz's step_bound."""
    if step.op in STRUCTURAL:
        a, e = values[step.args[0]], errors[step.args[0]]
        return STRUCTURAL[step.op](a, step.const), STRUCTURAL[step.op](e, step.const)
    if step.op == "matmul":
        a, p, e = values[step.args[0]], values[step.args[1]], errors[step.args[0]]
        value = a @ p
        return value, e @ p.abs() + 64 * 2.0 ** -24 * (a.abs() @ p.abs()) + UNIT[dtype] * rounded(value)
    return step_bound(step, values, errors, dtype)


# ---------------------------------------------------------------- the random module


class GemmChain(nn.Module):
    """forward: the leaves (proj(x), gate(x) when there is one, the inputs, the parameters), then each step."""

    def __init__(self, proj, gate, params: list[torch.Tensor]):
        super().__init__()
        self.proj, self.gate = proj, gate
        self.params = nn.ParameterList(nn.Parameter(p, requires_grad=False) for p in params)
        self.steps: list[Step] = []
        self.outputs: list[int] = []

    def leaves(self, inputs) -> list:
        linears = [self.proj(inputs[0])] + ([] if self.gate is None else [self.gate(inputs[0])])
        return linears + list(inputs) + list(self.params)

    def forward(self, *inputs):
        values = self.leaves(inputs)
        for step in self.steps:
            values.append(run(step, values))
        out = tuple(values[i] for i in self.outputs)
        return out if len(out) > 1 else out[0]


def linear(rng, gen, K, N, conv1d: bool, dtype) -> nn.Module:
    """An nn.Linear (bias or not) or a GPT-2 Conv1D, weights in [-0.5, 0.5)."""
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(N, K) if conv1d else nn.Linear(K, N, bias=rng.random() < 0.6)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return layer.to(dtype)


def build(seed: int, dtype=torch.float32) -> tuple[GemmChain, tuple, dict]:
    """(module, example inputs, spec) for a seed."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lead, K = rng.choice([(2, 3), (3, 5), (6,), (17,)]), rng.choice([9, 12, 20, 33, 40])
    N = K if rng.random() < 0.25 else rng.choice([8, 12, 20, 24, 36, 40])
    proj = linear(rng, gen, K, N, rng.random() < 0.25, dtype)
    gate = linear(rng, gen, K, N, rng.random() < 0.25, dtype) if rng.random() < 0.35 else None
    kind, options = rng.choice(KINDS)
    targets = ["proj"] + (["gate"] if gate is not None and rng.random() < 0.5 else [])
    spec = {"adapters": [{"name": "a", "type": kind, "targets": targets, **options}], "pipeline": ["insert"]}
    x = (torch.rand(*lead, K, generator=gen) * 2 - 1).to(dtype)
    tiles = [(torch.rand(*lead, N, generator=gen) * 2 - 1).to(dtype) for _ in range(2)]
    vector = (torch.rand(N, generator=gen) - 0.5).to(dtype)
    params = [(torch.rand(N, generator=gen) + 0.5).to(dtype), (torch.rand(N, 5, generator=gen) - 0.5).to(dtype)]
    module = GemmChain(proj, gate, params).eval()
    inputs = (x, *tiles, vector)
    with torch.no_grad():
        values = module.leaves(inputs)
        module.steps, module.outputs = grow(rng, values, lead, gate is not None)
    return module, inputs, spec


def grow(rng: random.Random, values: list, lead: tuple, has_gate: bool) -> tuple[list[Step], list[int]]:
    """The steps on proj's output (value 0) and the outputs; appends each step's example value."""
    g = int(has_gate)
    x, tiles, vector, gain, weight = 1 + g, (2 + g, 3 + g), 4 + g, 5 + g, 6 + g
    steps, outs, cur = [], [], 0

    def add(op, *args, const=None) -> int:
        steps.append(Step(op, args, const))
        values.append(run(steps[-1], values))
        return len(values) - 1

    for _ in range(rng.randint(0, 6)):                       # the epilogue
        full = values[cur].shape == values[tiles[0]].shape
        choice = rng.choice(["act", "act", "gate", "residual", "scale", "gain", "rows", "dropout"])
        if choice == "act":
            op = rng.choice(["silu", "relu", "gelu"])
            cur = add(op, cur, const=rng.choice(["none", "tanh"]) if op == "gelu" else None)
        elif choice == "gate" and has_gate and full:
            cur = add("mul", cur, 1)
        elif choice == "residual" and full:
            cur = add("add", cur, x if values[x].shape == values[cur].shape and rng.random() < 0.5
                      else rng.choice(tiles))
        elif choice == "scale":
            cur = add("mul_scalar", cur, const=rng.choice([0.5, -1.5, 3.0]))
        elif choice == "gain":
            cur = add("mul", cur, gain)
        elif choice == "rows":
            cur = add("rows", cur) if full else add("unrows", cur, const=lead)
        elif choice == "dropout":
            cur = add("dropout", cur)
    if rng.random() < 0.4:                                   # a pointwise tail: a program epilogue
        cur = tail(rng, add, cur, vector)
    stopper = rng.choice([None, None, "sum_last", "transpose", "matmul", "heads", "twice"])
    if stopper == "twice":
        outs.append(cur)
        cur = add("tanh", cur)
    elif stopper == "matmul":
        cur = add("matmul", cur, weight)
    elif stopper == "heads" and values[cur].shape[-1] % 4 == 0:
        cur = add("heads", cur, const=4)
    elif stopper is not None and stopper != "heads":
        cur = add(stopper, cur)
    return steps, outs + [cur]


def tail(rng: random.Random, add, cur: int, vector: int) -> int:
    """One of: tanh-GELU as GPT-2 writes it (eight ops reading the value three times), sigmoid,
    swish (v * sigmoid v), the value plus a per-column vector input."""
    choice = rng.choice(["gelu_chain", "sigmoid", "swish", "vector"])
    if choice == "gelu_chain":
        cube = add("mul_scalar", add("pow", cur, const=3), const=0.044715)
        inner = add("mul_scalar", add("add", cur, cube), const=0.7978845608028654)
        return add("mul", add("mul_scalar", cur, const=0.5), add("add_scalar", add("tanh", inner), const=1.0))
    if choice == "sigmoid":
        return add("sigmoid", cur)
    if choice == "swish":
        return add("mul", cur, add("sigmoid", cur))
    return add("add", cur, vector)


# ---------------------------------------------------------------- the exact leaves and their bounds

# An adapted linear's output is, on any path, at most ~10 rounded ops (base GEMM, A x, B (A x), DoRA's
# norm, gain and adds, VeRA's and IA3's scales) and sums of at most 40 + 16 terms: its error is within
# gamma_n ~ n u of its magnitude (the same computation on |values|, see Magnitudes), n <= 64 in fp32;
# fp16 graphs round each of the ~10 intermediates to fp16 (half an fp16 ulp each) on top of that.
LEAF = {torch.float32: 64 * 2.0 ** -24, torch.float16: 10 * 2.0 ** -11 + 64 * 2.0 ** -24}
aten = torch.ops.aten
MOVES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.t.default,
         aten.transpose.int, aten.permute.default, aten.slice.Tensor, aten.expand.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.detach.default, aten.clone.default, aten.dropout.default, aten.alias.default}


class Magnitudes(fx.Interpreter):
    """Runs a graph and, per node, the magnitude of its value: sums and products of the operands'
    magnitudes for add, sub, mul and the GEMMs, the same view of it for ops that only move values,
    |value| for everything else (ops on weights only, e.g. DoRA's norm)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.magnitude: dict = {}

    def run_node(self, n):
        value = super().run_node(n)
        m = lambda a: self.magnitude[a] if isinstance(a, fx.Node) else abs(a) if isinstance(a, (int, float)) else a  # noqa: E731
        args = [m(a) for a in n.args]
        t = n.target
        if n.op != "call_function" or not isinstance(value, torch.Tensor):
            self.magnitude[n] = value.abs() if isinstance(value, torch.Tensor) else value
        elif t in (aten.add.Tensor, aten.sub.Tensor):
            self.magnitude[n] = args[0] + abs(n.kwargs.get("alpha", 1)) * args[1]
        elif t is aten.mul.Tensor:
            self.magnitude[n] = args[0] * args[1]
        elif t is aten.linear.default:
            self.magnitude[n] = F.linear(*args)
        elif t is aten.addmm.default:
            self.magnitude[n] = args[0] + args[1] @ args[2]
        elif t in (aten.mm.default, aten.matmul.default):
            self.magnitude[n] = args[0] @ args[1]
        elif t in MOVES:
            self.magnitude[n] = t(*args, **n.kwargs)
        else:
            self.magnitude[n] = value.abs()
        return value


def exact_leaves(module: GemmChain, compiled, inputs: tuple, spec: dict) -> tuple[list, list]:
    """The leaves in fp64 (the adapted linears from the compiled graph with the same adapter weights) and
    their bounds (0 for inputs and parameters, LEAF times the magnitude for the linears)."""
    only = copy.deepcopy(module)
    only.steps, only.outputs = [], [0, 1] if module.gate is not None else [0]
    leaves = surgeon.compile(only, inputs, spec)
    trained = dict(compiled.module.named_parameters())
    with torch.no_grad():
        for name, p in leaves.module.named_parameters():
            if name in trained:              # gate's adapter is absent where nothing reads gate(x)
                p.copy_(trained[name])
    gm = leaves.module.double()
    interpreter = Magnitudes(gm)
    with torch.no_grad():
        linears = interpreter.run(*(t.double() for t in inputs))
    linears = list(linears) if isinstance(linears, (tuple, list)) else [linears]
    out_nodes = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
    rest = [t.detach().double() for t in module.leaves(inputs)[len(linears):]]
    unit = LEAF[inputs[0].dtype]
    errors = [unit * interpreter.magnitude[n] for n in out_nodes] + [torch.zeros_like(t) for t in rest]
    return linears + rest, errors


def exact_and_bounds(module: GemmChain, compiled, inputs: tuple, spec: dict) -> tuple[list, list]:
    """Each output's exact value and bound, each step's dtype from an eager run."""
    with torch.no_grad():
        eager = module.leaves(inputs)
        for step in module.steps:
            eager.append(run(step, eager))
    values, errors = exact_leaves(module, compiled, inputs, spec)
    for step in module.steps:
        value, error = bound(step, values, errors, eager[len(values)].dtype)
        values.append(value)
        errors.append(error)
    return [values[i] for i in module.outputs], [errors[i] for i in module.outputs]


# ---------------------------------------------------------------- the properties


def compiled_for(module: GemmChain, inputs: tuple, spec: dict, seed: int):
    compiled = surgeon.compile(module, inputs, spec)
    randomize_adapters(compiled.module, seed + 1)
    return compiled


def check_seed(seed: int, dtype: torch.dtype) -> tuple:
    """The properties in the module docstring for one seed; returns (regions, rejections, compiled,
    the module before lowering)."""
    module, inputs, spec = build(seed, dtype)
    compiled = compiled_for(module, inputs, spec, seed)
    unlowered = copy.deepcopy(compiled.module)
    expected = outputs(compiled.module, inputs)
    exact, bounds = exact_and_bounds(module, compiled, inputs, spec)
    assert_within(expected, exact, bounds, "eager")          # the error model holds for eager
    regions = assert_sound_regions(compiled.module)
    _, rejections = partition(compiled.module)
    held = {n.name for r in regions for n in r.nodes}
    assert_lowers_within(compiled, regions, inputs, expected, exact, bounds)
    left = held & {n.name for n in compiled.module.graph.nodes}
    assert not left, left                                    # every node a region held is gone
    return regions, rejections, compiled, unlowered, inputs


@pytest.mark.parametrize("seed", SEEDS)
def test_random_gemm_chains_lower_and_keep_the_function(seed):
    check_seed(seed, torch.float32)


@pytest.mark.parametrize("seed", FP16_SEEDS)
def test_random_fp16_gemm_chains_lower_and_keep_the_function(seed):
    check_seed(seed, torch.float16)


# the gradients: the op's backward is its torch reference (kernels/registry.py), the same formulas as
# eager's autograd in another association, so each gradient is as close to the fp64 one as eager's
# within this factor (or within 64 fp32 ulp of the largest gradient where eager's is closer still)
GRAD_FACTOR = 4


def gradients(module: nn.Module, inputs: tuple, seed: int) -> dict:
    """The trainable parameters' gradients of sum(out * w) (w fixed per seed), in train mode."""
    module.train()
    out = module(*inputs)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.rand(o.shape, generator=gen).to(o.dtype)).sum() for o in (out if isinstance(out, tuple)
                                                                                      else (out,)))
    loss.backward()
    return {n: p.grad.detach().double() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("seed", AUTOGRAD_SEEDS)
def test_backward_through_the_lowered_module_gives_the_adapters_gradients(seed):
    *_, compiled, unlowered, inputs = check_seed(seed, torch.float32)
    exact = gradients(copy.deepcopy(unlowered).double(), tuple(t.double() for t in inputs), seed)
    eager, lowered = gradients(unlowered, inputs, seed), gradients(compiled.module, inputs, seed)
    assert lowered.keys() == eager.keys() == exact.keys() and exact
    for name, g in exact.items():
        floor = 64 * 2.0 ** -24 * g.abs().max()
        allowed = GRAD_FACTOR * max((eager[name] - g).abs().max(), floor)
        assert (lowered[name] - g).abs().max() <= allowed, name


def test_the_seeds_cover_every_kind_rule_tail_and_stopper():
    """The fixed seeds draw every adapter kind, both layouts, every epilogue rule, program tails and
    each stopper, and each stopper's refusal is reported."""
    kinds, rules, stops, layouts, programs = set(), set(), set(), set(), set()
    for seed in SEEDS:
        module, inputs, spec = build(seed)
        adapter = spec["adapters"][0]
        kinds.add((adapter["type"], adapter.get("on", "output")))
        stops |= {s.op for s in module.steps if s.op in ("sum_last", "transpose", "matmul", "heads")}
        regions, rejections = partition(surgeon.compile(module, inputs, spec).module)
        for region in (r for r in regions if r.kind == "lora_linear"):
            layouts.add(region.weight_layout)
            programs.add("program" in region.parts)
            rules |= {rule for rule, _, _ in region.steps}
            assert region.stop, region.name                  # every region says where and why it ends
        assert all(isinstance(why, str) and why for _, why in rejections)
    assert kinds == {(k, o.get("on", "output")) for k, o in KINDS}
    assert layouts == {"out_in", "in_out"} and programs == {True, False}
    assert rules == {"silu", "gelu", "gelu_tanh", "relu", "mul", "add", "scale", "gain", "bias"}, rules
    assert stops == {"sum_last", "transpose", "matmul", "heads"}, stops


# ---------------------------------------------------------------- regressions (minimized from seeds)


class SwishAfterInputScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 8)

    def forward(self, x):
        y = self.proj(x)
        return y * torch.sigmoid(y)                  # y read twice: the linear has two users


def test_regression_an_input_scaled_linear_read_twice_is_still_a_region():
    """Seeds 352, fp16 1048 and 1121. IA3 on the input refused a linear with two users ('used outside
    the adapter site'), though the linear is the region's output: the swish was lowered alone, and a
    second lower then found x * l and the linear (their user now one pointwise call) as a region."""
    x = (torch.rand(6, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    spec = {"adapters": [{"name": "a", "type": "ia3", "on": "input", "targets": ["proj"]}], "pipeline": ["insert"]}
    compiled = compiled_for(SwishAfterInputScale().eval(), (x,), spec, 0)
    expected = outputs(compiled.module, (x,))[0]
    regions, rejections = partition(compiled.module)
    assert [(r.name, r.epilogue()[0], "program" in r.parts) for r in regions] == [("lora_linear@proj", "x_gain:0|",
                                                                                  True)]
    assert not [why for where, why in rejections if where.startswith("adapter a")]
    compiled.apply(["fuse", "lower"])
    torch.testing.assert_close(outputs(compiled.module, (x,))[0], expected, rtol=1e-5, atol=1e-5)  # a few ulp
    code = compiled.module.code
    compiled.apply(["lower", "fuse"], verify=False)
    assert [row.matches for row in compiled.report.rows[-2:]] == [0, 0] and compiled.module.code == code
