"""Regions for fuse/lower: what one kernel replaces, and the seeds that start each kind.

A seed looks at one adapter site's output node and returns the Region its kernel would
compute, or a string saying why this site does not have that form:

  lora_seed        y + s B(A x)               with y = x W^T (+ b)            -> lora_linear
  dora_seed        y + (g - 1)(y - b) + s g B(A x), g = m / ||W + s B A||_row  -> lora_linear,
                   epilogue "gain:g,bias" (the identity: the DoRA output is g (x W^T + s B A x) + b)
  vera_seed        y + ((x A^T) d) B^T b      (d, b trained vectors)           -> lora_linear, prologue
                                                                                  "vera_d:i,vera_b:j|"
  lora_xs_seed     y + s B(R(A x))            (R r x r between A and B)        -> lora_linear, prologue
                                                                                  "xs_r:i|"
  ia3_seed         y * l                      (l one value per output)         -> lora_linear without
                                                                                  LoRA, epilogue "gain:l"
  ia3_input_seed   linear(x * l)              (l one value per input feature)  -> lora_linear without
                                                                                  LoRA, prologue "x_gain:l|"
  bottleneck_seed  y + s U act(D src)         src = y (serial) or x (parallel) -> bottleneck
  mixed_lora_seed  MixedSite(plan, x, y)      a mixed graph's per-row LoRA     -> mixed_lora_linear
                   (y = x W^T (+ b); every route a plain LoRA of the site's bank; surgeon/serving.py)

Regions then grow an epilogue in fuse.py. Shapes come from `tensor_meta` (export's meta or the
parameter) and are compared with sympy where dims are symbolic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from surgeon.graph import get_tensor, module_path

aten = torch.ops.aten
BASE_OPS = (aten.linear.default, aten.addmm.default)
ACTIVATIONS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.gelu.default: "gelu"}


@dataclass
class Region:
    """Nodes one kernel can replace; for GEMM regions, the parts the kernel call needs."""

    name: str
    kind: str                                   # "lora_linear" | "bottleneck" | "elementwise" | "mixed_lora_linear"
    nodes: list[fx.Node]                        # graph order; `nodes[-1]` is the output
    adapter: str = ""
    parts: dict[str, Any] = field(default_factory=dict)   # lora_linear: x, weight, bias, lora_a, lora_b;
    weight_layout: str = "out_in"                         # bottleneck: source, residual, down, up, activation;
                                                          # elementwise: program (kernels/pointwise_program.py)
    scale: float = 1.0
    rank: int = 0
    steps: list[tuple[str, Any, fx.Node]] = field(default_factory=list)  # (rule, operand, graph node)
    stop: str = ""                              # why the epilogue ends where it does

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    def epilogue(self) -> tuple[str, list[fx.Node]]:
        """The custom op's epilogue string and its tensor operands, e.g. ("silu,mul:0", [up])."""
        vectors = [name for name in ("x_gain", "vera_d", "vera_b", "xs_r") if self.parts.get(name) is not None]
        operands: list[fx.Node] = [self.parts[name] for name in vectors]
        prologue = ",".join(f"{name}:{i}" for i, name in enumerate(vectors)) + "|" if vectors else ""
        texts = []
        for rule, operand, _ in self.steps:
            if isinstance(operand, fx.Node):
                if operand not in operands:
                    operands.append(operand)
                texts.append(f"{rule}:{operands.index(operand)}")
            else:
                texts.append(rule if operand is None else f"{rule}:{operand!r}")
        return prologue + ",".join(texts), operands

    def describe(self) -> str:
        if self.kind == "elementwise":
            outputs = self.parts["program"].output_nodes
            return (f"{self.name}: {len(self.nodes)} pointwise ops ({', '.join(n.name for n in self.nodes)}) -> "
                    f"{len(outputs)} output{'s' if len(outputs) > 1 else ''}")
        chain = [self.head()] + [f"{rule}({_operand_text(op)})" if op is not None else rule
                                 for rule, op, _ in self.steps]
        if "program" in self.parts:
            chain.append(f"program({len(self.parts['program'].ops)} pointwise ops)")
        if "view" in self.parts:
            chain.insert(1 + sum(order_of(n) < order_of(self.parts["view"]) for _, _, n in self.steps),
                         f"view({self.parts['view'].name})")
        return f"{self.name}: {' -> '.join(chain)} [{len(self.nodes)} nodes, r={self.rank}, s={self.scale:g}]"

    def head(self) -> str:
        """The region's core before its epilogue, e.g. `linear+bias+lora(chat)`."""
        if self.kind == "bottleneck":
            act = self.parts["activation"]
            return f"bottleneck({self.adapter}: up({act}(down)))" if act != "none" else \
                f"bottleneck({self.adapter}: up(down))"
        bias = "+bias" if self.parts.get("bias") is not None and not any(r == "bias" for r, _, _ in self.steps) \
            else ""
        branch = "vera" if self.parts.get("vera_d") is not None else \
            "lora-xs" if "xs_r" in self.parts else "lora"
        lora = f"+{branch}({self.adapter})" if self.parts.get("lora_a") is not None else ""
        if self.kind == "mixed_lora_linear":
            lora = f"+mixed_lora({self.adapter})"
        gain = "(x*gain)" if self.parts.get("x_gain") is not None else ""
        base = next(n for n in self.nodes if n.target in BASE_OPS)
        return f"{base.target.__name__.split('.')[0]}{gain}{bias}{lora}"


