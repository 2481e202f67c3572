"""The program of a pointwise region: its per-op rule table and the chain in SSA form.

`RULES` maps each aten op a pointwise kernel can compute to one small Rule (its Triton
expression over fp32 values, its torch reference); `program_from_nodes` turns a list of fx
nodes into a `Program` (inputs, ops, outputs with dtypes and shapes) that encodes to a string
for the custom op's `str` argument. Code generation and the op are in kernels/pointwise.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ---------------------------------------------------------------- the rule table


@dataclass(frozen=True)
class Rule:
    """One aten op: how to read a node, its fp32 Triton expression and its torch reference."""

    name: str                          # the op's name in programs and generated code
    triton: str | Callable[..., str]   # over operands {0}, {1} and params; a callable gets (*operands, **params)
    torch: Callable[..., torch.Tensor]
    arity: int = 1                     # how many leading node.args are operands (tensor or scalar)
    params: Callable[[fx.Node], "dict | str"] = lambda node: {}   # the node's constant attributes, or why not

    def expression(self, operands: list[str], params: dict) -> str:
        """The Triton expression for operand expressions `operands`."""
        if callable(self.triton):
            return self.triton(*operands, **params)
        return self.triton.format(*operands, **params)


def _scalar_tensor(value, like: torch.Tensor) -> torch.Tensor:
    """A Python scalar as a 0-dim tensor in `like`'s compute dtype (a torch function's first operand)."""
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    return torch.tensor(value, dtype=dtype, device=like.device)


def _binary(fn):
    """A torch binary op that also takes a Python scalar as its first operand."""
    return lambda a, b, **kw: fn(a if torch.is_tensor(a) else _scalar_tensor(a, b), b, **kw)


def _alpha(node: fx.Node) -> dict | str:
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        return f"alpha={alpha!r}"
    return {} if alpha == 1 else {"alpha": float(alpha)}


def _gelu(node: fx.Node) -> dict | str:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return {"approximate": approximate} if approximate in ("none", "tanh") else f"approximate={approximate!r}"


def _exponent(node: fx.Node) -> dict | str:
    e = node.args[1]
    if not isinstance(e, (int, float)) or not math.isfinite(e) or e == 0 or (e == int(e) and abs(e) > 4):
        return f"exponent {e!r} (rules: finite non-integers, and integers 1..4 and -1..-4)"
    return {"exponent": float(e)}


def _dtype_cast(node: fx.Node) -> dict | str:
    extra = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "copy", "non_blocking") and
             not (k == "memory_format" and v in (None, torch.preserve_format)) and
             not (k == "layout" and v in (None, torch.strided)) and
             not (k == "device" and v in (None, node.args[0].meta.get("val", torch.empty(0)).device))}
    return f"a cast with {sorted(extra)}" if extra else {}


def _pow(x: str, exponent: float) -> str:
    # x^n = x * ... * x for integer n (torch computes small integer powers by multiplication too);
    # x^e = 2^(e log2 x) otherwise (nan for x < 0, as torch; 0 and inf at x = 0)
    if exponent == int(exponent):
        product = " * ".join([x] * int(abs(exponent)))
        return product if exponent > 0 else f"1.0 / ({product})"
    if exponent in (0.5, -0.5):
        return f"tl.sqrt({x})" if exponent > 0 else f"tl.rsqrt({x})"
    return f"tl.exp2({exponent!r} * tl.log2({x}))"


def _gelu_triton(x: str, approximate: str) -> str:
    if approximate == "tanh":
        # 0.5 z (1 + tanh(u)) = z * sigmoid(2u) = z / (1 + exp(-2u)), u = sqrt(2/pi) (z + 0.044715 z^3)
        return f"{x} / (1.0 + tl.exp(-1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x})))"
    # z Phi(z) = 0.5 z (1 + erf(z / sqrt 2))
    return f"0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476))"


# tanh z = sign(z) (1 - e) / (1 + e), e = exp(-2|z|); below |z| = 0.1 its odd Taylor series to z^7
# instead (1 - e loses bits there; the next term is < 1e-9 relative)
_TANH = ("tl.where(tl.abs({0}) < 0.1, {0} * (1.0 + {0} * {0} * (-0.3333333333333333 + {0} * {0} * "
         "(0.13333333333333333 - 0.05396825396825397 * {0} * {0}))), tl.where({0} < 0.0, -1.0, 1.0) * "
         "(1.0 - tl.exp(-2.0 * tl.abs({0}))) / (1.0 + tl.exp(-2.0 * tl.abs({0}))))")

_ADD = Rule("add", lambda a, b, alpha=1.0: f"{a} + {b}" if alpha == 1 else f"{a} + {alpha!r} * {b}",
            _binary(torch.add), 2, _alpha)
_SUB = Rule("sub", lambda a, b, alpha=1.0: f"{a} - {b}" if alpha == 1 else f"{a} - {alpha!r} * {b}",
            _binary(torch.sub), 2, _alpha)
_MUL = Rule("mul", "{0} * {1}", _binary(torch.mul), 2)
_DIV = Rule("div", "{0} / {1}", _binary(torch.div), 2)
_CAST = Rule("to", "{0}", lambda x: x.clone(), 1, _dtype_cast)   # the rounding after every op is the cast


def _last_dim_mean(node: fx.Node) -> dict | str:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    if node.kwargs.get("dtype") is not None or not keepdim or rank is None or \
            list(dims or []) not in ([-1], [rank - 1]):
        return "a mean over other dims than the last (kept), or with a dtype (the row rule takes the last)"
    return {}


def _eval_dropout(node: fx.Node) -> dict | str:
    train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True)
    return {} if train is False else "dropout in training mode (random; no rule)"

RULES: dict[Any, Rule] = {
    aten.add.Tensor: _ADD, aten.add.Scalar: _ADD, aten.sub.Tensor: _SUB, aten.sub.Scalar: _SUB,
    aten.mul.Tensor: _MUL, aten.mul.Scalar: _MUL, aten.div.Tensor: _DIV, aten.div.Scalar: _DIV,
    # rsub(x, c, alpha) = c - alpha x
    aten.rsub.Scalar: Rule("rsub", lambda a, b, alpha=1.0: f"{b} - {a}" if alpha == 1 else f"{b} - {alpha!r} * {a}",
                           lambda a, b, alpha=1.0: torch.rsub(a, b, alpha=alpha), 2, _alpha),
    aten.neg.default: Rule("neg", "-{0}", torch.neg),
    # silu(z) = z sigmoid(z) = z / (1 + exp(-z))
    aten.silu.default: Rule("silu", "{0} / (1.0 + tl.exp(-{0}))", F.silu),
    aten.gelu.default: Rule("gelu", _gelu_triton, lambda x, approximate: F.gelu(x, approximate=approximate),
                            params=_gelu),
    # relu(z) = 0 where z < 0, else z (nan stays nan, as torch)
    aten.relu.default: Rule("relu", "tl.where({0} < 0.0, 0.0, {0})", torch.relu),
    aten.sigmoid.default: Rule("sigmoid", "1.0 / (1.0 + tl.exp(-{0}))", torch.sigmoid),
    aten.tanh.default: Rule("tanh", _TANH, torch.tanh),
    aten.rsqrt.default: Rule("rsqrt", "tl.rsqrt({0})", torch.rsqrt),
    aten.sqrt.default: Rule("sqrt", "tl.sqrt({0})", torch.sqrt),
    aten.reciprocal.default: Rule("reciprocal", "1.0 / {0}", torch.reciprocal),
    aten.exp.default: Rule("exp", "tl.exp({0})", torch.exp),
    aten.cos.default: Rule("cos", "tl.cos({0})", torch.cos),
    aten.sin.default: Rule("sin", "tl.sin({0})", torch.sin),
    aten.pow.Tensor_Scalar: Rule("pow", _pow, lambda x, exponent: torch.pow(x, exponent), 1, _exponent),
    aten.to.dtype: _CAST, aten._to_copy.default: _CAST,
    # dropout(x, p, train=False) = x (what an eval-mode capture records)
    aten.dropout.default: Rule("dropout", "{0}", lambda x: x.clone(), 1, _eval_dropout),
    # mean over the last dim, kept: a row reduction (kernels/pointwise_rows.py defines `mask`, `N` and
    # `_row_add`; tl.reduce with a combine function of the generated module, not tl.sum, a @jit helper
    # fixed as compiled or interpreted when triton is imported)
    aten.mean.dim: Rule("mean_last", "tl.reduce(tl.where(mask, {0}, 0.0), 0, _row_add) / N",
                        lambda x: x.mean(-1, keepdim=True), 1, _last_dim_mean),
}
REDUCTIONS = {"mean_last"}
BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES.values()}


# ---------------------------------------------------------------- the program


@dataclass(frozen=True)
class Value:
    """A value's dtype (e.g. "float16") and shape (ints, and strings for symbolic sizes)."""

    dtype: str
    shape: tuple


