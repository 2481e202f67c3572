"""fuse + lower, fuzzed: random DAGs of pointwise ops keep their function and every region is sound.

Each seed builds (random.Random(seed)) a module whose forward is a random DAG over inputs shaped as
a transformer block broadcasts them: x [B, T, H], [H] (an input, or a parameter: a get_attr node),
[B, T, 1], [1, T, H], [B, 1, H] and 0-dim. Sometimes x is first a LoRA-targeted linear's output: a
lora_linear region seeds there and may absorb a pointwise group as its program. Ops come from
kernels/pointwise_program.RULES (FUSABLE), from ops no rule takes (CUTS: they split groups and make
paths that leave a group and come back) and, in fp16 graphs, casts. An op is kept only if its value
on the example inputs is tame (finite, |v| < 30; rsqrt, sqrt, div, log and negative or fractional
powers read values > 0.3; exp reads values < 2.5). For every seed, under Triton's interpreter:
  - partition: no node is in two regions, every region is convex, and contracting all of them at
    once leaves the graph acyclic;
  - fuse + lower keeps the function: one surgeon call per region, outputs of the same shape and
    dtype, each within its error bound of the exact (fp64) function, as eager's are (see UNIT);
  - a second lower (and fuse) finds nothing and leaves the code as it is;
  - no refusal is stale: none names a node a region holds as left out (assert_no_stale_refusal).
Sizes are tiny (B = 2, T = 3, H <= 40: one 1024-wide block, six rows): a seed costs ~0.2 s.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.passes.fuse import dependency_graph, is_convex, partition

B, T, K = 2, 3, 8                       # batch, sequence, the linear's in-features
SEEDS = [*range(80), 516]       # 516: the first seed whose groups read each other (see the regressions)
FP16_SEEDS = range(100, 120)
# masked-off lanes load 0.0 and run the ops on it (1 / 0, log2 0): numpy warns, the stores are masked
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- the op table


@dataclass(frozen=True)
class OpKind:
    """A forward op: how many value operands, its torch call, constants to draw, when it is tame."""

    arity: int
    fn: object                        # fn(*values, c) with c a drawn constant (None when `consts` is empty)
    consts: tuple = ()
    ok: object = lambda c, *values: True       # extra condition on the operands' example values


def positive(c, a, *rest) -> bool:
    return bool(a.min() > 0.3)


def broadcasts(c, a, b) -> bool:
    return all(p == q or 1 in (p, q) for p, q in zip(a.shape[::-1], b.shape[::-1]))


def unary(fn, consts=(), ok=lambda c, a: True) -> OpKind:
    return OpKind(1, lambda a, c: fn(a) if not consts else fn(a, c), consts, ok)


def some_dims(c, a) -> bool:
    return a.dim() >= 1


# ops with a pointwise rule (kernels/pointwise_program.RULES)
FUSABLE = {
    "add": OpKind(2, lambda a, b, c: a + b, ok=broadcasts), "sub": OpKind(2, lambda a, b, c: a - b, ok=broadcasts),
    "mul": OpKind(2, lambda a, b, c: a * b, ok=broadcasts),
    "div": OpKind(2, lambda a, b, c: a / b, ok=lambda c, a, b: broadcasts(c, a, b) and positive(c, b)),
    "add_alpha": OpKind(2, lambda a, b, c: torch.add(a, b, alpha=c), (0.5, -2.0), ok=broadcasts),
    "add_scalar": unary(torch.add, (0.5, -1.25, 2.0)), "sub_scalar": unary(torch.sub, (0.75, 1e-3)),
    "mul_scalar": unary(torch.mul, (0.5, -1.5, 3.0)), "div_scalar": unary(torch.div, (2.0, -0.25)),
    "rsub": unary(lambda a, c: c - a, (1.0, 0.5)), "neg": unary(torch.neg),
    "exp": unary(torch.exp, ok=lambda c, a: bool(a.max() < 2.5)), "tanh": unary(torch.tanh),
    "sigmoid": unary(torch.sigmoid), "silu": unary(F.silu), "relu": unary(torch.relu),
    "gelu": unary(lambda a, c: F.gelu(a, approximate=c), ("none", "tanh")), "sin": unary(torch.sin),
    "cos": unary(torch.cos),
    "rsqrt": unary(torch.rsqrt, ok=positive), "sqrt": unary(torch.sqrt, ok=positive),
    "reciprocal": unary(torch.reciprocal, ok=positive),
    "pow": unary(torch.pow, (2, 3, -1, -2, 0.5, 1.5), ok=lambda c, a: (c == int(c) and c > 0) or positive(c, a)),
    "mean_last": unary(lambda a: a.mean(-1, keepdim=True), ok=some_dims),
}
# ops with no rule, or whose rule refuses them: groups end at them
CUTS = {
    "clamp": unary(lambda a: a.clamp(-1.5, 1.5)), "abs": unary(torch.abs), "log": unary(torch.log, ok=positive),
    "cumsum": unary(lambda a: a.cumsum(-1), ok=some_dims),
    "sum_last": unary(lambda a: a.sum(-1, keepdim=True), ok=some_dims),
    "mean_mid": unary(lambda a: a.mean(1, keepdim=True), ok=lambda c, a: a.dim() == 3),
}
# fp16 graphs: upcasts to compute in fp32 (mixed binary ops then promote), and casts back
CASTS = {"to_float": unary(lambda a: a.float(), ok=lambda c, a: a.dtype == torch.float16),
         "to_half": unary(lambda a: a.half(), ok=lambda c, a: a.dtype == torch.float32)}
OPS = FUSABLE | CUTS | CASTS


@dataclass(frozen=True)
class Step:
    op: str                           # its OPS name
    args: tuple                       # the value ids it reads
    const: object = None


def run_step(step: Step, values: list) -> torch.Tensor:
    """The value a step computes from the values before it."""
    return OPS[step.op].fn(*(values[i] for i in step.args), step.const)


# ---------------------------------------------------------------- the random module


class RandomDag(nn.Module):
    """forward: the leaves (x, or proj(x), then the other inputs and the gain), then each step."""

    def __init__(self, proj: nn.Linear | None, gain: torch.Tensor | None):
        super().__init__()
        self.proj = proj
        self.gain = None if gain is None else nn.Parameter(gain)
        self.steps: list[Step] = []
        self.outputs: list[int] = []

    def leaves(self, inputs) -> list:
        first = inputs[0] if self.proj is None else self.proj(inputs[0])
        return [first, *inputs[1:], *([] if self.gain is None else [self.gain])]

    def forward(self, *inputs):
        values = self.leaves(inputs)
        for step in self.steps:
            values.append(run_step(step, values))
        out = tuple(values[i] for i in self.outputs)
        return out if len(out) > 1 else out[0]


# broadcast shapes of the optional inputs, by name
SHAPES = {"col": lambda H: (H,), "row": lambda H: (B, T, 1), "mid": lambda H: (1, T, H),
          "batch": lambda H: (B, 1, H), "scalar": lambda H: ()}


def build(seed: int, dtype: torch.dtype = torch.float32) -> tuple[RandomDag, tuple, bool]:
    """(module, example inputs, whether it has the LoRA-targeted linear) for a seed."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    H = rng.choice([5, 16, 24, 33, 40])
    linear = rng.random() < 0.35
    shapes = [(B, T, K if linear else H)] + [SHAPES[n](H) for n in SHAPES if rng.random() < 0.5]
    inputs = tuple((torch.rand(s, generator=gen) + 0.5).to(dtype) for s in shapes)
    proj = None
    if linear:
        proj = nn.Linear(K, H).to(dtype)
        with torch.no_grad():
            proj.weight.copy_(torch.rand(H, K, generator=gen) - 0.5)
            proj.bias.copy_(torch.rand(H, generator=gen))
    gain = (torch.rand(H, generator=gen) + 0.5).to(dtype) if rng.random() < 0.4 else None
    module = RandomDag(proj, gain).eval()
    with torch.no_grad():
        values = module.leaves(inputs)
        module.steps = grow_steps(rng, values, dtype, len(values) + rng.randint(2, 30))
    # every value no step reads is an output (export keeps only what an output needs), and maybe another
    read = {i for step in module.steps for i in step.args}
    made = range(len(values) - len(module.steps), len(values))
    module.outputs = [i for i in made if i not in read]
    module.outputs += rng.sample([i for i in made if i in read], min(len(read & set(made)), rng.choice([0, 0, 1])))
    return module, inputs, linear


