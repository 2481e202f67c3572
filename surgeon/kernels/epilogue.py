"""The epilogue rule table: one small entry per elementwise op a fused GEMM may end with.

An epilogue is an ordered list of Steps applied to the fp32 accumulator of a GEMM tile before
its single store. Each rule says, for one op:
  graph    which canonical aten call it stands for (`match` returns the step, or the reason it
           does not apply; an op with no rule ends the region, and the reason is reported);
  triton   one line of Triton over `acc` (and `{operand}`, a tile or row loaded by the template),
           using Triton builtins only (no @jit helpers such as tl.sigmoid: those are fixed as
           compiled or interpreted when triton is imported, which would tie TRITON_INTERPRET=1
           to import order);
  torch    the same op in torch (the reference, and the no-GPU path);
  vjp      its backward: (grad, value before the op, operand) -> (grad of value, grad of operand).

An epilogue is written as a string for the custom op, e.g. "silu,mul:0,add:1,scale:0.5"
(`mul:0` multiplies by operand 0). A prologue before '|' names operands the GEMM itself reads
(PROLOGUE: "x_gain:0|" scales x's columns in the K loop for IA3 on the input; VeRA's "vera_d",
"vera_b" and LoRA-XS's "xs_r" act on the LoRA branch). Bias is a row operand passed on its own;
`steps()` puts its step first when a bias is present, unless the string places it ("gain:0,bias":
DoRA scales the GEMM result per output before its bias is added).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


@dataclass(frozen=True)
class Step:
    """One epilogue op: a rule name and its operand index or constant."""

    rule: str
    operand: int | None = None     # index into the op's `operands` list (tile rules)
    const: float | None = None     # the constant (const rules)

    def __str__(self) -> str:
        if self.operand is not None:
            return f"{self.rule}:{self.operand}"
        return self.rule if self.const is None else f"{self.rule}:{self.const!r}"


@dataclass(frozen=True)
class Rule:
    operand: str | None           # None, "row" (the bias, N), "vec" (an N operand), "tile" (M, N) or "const"
    role: str                     # what the operand is, used to name it in the kernel
    math: str                     # the op in the kernel's docstring formula
    triton: str
    torch: Callable[[torch.Tensor, Any], torch.Tensor]
    vjp: Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor | None]]


def _relu_vjp(g, v, _):
    return g * (v > 0).to(g.dtype), None


RULES: dict[str, Rule] = {
    # z + b[n]: the base linear's bias, broadcast over rows
    "bias": Rule("row", "bias", "{value} + bias", "acc = acc + {operand}[None, :]",
                 lambda v, b: v + b, lambda g, v, b: (g, g.sum(0))),
    # silu(z) = z * sigmoid(z) = z / (1 + exp(-z))
    "silu": Rule(None, "", "silu({value})", "acc = acc / (1.0 + tl.exp(-acc))",
                 lambda v, _: F.silu(v), lambda g, v, _: (aten.silu_backward(g, v), None)),
    # gelu(z) = z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2))
    "gelu": Rule(None, "", "gelu({value})",
                 "acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))",
                 lambda v, _: F.gelu(v), lambda g, v, _: (aten.gelu_backward(g, v), None)),
    # gelu_tanh(z) = 0.5 z (1 + tanh(u)) = z * sigmoid(2u) = z / (1 + exp(-2u)), u = sqrt(2/pi) (z + 0.044715 z^3)
    "gelu_tanh": Rule(None, "", "gelu_tanh({value})",
                      "acc = acc / (1.0 + tl.exp(-1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)))",
                      lambda v, _: F.gelu(v, approximate="tanh"),
                      lambda g, v, _: (aten.gelu_backward(g, v, approximate="tanh"), None)),
    # relu(z) = max(z, 0)
    "relu": Rule(None, "", "relu({value})", "acc = tl.maximum(acc, 0.0)", lambda v, _: F.relu(v), _relu_vjp),
    # z * g[n]: a per-output gain (IA3's output scale l, DoRA's m / ||W + s B A||_row)
    "gain": Rule("vec", "gain", "({value}) * {operand}[n]", "acc = acc * {operand}[None, :]",
                 lambda v, o: v * o, lambda g, v, o: (g * o, (g * v).sum(0))),
    # z * gate (SwiGLU's elementwise gate, or any same-shape multiplier)
    "mul": Rule("tile", "gate", "({value}) * {operand}", "acc = acc * {operand}",
                lambda v, o: v * o, lambda g, v, o: (g * o, g * v)),
    # z + residual
    "add": Rule("tile", "residual", "{value} + {operand}", "acc = acc + {operand}",
                lambda v, o: v + o, lambda g, v, o: (g, g)),
    # z * c for a Python constant c
    "scale": Rule("const", "", "({value}) * {const!r}", "acc = acc * {const!r}",
                  lambda v, c: v * c, lambda g, v, c: (g * c, None)),
}


def parse(epilogue: str) -> tuple[Step, ...]:
    """The steps of an epilogue string ("" -> no steps); raise ValueError naming a bad step."""
    return _parse(epilogue)


@lru_cache(maxsize=None)
def _parse(epilogue: str) -> tuple[Step, ...]:
    steps = []
    for text in filter(None, (t.strip() for t in epilogue.split(","))):
        name, _, arg = text.partition(":")
        rule = RULES.get(name)
        if rule is None:
            raise ValueError(f"epilogue step {text!r}: no rule {name!r}; known: {sorted(RULES)}")
        if rule.operand in ("tile", "vec"):
            steps.append(Step(name, operand=int(arg)))
        elif rule.operand == "const":
            steps.append(Step(name, const=float(arg)))
        elif arg:
            raise ValueError(f"epilogue step {text!r}: {name} takes no argument")
        else:
            steps.append(Step(name))
    return tuple(steps)


PROLOGUE = {
    "x_gain": "scales x's K columns before the GEMM (IA3 on a linear's input)",
    "vera_d": "scales x @ A^T's R columns before the up-projection (VeRA's d)",
    "vera_b": "scales the up-projection's N columns before it is added (VeRA's b)",
    "xs_r": "an R x R matrix between A and B: (x A^T) R^T (LoRA-XS's R)",
}


def prologue(epilogue: str) -> dict[str, int]:
    """The operand index of each vector named before '|' (e.g. "x_gain:0|silu"; see PROLOGUE)."""
    if "|" not in epilogue:
        return {}
    found = {}
    for item in filter(None, (t.strip() for t in epilogue.partition("|")[0].split(","))):
        name, _, arg = item.partition(":")
        if name not in PROLOGUE or not arg.strip().isdigit():
            raise ValueError(f"epilogue {epilogue!r}: before '|' only {sorted(PROLOGUE)} with an operand index "
                             f"may stand, not {item!r}")
        found[name] = int(arg)
    return found


def x_gain(epilogue: str) -> int | None:
    """The operand index of a prologue gain on x ("x_gain:i|..."), or None."""
    return prologue(epilogue).get("x_gain")


def steps(epilogue: str, has_bias: bool) -> tuple[Step, ...]:
    """The full step list of a fused op: bias first (when present and not placed) then the epilogue
    (after the prologue, when the string has one)."""
    prologue(epilogue)                     # validates a prologue
    chain = parse(epilogue.rpartition("|")[2])
    placed = sum(step.rule == "bias" for step in chain)
    if placed > 1 or (placed and not has_bias):
        raise ValueError(f"epilogue {epilogue!r} places the bias {placed} times, with "
                         f"{'a' if has_bias else 'no'} bias tensor")
    return chain if placed or not has_bias else (Step("bias"),) + chain


def operand_of(step: Step, bias: torch.Tensor | None, operands: list[torch.Tensor]) -> Any:
    """The value a step reads: the bias row, an operand tile or its constant."""
    kind = RULES[step.rule].operand
    return bias if kind == "row" else operands[step.operand] if kind in ("tile", "vec") else step.const


def tile_shape(operand: torch.Tensor, lead: tuple, N: int) -> tuple:
    """The shape a tile operand must have: the output's (lead + (N,)), or any with the same rows and N
    (the leading dims of a view the region grew through)."""
    rows = math.prod(lead)
    if operand.dim() >= 1 and operand.shape[-1] == N and operand.numel() == rows * N:
        return tuple(operand.shape)
    return (*lead, N)


def as_tiles(chain: tuple[Step, ...], operands: list[torch.Tensor], shape: tuple[int, int]) -> list[torch.Tensor]:
    """The operands as the steps read them: tile operands as (M, N), the others as they are."""
    tile = {s.operand for s in chain if RULES[s.rule].operand == "tile"}
    return [op.reshape(shape) if i in tile else op for i, op in enumerate(operands)]


def apply(value: torch.Tensor, chain: tuple[Step, ...], bias, operands) -> list[torch.Tensor]:
    """Run the steps in torch; return the value before each step and the final value."""
    values = [value]
    for step in chain:
        operand = operand_of(step, bias, operands)
        if isinstance(operand, torch.Tensor):
            operand = operand.to(value.dtype)
        values.append(RULES[step.rule].torch(values[-1], operand))
    return values


# ---------------------------------------------------------------- graph side: node -> step

def match(node: fx.Node, value: fx.Node, same_shape: Callable[[fx.Node], bool],
          row_vector: Callable[[fx.Node], bool] = lambda other: False) -> "tuple[str, Any] | str":
    """(rule name, operand node or constant) when `node` applied to `value` has a rule, else why not.

    `same_shape(other)` says whether a tensor operand has the region output's shape and dtype;
    `row_vector(other)` whether it is one value per output column (a gain, e.g. IA3's l).
    """
    target = node.target
    if target in (aten.silu.default, aten.relu.default):
        return ("silu" if target is aten.silu.default else "relu"), None
    if target is aten.gelu.default:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu_tanh" if approx == "tanh" else "gelu"), None
    if target in (aten.mul.Tensor, aten.add.Tensor) and len(node.args) == 2:
        other = node.args[1] if node.args[0] is value else node.args[0]
        if other is value:
            return f"{_short(node)}: both inputs are the region output (no rule for a square)"
        if target is aten.add.Tensor and node.kwargs.get("alpha", 1) != 1:
            return f"{_short(node)}: add with alpha={node.kwargs['alpha']} (no rule)"
        if isinstance(other, fx.Node):
            if target is aten.mul.Tensor and row_vector(other):
                return "gain", other
            if not same_shape(other):
                return f"{_short(node)}: operand '{other.name}' is not a same-shape, same-dtype tile (broadcast)"
            return ("mul" if target is aten.mul.Tensor else "add"), other
        if isinstance(other, (int, float)) and target is aten.mul.Tensor and math.isfinite(other):
            return "scale", float(other)
        return f"{_short(node)}: no rule for a constant operand {other!r}"
    return f"{_short(node)}: no epilogue rule (falls back to eager)"


def _short(node: fx.Node) -> str:
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