@dataclass(frozen=True)
class Op:
    """One op: its rule, operands ("%3" for value 3, else a number), constant params, result."""

    rule: str
    args: tuple
    params: dict
    value: Value


@dataclass(frozen=True)
class Program:
    """A pointwise chain: inputs, ops (value ids continue after the inputs) and output value ids."""

    inputs: tuple[Value, ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    names: tuple[str, ...] = ()     # per value id, for the generated source's header (not part of the math)
    # the graph nodes behind inputs and outputs (set by program_from_nodes; never encoded)
    input_nodes: tuple = field(default=(), compare=False, repr=False)
    output_nodes: tuple = field(default=(), compare=False, repr=False)

    def values(self) -> list[Value]:
        """Every value, by id."""
        return [*self.inputs, *(op.value for op in self.ops)]

    def encode(self) -> str:
        """The program as a JSON string (the custom op's `program` argument)."""
        return self._encoded

    @cached_property
    def _encoded(self) -> str:       # kept on the (frozen) instance: launchers key their kernels by it
        value = lambda v: {"dtype": v.dtype, "shape": v.shape}  # noqa: E731
        body = dict(inputs=[value(v) for v in self.inputs],
                    ops=[{"rule": op.rule, "args": op.args, "params": op.params, "value": value(op.value)}
                         for op in self.ops], outputs=self.outputs, names=self.names)
        return json.dumps(body, separators=(",", ":"))

    @staticmethod
    def decode(text: str) -> "Program":
        """The program an `encode` string describes; ValueError saying why when it is not one."""
        return _decode(text)

    def __reduce__(self):       # pickles as its encoding (graph nodes do not travel)
        return Program.decode, (self.encode(),)

    @property
    def has_reduction(self) -> bool:
        """Whether an op reduces a row (the program then runs as one row per program instance)."""
        return any(op.rule in REDUCTIONS for op in self.ops)

    def anonymous(self) -> "Program":
        """The same math without names (programs that differ only in names share one kernel)."""
        return self._anonymous

    @cached_property
    def _anonymous(self) -> "Program":
        return replace(self, names=()) if self.names else self


@lru_cache(maxsize=256)
def _decode(text: str) -> Program:
    try:
        body = json.loads(text)
        value = lambda v: Value(v["dtype"], tuple(v["shape"]))  # noqa: E731
        ops = tuple(Op(o["rule"], tuple(o["args"]), o["params"], value(o["value"])) for o in body["ops"])
        program = Program(tuple(map(value, body["inputs"])), ops, tuple(body["outputs"]), tuple(body["names"]))
        for op in ops:
            if op.rule not in BY_NAME:
                raise ValueError(f"no rule {op.rule!r}")
            for arg in op.args:
                if isinstance(arg, str) and not 0 <= int(arg[1:]) < len(program.values()):
                    raise ValueError(f"{op.rule} reads undefined value {arg}")
        for dtype in {v.dtype for v in program.values()}:
            if getattr(torch, dtype, None) not in FLOAT_DTYPES:
                raise ValueError(f"dtype {dtype!r}")
        return program
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"surgeon::pointwise: cannot decode program {text[:80]!r}: {err}") from None