def grow_steps(rng: random.Random, values: list, dtype: torch.dtype, count: int) -> list[Step]:
    """`count` tame steps (more if the leaves need them), appending their example values to `values`:
    the first steps read each leaf in turn (export drops what nothing reads), later operands lean to
    recent values."""
    names = list(FUSABLE) * 4 + list(CUTS) * 4 + (list(CASTS) * 4 if dtype == torch.float16 else [])
    steps, unread = [], list(range(len(values)))
    while len(steps) < count or unread:
        kind_name = rng.choice(names)
        kind = OPS[kind_name]
        args = tuple(len(values) - 1 - min(int(rng.expovariate(0.3)), len(values) - 1) for _ in range(kind.arity))
        args = (unread[0], *args[1:]) if unread else args
        const = rng.choice(kind.consts) if kind.consts else None
        operands = [values[i] for i in args]
        if not kind.ok(const, *operands):
            continue
        value = kind.fn(*operands, const)
        if value.is_floating_point() and torch.isfinite(value).all() and value.abs().max() < 30:
            steps.append(Step(kind_name, args, const))
            values.append(value)
            unread = [i for i in unread if i not in args]
    return steps


# ---------------------------------------------------------------- the checks


def compiled_for(module: RandomDag, inputs: tuple, linear: bool, seed: int):
    """surgeon.compile with a LoRA adapter on `proj` when there is one, its weights small and non-zero."""
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["proj"], "rank": 4, "alpha": 4}] if linear
            else [], "pipeline": ["insert"] if linear else []}
    compiled = surgeon.compile(module, inputs, spec)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                 # |s B A x| < ~0.03 keeps the guards' margins
        for name, p in compiled.module.named_parameters():
            if ".adapter_" in name:        # LoRA's own A and B (new tensors, not the user's)
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
    return compiled