def order_of(node: fx.Node) -> int:
    """A node's position in its graph, counted from the start (for ordering a region's parts)."""
    position = 0
    while node.prev.op != "root":
        node, position = node.prev, position + 1
    return position


def _operand_text(operand: Any) -> str:
    return operand.name if isinstance(operand, fx.Node) else repr(operand)


def _one_user(*nodes: fx.Node) -> str:
    for node in nodes:
        if len(node.users) != 1:
            return f"{node.name}: used outside the adapter site ({len(node.users)} users)"
    return ""


def base_parts(gm: fx.GraphModule, base: fx.Node) -> "dict | str":
    """x, weight, bias and weight layout of a linear/addmm node, or why it is not a plain one."""
    if base.target not in BASE_OPS:
        return f"{base.name}: the site's base op is {getattr(base.target, '__name__', base.target)}, not a linear"
    if base.target is aten.addmm.default:
        if base.kwargs.get("beta", 1) != 1 or base.kwargs.get("alpha", 1) != 1:
            return f"{base.name}: addmm with beta/alpha != 1"
        return {"x": base.args[1], "weight": base.args[2], "bias": base.args[0], "layout": "in_out"}
    return {"x": base.args[0], "weight": base.args[1], "bias": base.args[2] if len(base.args) > 2 else None,
            "layout": "out_in"}


def lora_branch(node: Any) -> "tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None":
    """(x, A, down, up) when `node` is linear(linear(x, A), B) without biases."""
    if not _bias_free_linear(node) or not _bias_free_linear(node.args[0]):
        return None
    down = node.args[0]
    return down.args[0], down.args[1], down, node