def broadcast_shape(shapes: list[tuple]) -> tuple | None:
    """The shape every one of `shapes` broadcasts to (sizes are ints or symbolic names), or None."""
    rank = max((len(s) for s in shapes), default=0)
    full: list = [1] * rank
    for shape in shapes:
        for d, size in enumerate(shape, start=rank - len(shape)):
            if size != 1 and full[d] not in (1, size):
                return None
            full[d] = size if size != 1 else full[d]
    return tuple(full)


def row_kinds(program: Program) -> "tuple[tuple[str, ...], tuple[str, ...]] | str":
    """For a program with a row reduction: each input's and output's kind against the full shape F,
    ("row": F itself, "col": one value per last-dim position, "rowscalar": one value per row,
    "scalar": one value), or why one is none of them (a row kernel reads no other broadcast)."""
    full = broadcast_shape([v.shape for v in program.values()])
    if not full:
        return "no full shape with a last dim to reduce"

    def kind(shape: tuple) -> str | None:
        shape = (1,) * (len(full) - len(shape)) + tuple(shape)
        lead_full, lead_one = shape[:-1] == full[:-1], all(d == 1 for d in shape[:-1])
        if shape == full:
            return "row"
        if lead_one and shape[-1] == full[-1]:
            return "col"
        if shape[-1] == 1 and (lead_full or lead_one):
            return "rowscalar" if lead_full and not lead_one else "scalar"
        return None

    values = program.values()
    ins = tuple(kind(v.shape) for v in program.inputs)
    outs = tuple(kind(values[o].shape) for o in program.outputs)
    if None in ins + outs or "col" in outs or ("scalar" in outs and full[:-1] != (1,) * (len(full) - 1)):
        return f"shapes {[v.shape for v in values]} against {full}: a row kernel reads and writes only rows, " \
               f"per-column vectors, per-row scalars and scalars"
    return ins, outs