def assert_sound_regions(gm) -> list:
    """partition(gm)'s regions: none shares a node with another, each is convex; returns them."""
    regions, rejections = partition(gm)
    graph, order = dependency_graph(gm), {n: i for i, n in enumerate(gm.graph.nodes)}
    owner: dict = {}
    for region in regions:
        assert is_convex(graph, order, set(region.nodes)), f"{region.name} is not convex"
        for node in region.nodes:
            assert node not in owner, f"{node.name} is in {owner[node]} and {region.name}"
            owner[node] = region.name
    # all at once: contracting every region keeps the graph acyclic (two convex regions may still
    # read each other's values; lower could then order neither call first)
    quotient = nx.DiGraph((owner.get(u, u), owner.get(v, v)) for u, v in graph.edges
                          if owner.get(u, u) != owner.get(v, v))
    assert nx.is_directed_acyclic_graph(quotient), nx.find_cycle(quotient)
    assert all(isinstance(why, str) and why for _, why in rejections)
    assert_no_stale_refusal(gm, regions, rejections)
    return regions


def assert_no_stale_refusal(gm, regions: list, rejections: list) -> None:
    """Every refusal is still true of the final regions, read from the report's text: a node a
    refusal names as left out (the candidate itself, a row group's dropped reductions, the nodes it
    says are still unfused) is in no region, a merge "A + b" did not put b in A, and no refused
    group's name is a region's."""
    owner = {n.name: r.name for r in regions for n in r.nodes}
    nodes = {n.name: n for n in gm.graph.nodes}
    for where, why in rejections:
        head, _, still = where.partition(" (still ")
        assert head not in {r.name for r in regions}, (where, why)
        if " + " in head:                                   # region + user(s): the user is not in it
            region, other = head.split(" + ", 1)
            users = [u.name for u in nodes[other[9:]].users] if other.startswith("users of ") else [other]
            assert not all(owner.get(u) == region for u in users), (where, why)
            continue
        named = [head] if head in nodes else []
        if still:                                           # narrowed: "(still unfused: a, b)"
            named = still.split(": ", 1)[1].rstrip(")").split(", ")
        elif "grouped again without " in why:               # the reductions a row group left out
            named = why.rsplit("grouped again without ", 1)[1].split(", ")
        assert named == [] or not any(name in owner for name in named), (where, why, owner)


