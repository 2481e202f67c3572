"""Transfer rules of the coupled-group analysis: one small entry per canonical op.

A rule reads its inputs' axis labels (space.Label, FIXED, BCAST) through a Flow and
returns the output's labels (a tuple per tensor, a list of tuples for split). `flow.join(a, b)`
states "these two axes carry one permutation" - the identity every rule relies on is
`f(P x) == P f(x)` for the permutation P along the joined axes. An op without a rule makes every
channel axis that reaches it ineligible, naming the op (see infer.default_rule).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .reshape import reshape
from .space import BCAST, FIXED, Label

aten = torch.ops.aten
Rule = Callable[[Any, Any], Any]


def _arg(node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


_SUMS = (aten.add.Tensor, aten.sub.Tensor, operator.add, operator.sub, torch.add, torch.sub)


# f(P x) == P f(x) for any function applied elementwise
def unary(flow, node):
    return flow.labels(node.args[0])


def broadcast(flow, node, inputs=None):
    """Elementwise over several tensors with numpy broadcasting: aligned axes carry one permutation."""
    tensors = [a for a in (inputs if inputs is not None else node.args) if flow.labels(a) is not None]
    out_rank = len(flow.shape(node))
    out = []
    for axis in range(out_rank):
        label, roots = BCAST, set()
        for arg in tensors:
            labels, shape = flow.labels(arg), flow.shape(arg)
            k = axis - (out_rank - len(labels))
            if k < 0 or shape[k] == 1:
                continue
            if isinstance(labels[k], Label) and labels[k].rep == 1 and not flow.param_like(arg):
                roots.add(flow.spaces.find(labels[k].space))
            label = flow.join(label, labels[k], node, "elementwise operands")
        if len(roots) > 1 and node.target in _SUMS and \
                not node.meta.get("surgeon_adapter") and isinstance(label, Label):
            flow.spaces.mark_residual(label.space, f"residual add at {flow.where(node)}")
        out.append(label)
    return tuple(out)


def where(flow, node):
    return broadcast(flow, node, node.args[:3])


def like(flow, node):
    """zeros_like / new_ones ...: constant values, so nothing depends on channel order."""
    return tuple(BCAST for _ in flow.shape(node))


def fixed(flow, node):
    return tuple(FIXED if n != 1 else BCAST for n in flow.shape(node))


def no_tensor(flow, node):
    return None


# sum_i x[P i] == sum_i x[i]: reducing over a channel axis is order-free
def reduce(flow, node):
    labels = flow.labels(node.args[0])
    dims = _arg(node, 1, "dim")
    keep = bool(_arg(node, 2, "keepdim", False))
    if node.target in (aten.linalg_vector_norm.default,):
        dims, keep = _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False))
    if node.target in (aten.var.correction, aten.std.correction):
        keep = bool(node.kwargs.get("keepdim", False))
    if dims is None or dims == [] or node.target in (aten.mean.default, aten.sum.default):
        dims = list(range(len(labels)))
    dims = {_dim(d, len(labels)) for d in ([dims] if isinstance(dims, int) else dims)}
    return tuple(BCAST if i in dims else l for i, l in enumerate(labels) if keep or i not in dims)


def transpose(flow, node):
    labels = list(flow.labels(node.args[0]))
    if node.target is aten.t.default:
        return tuple(reversed(labels))
    a, b = (_dim(d, len(labels)) for d in node.args[1:3])
    labels[a], labels[b] = labels[b], labels[a]
    return tuple(labels)


def permute(flow, node):
    labels = flow.labels(node.args[0])
    return tuple(labels[_dim(d, len(labels))] for d in node.args[1])


def unsqueeze(flow, node):
    labels = list(flow.labels(node.args[0]))
    labels.insert(_dim(node.args[1], len(labels) + 1), BCAST)
    return tuple(labels)


def squeeze(flow, node):
    labels, shape = flow.labels(node.args[0]), flow.shape(node.args[0])
    dims = _arg(node, 1, "dim")
    dims = range(len(labels)) if dims is None else ([dims] if isinstance(dims, int) else dims)
    drop = {_dim(d, len(labels)) for d in dims if shape[_dim(d, len(labels))] == 1}
    return tuple(l for i, l in enumerate(labels) if i not in drop)


def expand(flow, node):
    labels, shape, out = flow.labels(node.args[0]), flow.shape(node.args[0]), flow.shape(node)
    lead = len(out) - len(labels)
    result = [BCAST] * lead
    for i, label in enumerate(labels):
        result.append(BCAST if shape[i] == 1 else label)
    return tuple(result)


# repeat_interleave(x, r, dim): out[m] == x[m // r], the k/v heads of grouped-query attention
def repeat_interleave(flow, node):
    labels = list(flow.labels(node.args[0]))
    repeats, dim = node.args[1], _dim(_arg(node, 2, "dim"), len(labels))
    label = labels[dim]
    if isinstance(label, Label) and isinstance(repeats, int):
        labels[dim] = Label(label.space, label.unit, label.rep * repeats)
    elif isinstance(label, Label):
        flow.poison(label, node, "repeat_interleave with per-index repeats")
        labels[dim] = FIXED
    return tuple(labels)


def slice_(flow, node):
    labels, shape = list(flow.labels(node.args[0])), flow.shape(node.args[0])
    dim = _dim(_arg(node, 1, "dim", 0), len(labels))
    start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    start, end, _ = slice(start, end).indices(shape[dim])
    labels[dim] = flow.narrow(labels[dim], start, end, node, step)
    return tuple(labels)


def split(flow, node):
    labels, shape = flow.labels(node.args[0]), flow.shape(node.args[0])
    dim = _dim(_arg(node, 2, "dim", 0), len(labels))
    sizes = node.args[1]
    if node.target is aten.chunk.default:          # chunk(x, n): pieces of ceil(size / n)
        sizes = -(-shape[dim] // sizes)
    if isinstance(sizes, int):
        sizes = [min(sizes, shape[dim] - s) for s in range(0, shape[dim], sizes)]
    outs, start = [], 0
    for size in sizes:
        piece = list(labels)
        piece[dim] = flow.narrow(labels[dim], start, start + size, node)
        outs.append(tuple(piece))
        start += size
    return outs


def getitem(flow, node):
    source = flow.env.get(node.args[0])
    return source[node.args[1]] if isinstance(source, list) else None


def cat(flow, node):
    tensors = [t for t in node.args[0] if flow.labels(t) is not None and flow.shape(t) != (0,)]
    rank = len(flow.shape(node))
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    out = []
    for axis in range(rank):
        if axis != dim:
            label = BCAST
            for t in tensors:
                label = flow.join(label, flow.labels(t)[axis], node, "concatenated tensors")
            out.append(label)
            continue
        pieces = [flow.labels(t)[axis] for t in tensors]
        out.append(flow.concat(pieces, node))
    return tuple(out)


def select(flow, node):
    labels = list(flow.labels(node.args[0]))
    dim = _dim(node.args[1], len(labels))
    flow.poison(labels[dim], node, "picks single positions along a channel axis")
    del labels[dim]
    return tuple(labels)


def index_select(flow, node):
    labels = list(flow.labels(node.args[0]))
    dim = _dim(node.args[1], len(labels))
    flow.poison(labels[dim], node, "gathers along a channel axis by index")
    labels[dim] = FIXED
    return tuple(labels)


# (W[P] rows gathered by token id): the id values would have to change, so rows stay
def embedding(flow, node):
    weight, ids = flow.labels(node.args[0]), flow.labels(node.args[1])
    flow.poison(weight[0], node, "embedding rows are gathered by index")
    flow.role(node.args[0], 0, "rows")
    flow.role(node.args[0], 1, "out")
    return tuple(ids) + (weight[1],)


# (x P^T)(P W^T) == x W^T: a consumer's input columns move with its input's channels
def linear(flow, node):
    x, weight, bias = flow.labels(node.args[0]), flow.labels(node.args[1]), flow.labels(_arg(node, 2, "bias"))
    flow.join(x[-1], weight[1], node, "linear input")
    flow.role(node.args[1], 1, "in")
    flow.role(node.args[1], 0, "out")
    out = weight[0]
    if bias is not None:
        out = flow.join(out, bias[-1], node, "linear bias")
        flow.role(_arg(node, 2, "bias"), 0, "bias")
    return tuple(x[:-1]) + (out,)


def addmm(flow, node):
    bias, x, weight = (flow.labels(a) for a in node.args[:3])
    flow.join(x[1], weight[0], node, "addmm input")
    flow.role(node.args[2], 0, "in")
    flow.role(node.args[2], 1, "out")
    rows, cols = x[0], weight[1]
    if bias is not None:
        cols = flow.join(cols, bias[-1], node, "addmm bias")
        flow.role(node.args[0], len(bias) - 1, "bias")
        if len(bias) == 2:
            rows = flow.join(rows, bias[0], node, "addmm bias rows")
    return (rows, cols)


def matmul(flow, node):
    a, b = flow.labels(node.args[0]), flow.labels(node.args[1])
    if len(a) < 2 or len(b) < 2:
        return flow.default(node)
    flow.join(a[-1], b[-2], node, "contracted axis")
    if len(b) == 2 and node.args[1].op == "get_attr":
        flow.role(node.args[1], 0, "in")
        flow.role(node.args[1], 1, "out")
    batch = len(flow.shape(node)) - 2
    lead = broadcast_batch(flow, node, [(node.args[0], a[:-2]), (node.args[1], b[:-2])], batch)
    return lead + (a[-2], b[-1])


def broadcast_batch(flow, node, pairs, rank: int) -> tuple:
    out = []
    for axis in range(rank):
        label = BCAST
        for arg, labels in pairs:
            k = axis - (rank - len(labels))
            if k >= 0 and flow.shape(arg)[k] != 1:
                label = flow.join(label, labels[k], node, "batch axes")
        out.append(label)
    return tuple(out)


def conv(flow, node):
    """conv1d / conv2d / conv3d: channel axis 1 of x and W[1] are joined; W[0] is the output channel axis."""
    x, weight, bias = flow.labels(node.args[0]), flow.labels(node.args[1]), flow.labels(_arg(node, 2, "bias"))
    groups, w_shape = _arg(node, 6, "groups", 1), flow.shape(node.args[1])
    window = range(2, len(weight))
    for axis in window:
        flow.poison(weight[axis], node, "conv kernel window axis")
    if groups == 1:
        flow.join(x[1], weight[1], node, "conv input channels")
        flow.role(node.args[1], 1, "in")
        out = weight[0]
    elif w_shape[1] == 1 and groups == w_shape[0] == flow.shape(node.args[0])[1]:
        out = flow.join(x[1], weight[0], node, "depthwise conv channels")
    else:
        flow.poison(x[1], node, f"grouped conv (groups={groups})")
        flow.poison(weight[0], node, f"grouped conv (groups={groups})")
        out = FIXED
    flow.role(node.args[1], 0, "out")
    if bias is not None:
        out = flow.join(out, bias[0], node, "conv bias")
        flow.role(_arg(node, 2, "bias"), 0, "bias")
    for axis in window:
        flow.join(x[axis], FIXED, node, "conv spatial axis")
    return (x[0], out) + tuple(FIXED for _ in window)


# pooling acts on each channel separately: pool(P x) == P pool(x) along the channel axis
def pool(flow, node):
    x = flow.labels(node.args[0])
    for axis in range(2, len(x)):
        flow.join(x[axis], FIXED, node, "pooled spatial axis")
    return tuple(x[:2]) + tuple(FIXED if n != 1 else BCAST for n in flow.shape(node)[2:])


# per-channel affine and statistics: s[P] * x[P] + t[P] == P (s x + t)
def batch_norm(flow, node):
    x = flow.labels(node.args[0])
    for index, role in ((1, "affine"), (2, "affine"), (3, "stat"), (4, "stat")):
        vector = flow.labels(node.args[index]) if len(node.args) > index else None
        if vector is not None:
            flow.join(x[1], vector[0], node, "batch_norm channel")
            flow.role(node.args[index], 0, role)
    return x


def layer_norm(flow, node):
    x, shape = flow.labels(node.args[0]), node.args[1]
    refs = (node.args[2:4] if node.target is aten.layer_norm.default else node.args[2:3])
    for ref in refs:
        vector = flow.labels(ref)
        if vector is None:
            continue
        for i in range(len(shape)):
            flow.join(x[len(x) - len(shape) + i], vector[i], node, "norm affine")
            flow.role(ref, i, "affine")
    return x


def sdpa(flow, node):
    q, k, v = (flow.labels(a) for a in node.args[:3])
    heads_q, heads_k = flow.shape(node.args[0])[-3], flow.shape(node.args[1])[-3]
    lk, lv = k[-3], v[-3]
    if heads_k != heads_q and bool(node.kwargs.get("enable_gqa", False)):
        rep = heads_q // heads_k
        lk, lv = (Label(l.space, l.unit, l.rep * rep) if isinstance(l, Label) else l for l in (lk, lv))
    head = flow.join(q[-3], lk, node, "attention heads (q, k)")
    head = flow.join(head, lv, node, "attention heads (q, v)")
    flow.join(q[-1], k[-1], node, "attention q.k contraction")
    flow.join(k[-2], v[-2], node, "attention key positions")
    mask = flow.labels(_arg(node, 3, "attn_mask"))
    if mask is not None and len(mask) >= 3 and flow.shape(_arg(node, 3, "attn_mask"))[-3] != 1:
        head = flow.join(head, mask[-3], node, "attention mask heads")
    batch = broadcast_batch(flow, node, [(node.args[0], q[:-3]), (node.args[1], k[:-3])], len(q) - 3)
    return batch + (head, q[-2], v[-1])


UNARY_OPS = ("alias", "clone", "contiguous", "detach", "dropout", "lift_fresh_copy", "to", "_to_copy",
             "relu", "gelu", "silu", "sigmoid", "tanh", "neg", "exp", "log", "cos", "sin", "rsqrt", "sqrt", "abs",
             "erf", "reciprocal", "square", "hardtanh", "leaky_relu", "softplus", "elu", "hardswish", "mish",
             "softmax", "_softmax", "log_softmax", "_log_softmax",
             "type_as", "native_dropout_backward", "relu6", "hardsigmoid", "logit", "sign")
BINARY_OPS = ("add", "sub", "mul", "div", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
              "__and__", "__or__", "masked_fill", "rsub", "pow", "atan2", "bitwise_and", "bitwise_or",
              "clamp", "clamp_min", "clamp_max")       # (clamp's bounds may be tensors)
REDUCE_OPS = ("mean", "sum", "amax", "amin", "var", "std", "linalg_vector_norm", "logsumexp", "prod")
LIKE_OPS = ("zeros_like", "ones_like", "full_like", "empty_like", "new_ones", "new_zeros", "new_full",
            "new_empty", "zeros", "ones", "full", "scalar_tensor")


# torch-level functions the torch.fx front end leaves in the graph (same argument order as aten)
TORCH_UNARY = (torch.relu, F.relu, F.gelu, F.silu, torch.tanh, torch.sigmoid, torch.neg, torch.exp, F.dropout)
TORCH_BINARY = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul)


def _by_packet(names, rule) -> dict:
    return {getattr(aten, name): rule for name in names if hasattr(aten, name)}


def rule_table() -> dict:
    """Op packet (aten.linear) or callable (operator.getitem) -> transfer rule."""
    table = {**_by_packet(UNARY_OPS, unary), **_by_packet(BINARY_OPS, broadcast),
             **_by_packet(REDUCE_OPS, reduce), **_by_packet(LIKE_OPS, like)}
    table.update({fn: unary for fn in TORCH_UNARY} | {fn: broadcast for fn in TORCH_BINARY})
    table.update({
        aten.where: where, aten.arange: fixed, aten.sym_size: no_tensor, aten.sym_numel: no_tensor,
        aten.transpose: transpose, aten.t: transpose, aten.permute: permute,
        aten.unsqueeze: unsqueeze, aten.squeeze: squeeze, aten.expand: expand,
        aten.repeat_interleave: repeat_interleave, aten.slice: slice_, aten.split: split,
        aten.split_with_sizes: split, aten.chunk: split, aten.cat: cat, aten.select: select, aten.index_select: index_select,
        aten.embedding: embedding, aten.linear: linear, aten.addmm: addmm, aten.mm: matmul,
        aten.bmm: matmul, aten.matmul: matmul, aten.conv1d: conv, aten.conv2d: conv, aten.conv3d: conv,
        aten.max_pool2d: pool, aten.avg_pool2d: pool, aten.adaptive_avg_pool2d: pool, aten.max_pool1d: pool,
        aten.avg_pool1d: pool, aten.adaptive_avg_pool1d: pool, aten.batch_norm: batch_norm,
        aten.layer_norm: layer_norm, aten.rms_norm: layer_norm, aten.scaled_dot_product_attention: sdpa,
        operator.getitem: getitem,
    })
    for packet in (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten):
        table[packet] = reshape           # the rule reads only the input and output shapes
    return table