def _bias_free_linear(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.target is aten.linear.default and \
        (len(node.args) == 2 or node.args[2] is None)


def _gemm_region(gm, name, nodes, adapter, parts, layout, scale, rank) -> "Region | str":
    tensors = [t for t in (parts["x"], parts["weight"], parts.get("lora_a"), parts.get("lora_b"), parts["bias"])
               if t is not None]
    metas = [tensor_meta(gm, t) for t in tensors]
    if any(m is None for m in metas) or len({m[1] for m in metas}) != 1:
        return f"{nodes[-1].name}: mixed or unknown dtypes {[None if m is None else str(m[1]) for m in metas]}"
    return Region(name, "lora_linear", nodes, adapter=adapter, weight_layout=layout, scale=scale, rank=rank,
                  parts={k: parts[k] for k in ("x", "weight", "bias")} |
                  {"lora_a": parts.get("lora_a"), "lora_b": parts.get("lora_b")})


def lora_seed(gm: fx.GraphModule, add: fx.Node) -> "Region | str":
    """The region `base + s * B(A x)` ending at an adapter's add, or why the add is not one."""
    if add.target is not aten.add.Tensor or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return "not an add of two tensors"
    base, up = add.args
    branch = lora_branch(up)
    parts = base_parts(gm, base)
    if branch is None or isinstance(parts, str):
        return "not base_op + linear(linear(x, A), B)"
    x, lora_a, down, _ = branch
    if x is not parts["x"]:
        return f"the LoRA branch reads '{x}' but the base op reads '{parts['x']}'"
    if why := _one_user(base, down, up):
        return why
    rank = tensor_meta(gm, lora_a)
    return _gemm_region(gm, f"lora_linear@{module_path(base)}", [base, down, up, add], add.meta["surgeon_adapter"],
                        {**parts, "lora_a": lora_a, "lora_b": up.args[1]}, parts["layout"],
                        float(add.kwargs.get("alpha", 1)), int(rank[0][0]) if rank else 0)


def dora_seed(gm: fx.GraphModule, out: fx.Node) -> "Region | str":
    """DoRA's `y + (g - 1)(y - b) + s g B(A x)` as g (x W^T + s B A x) + b, or why not that form."""
    def call(node, target, n_args=2):
        return isinstance(node, fx.Node) and node.target is target and len(node.args) == n_args

    if not (call(out, aten.add.Tensor) and call(out.args[0], aten.add.Tensor) and
            call(out.args[1], aten.mul.Tensor)):
        return "not DoRA's add(add(y, (g - 1) * base), g * lora)"
    first, gained = out.args
    y, rescaled = first.args
    gain, up = gained.args
    branch, parts = lora_branch(up), base_parts(gm, y)
    if branch is None or isinstance(parts, str) or not call(rescaled, aten.mul.Tensor):
        return "not DoRA's add(add(y, (g - 1) * base), g * linear(linear(x, A), B))"
    gain_minus_one, base = rescaled.args
    if not call(gain_minus_one, aten.sub.Tensor) or gain_minus_one.args != (gain, 1):
        return f"{rescaled.name}: not (g - 1) * base"
    bias = parts["bias"]
    nodes = [y]
    if bias is not None:
        if not call(base, aten.sub.Tensor) or base.args != (y, bias):
            return f"{rescaled.name}: scales '{base}', not y - bias"
        nodes.append(base)
    elif base is not y:
        return f"{rescaled.name}: scales '{base}', not y"
    x, lora_a, down, _ = branch
    if x is not parts["x"]:
        return f"the LoRA branch reads '{x}' but the base op reads '{parts['x']}'"
    if len(y.users) != 2:               # y feeds `first` and (y - b) or (g - 1) * y only
        return f"{y.name}: used outside the DoRA site ({len(y.users)} users)"
    if why := _one_user(*nodes[1:], down, up, gain_minus_one, rescaled, first, gained):
        return why
    if not row_vector(gm, gain, y):
        return f"{gain.name}: the DoRA gain is not one value per output"
    region = _gemm_region(gm, f"lora_linear@{module_path(y)}",
                          nodes + [down, up, gain_minus_one, rescaled, first, gained, out],
                          out.meta["surgeon_adapter"], {**parts, "lora_a": lora_a, "lora_b": up.args[1]},
                          parts["layout"], float(out.kwargs.get("alpha", 1)), int(tensor_meta(gm, lora_a)[0][0]))
    if isinstance(region, Region):
        region.steps = [("gain", gain, gained)] + ([("bias", None, first)] if bias is not None else [])
    return region


def ia3_seed(gm: fx.GraphModule, mul: fx.Node) -> "Region | str":
    """A linear whose output an adapter scales per output (IA3): the linear, to grow `gain` onto."""
    if mul.target is not aten.mul.Tensor or len(mul.args) != 2:
        return "not a per-output scale y * l"
    y = next((a for a in mul.args if isinstance(a, fx.Node) and a.target in BASE_OPS), None)
    other = mul.args[1] if y is mul.args[0] else mul.args[0]
    if y is None or not row_vector(gm, other, y):
        return "not a per-output scale y * l of a linear's output"
    parts = base_parts(gm, y)
    if isinstance(parts, str):
        return parts
    if why := _one_user(y):
        return why
    return _gemm_region(gm, f"lora_linear@{module_path(y)}", [y], mul.meta["surgeon_adapter"], parts,
                        parts["layout"], 1.0, 0)


def ia3_input_seed(gm: fx.GraphModule, mul: fx.Node) -> "Region | str":
    """x * l feeding a linear (IA3 on the input, l one value per input feature): x's columns scaled
    in the kernel's K loop (identity: (x * l) W^T computed from x tiles times l[k])."""
    if mul.target is not aten.mul.Tensor or len(mul.args) != 2 or len(mul.users) != 1:
        return "not an input scale x * l with one user"
    base = next(iter(mul.users))
    parts = base_parts(gm, base)
    if isinstance(parts, str) or parts["x"] is not mul:
        return "not an input scale x * l read by a linear as its input"
    x, gain = mul.args if isinstance(mul.args[0], fx.Node) and row_vector(gm, mul.args[1], mul) else mul.args[::-1]
    if not isinstance(x, fx.Node) or not row_vector(gm, gain, mul):
        return f"{mul.name}: l is not one value per input feature"
    # the linear is the region's output: several users only stop its epilogue (grow says why)
    region = _gemm_region(gm, f"lora_linear@{module_path(base)}", [mul, base], mul.meta["surgeon_adapter"],
                          {**parts, "x": x}, parts["layout"], 1.0, 0)
    if isinstance(region, Region):
        region.parts["x_gain"] = gain
    return region


def lora_xs_seed(gm: fx.GraphModule, add: fx.Node) -> "Region | str":
    """LoRA-XS's `y + s B(R(A x))` (R a small r x r matrix between the frozen A and B)."""
    if add.target is not aten.add.Tensor or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return "not an add of two tensors"
    base, up = add.args
    middle = up.args[0] if _bias_free_linear(up) else None
    down = middle.args[0] if _bias_free_linear(middle) else None
    parts = base_parts(gm, base)
    if not _bias_free_linear(down) or isinstance(parts, str):
        return "not base_op + linear(linear(linear(x, A), R), B)"
    if down.args[0] is not parts["x"]:
        return f"the LoRA-XS branch reads '{down.args[0]}' but the base op reads '{parts['x']}'"
    if why := _one_user(base, down, middle, up):
        return why
    rank = tensor_meta(gm, down.args[1])
    region = _gemm_region(gm, f"lora_linear@{module_path(base)}", [base, down, middle, up, add],
                          add.meta["surgeon_adapter"], {**parts, "lora_a": down.args[1], "lora_b": up.args[1]},
                          parts["layout"], float(add.kwargs.get("alpha", 1)), int(rank[0][0]) if rank else 0)
    if isinstance(region, Region):
        region.parts["xs_r"] = middle.args[1]
    return region


def vera_seed(gm: fx.GraphModule, add: fx.Node) -> "Region | str":
    """VeRA's `y + ((x A^T) * d) B^T * b` (A, B shared and frozen, d and b trained vectors)."""
    def mul_by_vector(node: Any) -> "tuple[fx.Node, fx.Node] | None":
        if not isinstance(node, fx.Node) or node.target is not aten.mul.Tensor or len(node.args) != 2:
            return None
        value, vector = node.args
        return (value, vector) if isinstance(value, fx.Node) and row_vector(gm, vector, value) else None

    if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return "not y + (...) * b"
    base, scaled_up = add.args
    outer = mul_by_vector(scaled_up)
    up = outer and outer[0]
    inner = mul_by_vector(up.args[0]) if _bias_free_linear(up) else None
    down = inner and inner[0]
    parts = base_parts(gm, base) if isinstance(base, fx.Node) else "no base op"
    if not inner or not _bias_free_linear(down) or isinstance(parts, str):
        return "not y + linear(linear(x, A) * d, B) * b"
    if down.args[0] is not parts["x"]:
        return f"the VeRA branch reads '{down.args[0]}' but the base op reads '{parts['x']}'"
    if why := _one_user(base, down, up.args[0], up, scaled_up):
        return why
    rank = tensor_meta(gm, down.args[1])
    region = _gemm_region(gm, f"lora_linear@{module_path(base)}", [base, down, up.args[0], up, scaled_up, add],
                          add.meta["surgeon_adapter"], {**parts, "lora_a": down.args[1], "lora_b": up.args[1]},
                          parts["layout"], 1.0, int(rank[0][0]) if rank else 0)
    if isinstance(region, Region):
        region.parts.update(vera_d=inner[1], vera_b=outer[1])
    return region


def bottleneck_seed(gm: fx.GraphModule, add: fx.Node) -> "Region | str":
    """`y + s U act(D src)` (bottleneck: src is y; parallel adapter: src is the layer input)."""
    if add.target is not aten.add.Tensor or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return "not an add of two tensors"
    residual, up = add.args
    if not _bias_free_linear(up) or not isinstance(up.args[0], fx.Node):
        return "not y + linear(act(linear(src, D)), U)"
    hidden = up.args[0]
    act = ACTIVATIONS.get(hidden.target, "none")
    if act == "gelu" and (hidden.kwargs.get("approximate", "none") == "tanh" or hidden.args[1:] == ("tanh",)):
        act = "gelu_tanh"
    down = hidden.args[0] if act != "none" else hidden
    if not _bias_free_linear(down):
        return "not y + linear(act(linear(src, D)), U)"
    inner = [down, up] if act == "none" else [down, hidden, up]
    if why := _one_user(*inner):
        return why
    source = down.args[0]
    metas = [tensor_meta(gm, t) for t in (source, residual, down.args[1], up.args[1])]
    if any(m is None for m in metas) or len({m[1] for m in metas}) != 1:
        return f"{add.name}: mixed or unknown dtypes {[None if m is None else str(m[1]) for m in metas]}"
    return Region(f"bottleneck@{module_path(add)}", "bottleneck", inner + [add], adapter=add.meta["surgeon_adapter"],
                  parts={"source": source, "residual": residual, "down": down.args[1], "up": up.args[1],
                         "activation": act},
                  scale=float(add.kwargs.get("alpha", 1)), rank=int(metas[2][0][0]))


def mixed_site(gm: fx.GraphModule, node: Any):
    """The MixedSite an output-side call_module node of a mixed graph runs (surgeon/serving.py), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.args) != 3:
        return None
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        return None
    return module if getattr(module, "mixed_site", False) and module.side == "output" else None


def plain_lora_routes(site, dims: tuple) -> str:
    """"" when every route of a MixedSite is a plain LoRA on (in, out) = dims (what the mixed kernels take)."""
    for name, kind, opts, _, params in site.routes:
        a, b = params.get("lora_A"), params.get("lora_B")
        if kind.name != "lora" or set(params) != {"lora_A", "lora_B"} or "experts" in opts or \
                opts.get("groups", 1) != 1 or a.dim() != 2 or b.dim() != 2 or \
                tuple(a.shape[1:]) != dims[:1] or tuple(b.shape) != (dims[1], a.shape[0]):
            return (f"route '{name}' ({kind.name}) is not a plain LoRA A [r, {dims[0]}], B [{dims[1]}, r] "
                    "(the mixed kernels take only those; the site stays the graph's)")
    return ""


def mixed_lora_seed(gm: fx.GraphModule, node: fx.Node) -> "Region | str":
    """A mixed graph's `MixedSite(plan, x, y)` over y = linear(x, W, b) (or addmm): the base GEMM and each row's
    LoRA update from the site's bank, one region (kind mixed_lora_linear; kernels/mixed_lora_region.py)."""
    site = mixed_site(gm, node)
    if site is None:
        return "not a mixed-batch output site"
    plan, x, base = node.args
    parts = base_parts(gm, base) if isinstance(base, fx.Node) else "the site's y is not a node"
    if isinstance(parts, str):
        return parts
    if parts["x"] is not x:
        return f"the site reads '{x}' but the base op reads '{parts['x']}'"
    if why := _one_user(base):
        return why
    weight = tensor_meta(gm, parts["weight"])
    if weight is None:
        return f"{base.name}: the weight's shape is unknown"
    dims = tuple(int(d) for d in (weight[0][::-1] if parts["layout"] == "out_in" else weight[0]))
    if why := plain_lora_routes(site, dims):
        return why
    metas = [tensor_meta(gm, t) for t in (x, parts["weight"], parts["bias"]) if t is not None]
    if any(m is None for m in metas) or len({m[1] for m in metas}) != 1:
        return f"{node.name}: mixed or unknown dtypes {[None if m is None else str(m[1]) for m in metas]}"
    names = [route[0] for route in site.routes]
    return Region(f"mixed_lora_linear@{module_path(base)}", "mixed_lora_linear", [base, node],
                  adapter=",".join(names), weight_layout=parts["layout"],
                  rank=max(int(r[4]["lora_A"].shape[0]) for r in site.routes),
                  parts={"x": x, "weight": parts["weight"], "bias": parts["bias"], "plan": plan, "site": node.target})


SEEDS = (("lora", lora_seed), ("dora", dora_seed), ("vera", vera_seed), ("lora-xs", lora_xs_seed),
         ("ia3", ia3_seed), ("ia3-input", ia3_input_seed), ("bottleneck", bottleneck_seed))


def seed(gm: fx.GraphModule, node: fx.Node) -> "Region | str":
    """The region an adapter site's output starts, or why none of the seeds applies."""
    if node.op == "call_module":
        found = mixed_lora_seed(gm, node)
        return found if isinstance(found, Region) else f"{node.name}: mixed-lora: {found}"
    reasons = []
    for name, make in SEEDS:
        found = make(gm, node)
        if isinstance(found, Region):
            return found
        reasons.append(f"{name}: {found}")
    return f"{node.name}: " + "; ".join(reasons)


# ---------------------------------------------------------------- shapes


def tensor_meta(gm: fx.GraphModule, node: Any) -> tuple[tuple, torch.dtype] | None:
    """(shape, dtype) of a node's value: from export's meta, a parameter, or the adapter ops' rules."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape), val.dtype
    if node.op == "get_attr":
        tensor = get_tensor(gm, node.target)
        return tuple(tensor.shape), tensor.dtype
    if mixed_site(gm, node) is not None:
        return tensor_meta(gm, node.args[2])    # a mixed site's output keeps y's shape
    if node.meta.get("surgeon_adapter") and node.target in (aten.add.Tensor, aten.mul.Tensor):
        return tensor_meta(gm, node.args[0])    # an adapter's output (no meta of its own) keeps y's shape
    if node.target is aten.linear.default:
        x, w = tensor_meta(gm, node.args[0]), tensor_meta(gm, node.args[1])
        return None if x is None or w is None else ((*x[0][:-1], w[0][0]), x[1])
    return None


def same_meta(a, b) -> bool:
    """Same dtype and the same shape, comparing symbolic dims as sympy expressions."""
    if a is None or b is None or a[1] != b[1] or len(a[0]) != len(b[0]):
        return False
    return all(sympy.simplify(_expr(p) - _expr(q)) == 0 for p, q in zip(a[0], b[0]))


def row_vector(gm: fx.GraphModule, operand: Any, output: fx.Node) -> bool:
    """Whether `operand` is one value per output feature of `output` (shape (N,), same dtype)."""
    a, b = tensor_meta(gm, operand), tensor_meta(gm, output)
    return a is not None and b is not None and len(b[0]) >= 1 and same_meta(a, ((b[0][-1],), b[1]))


def _expr(dim) -> sympy.Expr:
    return dim.node.expr if isinstance(dim, torch.SymInt) else sympy.Integer(int(dim))