def outputs(module, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


# ---------------------------------------------------------------- the tolerance: a running error bound

# The lowered and the eager module must each be within a bound of the exact (fp64) function, element
# by element, so they are within twice that bound of each other. A fixed rtol cannot be that bound:
# one rounding at an intermediate value is carried by the ops after it (exp at 2.5 multiplies it by 12,
# x^-2 at 0.3 by 74), up to 30 ops deep. The bound is carried through the steps; each op
#   - moves its operands within their bounds: the largest change of its exact value over the corners
#     (each operand value +- its bound; exact for ops monotone in each, and for relu, clamp and abs;
#     larger than any interior change for the smooth ones at these widths), or, for sums, means and
#     cumsum (non-negative weights), itself applied to the bounds;
#   - then adds, by dtype:
#   UNIT  its result is rounded once to its dtype, in eager (CPU ops compute in fp32 and round; sums
#         and means accumulate in fp32) and in the kernels alike: half an ulp, relative (absolute
#         below fp16's smallest normal number 2^-14, where its spacing stops shrinking);
#   MATH  the fp32 math before that rounding (torch's vectorized functions, the kernels' formulas such
#         as silu = z / (1 + exp(-z)), gelu's 1 + erf(z / sqrt 2) near z = -3, x^e = 2^(e log2 x)) is
#         within 16 fp32 ulp of the exact function, relative to the value and its operands;
#   ACC   a sum or mean of up to 40 terms in fp32, in any order: 64 fp32 ulp of the sum of |terms|;
#   EAGER torch's CPU rsqrt is not correctly rounded in fp16: up to 1.33 ulp off (measured), so 1 ulp more.
UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11}
MATH, ACC = 16 * 2.0 ** -24, 64 * 2.0 ** -24
EAGER = {("rsqrt", torch.float16): 2 * UNIT[torch.float16]}
REDUCING = {"mean_last", "sum_last", "mean_mid", "cumsum"}


def exact_leaves(module: RandomDag, compiled, inputs: tuple) -> tuple[list, list]:
    """The leaves in fp64 and their bounds: inputs and the gain are exact; the LoRA linear's output
    y = x W^T + b + (x A^T) B^T (s = 1) is rounded where eager rounds it (base, x A^T, its product with B,
    the sum), after fp32 accumulations (the fused kernel rounds less)."""
    values = [t.double() for t in module.leaves(inputs)]
    errors = [torch.zeros_like(v) for v in values]
    if module.proj is not None:
        p = {n: t.detach().double() for n, t in compiled.module.named_parameters()}
        W, b, A, B_ = (p[f"proj.{n}"] for n in ("weight", "bias", "adapter_a.lora_A", "adapter_a.lora_B"))
        x, unit = inputs[0].double(), UNIT[inputs[0].dtype]
        base, h = x @ W.T + b, x @ A.T
        h_error = unit * h.abs() + ACC * (x @ A.T.abs())
        values[0] = base + h @ B_.T
        errors[0] = unit * (base.abs() + (h @ B_.T).abs() + values[0].abs()) + h_error @ B_.T.abs() + \
            ACC * (x @ W.T.abs() + b.abs() + h.abs() @ B_.T.abs())
    return values, errors


def rounded(value: torch.Tensor) -> torch.Tensor:
    """|value|, or the smallest normal number where it is below it (UNIT's absolute floor)."""
    return value.detach().abs().clamp_min(torch.finfo(torch.float16).tiny)


def step_bound(step: Step, values: list, errors: list, dtype: torch.dtype) -> tuple:
    """(exact value, its bound) of a step whose eager result has `dtype`."""
    kind, operands = OPS[step.op], [values[i] for i in step.args]
    if step.op in CASTS:                          # the identity on exact values; to_half rounds
        return operands[0], errors[step.args[0]] + UNIT[dtype] * rounded(operands[0]) * (step.op == "to_half")
    if step.op in REDUCING:
        value = kind.fn(*operands, step.const)
        error = kind.fn(errors[step.args[0]], step.const) + ACC * kind.fn(operands[0].abs(), step.const)
        return value, error + UNIT[dtype] * rounded(value)
    value = kind.fn(*operands, step.const)
    carried = torch.zeros_like(value)
    ids = sorted(set(step.args))                 # a value read twice is one value: it moves as one
    for signs in itertools.product((-1.0, 1.0), repeat=len(ids)):
        sign = dict(zip(ids, signs))
        moved = kind.fn(*(o + sign[i] * errors[i] for o, i in zip(operands, step.args)), step.const)
        carried = torch.maximum(carried, (moved - value).abs())
    around = value.abs() + sum(o.abs() for o in operands)
    rounding = (UNIT[dtype] + EAGER.get((step.op, dtype), 0.0)) * rounded(value)
    return value, carried + rounding + MATH * around


def exact_and_bounds(module: RandomDag, compiled, inputs: tuple) -> tuple[list, list]:
    """Each output's exact value and its bound (see above), with each step's dtype from an eager run."""
    with torch.no_grad():
        eager = module.leaves(inputs)
        for step in module.steps:
            eager.append(run_step(step, eager))
    values, errors = exact_leaves(module, compiled, inputs)
    for step in module.steps:
        value, error = step_bound(step, values, errors, eager[len(values)].dtype)
        values.append(value)
        errors.append(error)
    return [values[i] for i in module.outputs], [errors[i] for i in module.outputs]