def program_from_nodes(nodes: list[fx.Node], first: fx.Node | None = None) -> Program | str:
    """The Program for call_function nodes in graph order, or the reason there is none.

    Inputs are the nodes outside `nodes` that the ops read, in order of first use (`first`, when
    given, is input %0: a GEMM epilogue's accumulator) (`program.input_nodes`); outputs are the
    nodes used outside `nodes`, and the last node, in graph order (`program.output_nodes`).
    """
    inside, input_nodes, inputs, parsed = set(nodes), [], [], []
    if first is not None:
        value = _value(first)
        if isinstance(value, str):
            return f"{first.name}: {value}"
        input_nodes, inputs = [first], [value]
    for position, node in enumerate(nodes):
        operands = _operands(node)
        if isinstance(operands, str):
            return f"{node.name} ({getattr(node.target, '__name__', node.target)}): {operands}"
        for arg in operands[0]:
            if isinstance(arg, fx.Node) and arg in inside and arg not in nodes[:position]:
                return f"{node.name} reads {arg.name}, which comes later in the list"
            if isinstance(arg, fx.Node) and arg not in inside and arg not in input_nodes:
                value = _value(arg)
                if isinstance(value, str):
                    return f"{node.name} reads {arg.name}: {value}"
                input_nodes.append(arg)
                inputs.append(value)
        value = _value(node)
        if isinstance(value, str):
            return f"{node.name}: {value}"
        parsed.append((*operands, value))
    ids = {n: i for i, n in enumerate([*input_nodes, *nodes])}
    ops = tuple(Op(RULES[n.target].name, tuple(f"%{ids[a]}" if isinstance(a, fx.Node) else a for a in args),
                   params, value) for n, (args, params, value) in zip(nodes, parsed))
    outs = tuple(n for n in nodes if n is nodes[-1] or any(u not in inside for u in n.users))
    shapes = [v.shape for v in inputs] + [op.value.shape for op in ops]
    if broadcast_shape(shapes) is None:
        return f"its values' shapes {sorted(set(shapes), key=str)} do not broadcast to one shape (one kernel grid)"
    program = Program(tuple(inputs), ops, tuple(ids[n] for n in outs), tuple(n.name for n in ids),
                      tuple(input_nodes), outs)
    why = row_kinds(program) if program.has_reduction else None
    return why if isinstance(why, str) else program


def _operands(node: fx.Node) -> tuple[list, dict] | str:
    """(operands, params) of a node with a rule, or why it has none."""
    rule = RULES.get(node.target) if node.op == "call_function" else None
    if rule is None:
        return "no pointwise rule"
    if len(node.args) < rule.arity:
        return f"{len(node.args)} args, the rule reads {rule.arity}"
    args = list(node.args[:rule.arity])
    for arg in args:
        if not isinstance(arg, fx.Node) and not (isinstance(arg, (int, float)) and not isinstance(arg, bool) and
                                                 math.isfinite(arg)):
            return f"operand {arg!r} is neither a tensor node nor a finite number"
    if not any(isinstance(a, fx.Node) for a in args):
        return "no tensor operand"
    params = rule.params(node)
    return params if isinstance(params, str) else (args, params)


def _value(node: fx.Node) -> Value | str:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "no tensor meta['val']"
    if val.dtype not in FLOAT_DTYPES:
        return f"dtype {val.dtype} (the rules take floating tensors)"
    return Value(str(val.dtype).removeprefix("torch."), tuple(s if isinstance(s, int) else str(s) for s in val.shape))


# ---------------------------------------------------------------- the ops as kernel source lines

_ROUND = {"float16": ".to(tl.float16).to(tl.float32)", "bfloat16": ".to(tl.bfloat16).to(tl.float32)",
          "float32": "", "float64": ""}


def operand(arg, names: bool = False) -> str:
    if isinstance(arg, str):
        return arg if names else f"v{arg[1:]}"
    return repr(float(arg))


def op_lines(program: Program) -> list[str]:
    """Per op a comment and one line computing it in fp32, rounded to its dtype (names v0, v1, ..)."""
    lines = []
    for k, op in enumerate(program.ops, start=len(program.inputs)):
        params = "".join(f", {key}={val!r}" for key, val in op.params.items())
        operands = ", ".join(operand(a, names=True) for a in op.args)
        lines.append(f"    # %{k} = {op.rule}({operands}{params}) -> {op.value.dtype}")
        expr = BY_NAME[op.rule].expression([operand(a) for a in op.args], op.params)
        rounding = _ROUND[op.value.dtype]
        lines.append(f"    v{k} = ({expr}){rounding}" if rounding else f"    v{k} = {expr}")
    return lines