def assert_within(got: list, exact: list, bounds: list, what: str) -> None:
    for i, (g, x, e) in enumerate(zip(got, exact, bounds, strict=True)):
        excess = (g.double() - x).abs() - e
        assert (excess <= 0).all(), f"{what} output {i}: off the exact value by up to {excess.max():.3g} " \
                                    f"more than its bound, at {g.flatten()[excess.argmax()]:.6g}"


# ---------------------------------------------------------------- the properties


def check_seed(seed: int, dtype: torch.dtype) -> None:
    """The properties in the module docstring, for one seed."""
    module, inputs, linear = build(seed, dtype)
    compiled = compiled_for(module, inputs, linear, seed)
    expected = outputs(compiled.module, inputs)
    exact, bounds = exact_and_bounds(module, compiled, inputs)
    assert_within(expected, exact, bounds, "eager")          # the error model holds for eager
    regions = assert_sound_regions(compiled.module)
    assert_lowers_within(compiled, regions, inputs, expected, exact, bounds)


def assert_lowers_within(compiled, regions: list, inputs: tuple, expected: list, exact: list, bounds: list) -> None:
    """fuse + lower: one surgeon call per region, the outputs' shapes and dtypes kept and each value
    within its bound; a second lower and fuse find nothing."""
    compiled.apply(["fuse", "lower"], verify=False)
    calls = [n for n in compiled.module.graph.nodes if str(n.target).startswith("surgeon.")]
    assert len(calls) == len(regions) == compiled.report.rows[-1].matches
    assert {n.meta["surgeon_region"] for n in calls} == {r.name for r in regions}
    got = outputs(compiled.module, inputs)
    assert [(g.shape, g.dtype) for g in got] == [(e.shape, e.dtype) for e in expected]
    assert_within(got, exact, bounds, "lowered")
    code = compiled.module.code
    compiled.apply(["lower", "fuse"], verify=False)
    assert [row.matches for row in compiled.report.rows[-2:]] == [0, 0] and compiled.module.code == code


@pytest.mark.parametrize("seed", SEEDS)
def test_random_pointwise_dags_lower_and_keep_the_function(seed):
    check_seed(seed, torch.float32)


@pytest.mark.parametrize("seed", FP16_SEEDS)
def test_random_fp16_dags_lower_and_keep_the_function(seed):
    check_seed(seed, torch.float16)


def test_the_seeds_cover_every_region_kind_and_op():
    """The fixed seeds draw every op, lora_linear regions with and without a program, and row kernels."""
    drawn, kinds = set(), set()
    for seed in [*SEEDS, *FP16_SEEDS]:
        module, inputs, linear = build(seed, torch.float16 if seed in FP16_SEEDS else torch.float32)
        drawn |= {s.op for s in module.steps}
        compiled = compiled_for(module, inputs, linear, seed)
        for region in partition(compiled.module)[0]:
            program = region.parts.get("program")
            kinds.add((region.kind, program is not None and program.has_reduction, program is not None))
    assert drawn == set(OPS), set(OPS) - drawn
    assert {("lora_linear", False, True), ("lora_linear", False, False), ("elementwise", True, True),
            ("elementwise", False, True)} <= kinds, kinds


# ---------------------------------------------------------------- regressions (minimized from seeds)


def tame(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Values in [0.5, 1.5), the same on every run."""
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype)


def lowered_twice(module: nn.Module, *args) -> tuple[list, dict]:
    """fuse + lower (checked against eager), then lower + fuse again: they must find nothing.
    Returns the first partition's regions (as node-name lists) and its reasons."""
    compiled = surgeon.compile(module.eval(), args, {"adapters": [], "pipeline": []})
    expected = outputs(compiled.module, args)
    regions = assert_sound_regions(compiled.module)
    compiled.apply(["fuse", "lower"])
    reasons = dict(compiled.report.rows[-2].rejections)
    for got, want in zip(outputs(compiled.module, args), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)      # a short chain: a few ulp
    code = compiled.module.code
    compiled.apply(["lower", "fuse"], verify=False)
    assert [row.matches for row in compiled.report.rows[-2:]] == [0, 0] and compiled.module.code == code
    return [[n.name for n in r.nodes] for r in regions], reasons


class RowOfItsOwn(nn.Module):
    def forward(self, x, b):                         # x [B, T, H], b [B, 1, H]
        return x * 2.0 - (b * 0.5).mean(-1, keepdim=True)


def test_regression_a_refused_row_group_leaves_a_row_kernel_of_its_own():
    """Seeds 5, 7, 27. One group mul, mean, mul, sub has no row kernel (b is [B, 1, H] against
    [B, T, H]); it was grouped again without the mean: x * 2 - m lowered, b * 0.5 and the mean left
    eager, and a second lower then found them as a row kernel over b's own rows. The refusal is not
    reported: the mean it left out was fused (test_fuse_report.py)."""
    regions, reasons = lowered_twice(RowOfItsOwn(), tame(B, T, 8), tame(B, 1, 8, seed=1))
    assert sorted(regions) == [["mul", "sub"], ["mul_1", "mean"]]
    assert reasons == {}


class MiddleMean(nn.Module):
    def forward(self, x):
        a = x * 2.0
        d = a.mean(1, keepdim=True) / 2.0            # a mean over T: no row rule
        return torch.tanh(a), a.clamp(-1.5, 1.5) + d   # the add is kept out of a's group (a -> clamp -> add)


def test_regression_a_node_kept_out_of_a_group_that_was_then_split_joins_later():
    """Minimized from a deeper fuzz run. A group with a refused reduction is grouped again without it;
    a node kept out of that group only by a path through its other nodes (add, through clamp) could
    then join the reduction's users: only a second lower found div + add."""
    regions, reasons = lowered_twice(MiddleMean(), tame(B, T, 8))
    assert sorted(regions) == [["div", "add"], ["mul", "tanh"]]
    assert "a mean over other dims than the last" in reasons["row group at "]


class ReadEachOther(nn.Module):
    def forward(self, x, y):
        b0, a1 = x * 2.0, y + 1.0
        b1 = b0 * a1.clamp(-1.5, 1.5)                # a1 -> clamp -> b1: no rule on the way
        return b1, a1 * torch.exp(b0)                # b0 -> exp -> this mul


def test_regression_two_convex_groups_that_read_each_other_are_not_both_replaced():
    """Seed 516. Groups {mul, mul_1, exp} and {add, mul_2} are each convex, but each reads a value the
    other computes; replacing both made a cycle, and lower's topological sort then never ended."""
    regions, reasons = lowered_twice(ReadEachOther(), tame(B, T, 8), tame(B, T, 8, seed=1))
    assert regions == [["mul", "mul_1", "exp"]]
    assert "would make a cycle with elementwise@" in reasons["elementwise@#2"]


class CastAfterLora(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(K, 16)
        with torch.no_grad():                        # |y| < 7
            self.proj.weight.copy_(tame(16, K) - 1.0)
            self.proj.bias.copy_(tame(16, seed=1) - 0.5)

    def forward(self, x):
        return torch.sigmoid(self.proj(x)).float()


def test_regression_a_program_that_changes_the_dtype_is_not_absorbed_by_lora_linear():
    """fp16 seed 245. fp16 lora_linear absorbed sigmoid, to(float32) as its program, but its kernel
    stores x's dtype: lower's own check failed (fp32 output became fp16), or, unchecked, it changed."""
    x = tame(B, T, K, dtype=torch.float16)
    compiled = compiled_for(CastAfterLora().half().eval(), (x,), True, 0)
    expected = outputs(compiled.module, (x,))[0]
    regions, rejections = partition(compiled.module)
    assert [(r.kind, "program" in r.parts) for r in regions] == [("lora_linear", False), ("elementwise", True)]
    assert "output is torch.float32, add_tensor is torch.float16" in dict(rejections)["lora_linear@proj + elementwise@"]
    # unchecked: the pipeline's check takes the fp32 output's tolerance (1e-5), but the output is
    # fp16 math cast up, and the kernel's y differs from eager's by an fp16 rounding
    compiled.apply(["fuse", "lower"], verify=False)
    got = outputs(compiled.module, (x,))[0]
    assert got.dtype == expected.dtype == torch.float32
    # the kernel rounds y once, eager three times: <= 4 half-ulps of |y| < 8 (2^-9 each) apart; sigmoid'
    # <= 1/4, then a flip of sigmoid's own rounding (< 1: 2^-11)
    torch.testing.assert_close(got, expected, rtol=0, atol=2.0 ** -9 + 2.0 ** -11)
