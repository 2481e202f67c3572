"""X-LoRA (Buehler & Buehler 2024, PEFT's XLoraModel): a mixture of LoRA experts, mixed per token by a classifier
that reads the model's own hidden state.

`n_experts` LoRA experts sit on the same linear sites. Number the sites l = 0 .. L-1 in module order (the order the
model registers their weights, PEFT's layer numbers). Every site computes

    y = W x + Σ_i s_l[b, t, i] g c_i B_i A_i x          (x scaled per token before A, as PEFT does)

with c_i expert i's LoRA scale (alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA), g `global_scaling_weight`, and
the scalings s from a first "scaling pass": the whole model runs once with every scaling set to
`scaling_pass_value` (0: with bias-free experts that is the base model), its hidden state h at the readout (the
input of the linear that makes the model's first output, the LM head: transformers' `hidden_states[-1]`; the
first output itself for a model without such a head) goes through the classifier MLP, without gradient into h
(PEFT runs the pass under no_grad):

    z = Lin_d(.. ReLU(Lin_1(h)) ..)       xlora_depth layers, xlora_size wide, dropout xlora_dropout_p after each
                                          ReLU in train mode; the last outputs E (E L with layerwise_scalings)
    s = softmax(z / softmax_temperature)  over the experts, when enable_softmax; one row for every site unless
                                          layerwise_scalings (then row l for site l)

and per site the optional `top_k_lora` mask (the k largest scalings kept, the rest 0) and, with
`enable_softmax_topk`, a softmax over the kept ones. The scaling pass lives in the graph as this adapter's own
nodes: the first site's forward copies the base graph's nodes between that site and the readout (the nodes
before the first site compute the same values in both passes and are shared), stamped as this adapter's so
no later insert sees them as sites and a detach erases them; every site's update reads the one scalings node.
With scaling_pass_value v != 0 each site also adds its experts, weighted by v through its top-k mask and
softmax as PEFT weighs them, to its own copy in the scaling pass (the first site as it copies; a later one
points the copy's readers at the sum, which its detach points back).
Sites detach in reverse order (passes.remove / activate), so the first site, which owns the scaling pass, goes
last. The scaling pass is the base graph as it was at insertion: an adapter inserted later on an op at or after the
first X-LoRA site changes the real pass only (one before it changes both: the passes share those nodes), and one
inserted before X-LoRA, whose nodes the pass would have to copy, is refused with what to do.

The experts are frozen (PEFT's default) unless `use_trainable_adapters`; the classifier trains. Its weights are
model-level: one copy that every site reads (shared_trained), counted and saved once. A fresh insert draws each
expert's A kaiming-uniform and B = 0, so the insert is the identity bit for bit whatever the classifier says.
A loaded adapter may give each site its own expert ranks and scales (`expert_ranks`, 0 for an expert absent at
that site, which keeps its index as in PEFT, and `expert_scales`) and each expert its lora_dropout
(`expert_dropout`, on the scaled input in train mode, as PEFT's). PEFT folders: surgeon.adapters.xlora_peft.

No weight holds a per-token mix of experts: merge is refused, and so is a mixed batch by adapter name. Generate
recomputes the whole sequence for each new token (the classifier reads every position's hidden state anew), which
is PEFT's generate with use_cache=False.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from . import AdapterKind, Branch, EagerBranch, Option
from ..graph import get_attr
from .lora import kaiming_uniform

aten = torch.ops.aten
SCALINGS = "xlora_scalings"   # meta key of the node holding an adapter's scalings: the adapter's name
COPY_OF = "xlora_copy_of"     # meta key of a scaling-pass node: the name of the base node it copies
ACTIVE = ("inserted", "lowered", "quantized")
REFUSE_MERGE = ("X-LoRA mixes its experts per token with scalings a classifier computes from the model's own "
                "hidden state on each call, so no one weight holds the adapter")


def recomputing(ctx) -> list[str]:
    """The names of the context's active X-LoRA adapters (generate recomputes the whole sequence for them)."""
    return [name for name, state in ctx.adapters.items() if state.spec.type == "xlora" and state.status in ACTIVE]


def expert_ranks(opts: dict) -> list[int]:
    """Each expert's rank at a site (0: the expert is absent there)."""
    ranks = opts.get("expert_ranks") or [opts["rank"]] * opts["n_experts"]
    if len(ranks) != opts["n_experts"]:
        raise ValueError(f"xlora: expert_ranks {ranks} gives {len(ranks)} ranks for n_experts={opts['n_experts']}")
    return [int(r) for r in ranks]


def expert_scales(opts: dict) -> list[float]:
    """Each expert's LoRA scale c_i at a site (PEFT's `scaling[adapter]`)."""
    if opts.get("expert_scales"):
        return [float(c) for c in opts["expert_scales"]]
    alpha = opts["alpha"] if opts["alpha"] is not None else opts["rank"]
    return [alpha / (math.sqrt(r) if opts["use_rslora"] else r) if r else 0.0 for r in expert_ranks(opts)]


def factor_names(i: int, opts: dict) -> tuple[str, str]:
    """Expert i's (A, B) parameter names: frozen experts are `lora_A_i`, trained ones (use_trainable_adapters)
    `trained_lora_A_i`, so whether they take gradients is in the name."""
    prefix = "trained_" if opts.get("use_trainable_adapters") else ""
    return f"{prefix}lora_A_{i}", f"{prefix}lora_B_{i}"


def classifier_shapes(opts: dict) -> list[tuple[int, int]]:
    """(out, in) of each classifier layer: hidden -> size ... -> E (E L with layerwise_scalings)."""
    classes = opts["n_experts"] * (opts["n_layers"] if opts["layerwise_scalings"] else 1)
    widths = [opts["hidden"]] + [opts["xlora_size"]] * (opts["xlora_depth"] - 1) + [classes]
    return [(widths[k + 1], widths[k]) for k in range(opts["xlora_depth"])]


def _init(opts, in_features, out_features, dtype, gen, weight):
    tensors = {}
    for i, rank in enumerate(expert_ranks(opts)):
        if rank:
            A, B = factor_names(i, opts)
            tensors[A] = kaiming_uniform((rank, in_features), gen).to(dtype)
            tensors[B] = torch.zeros(out_features, rank, dtype=dtype)
    for k, (rows, cols) in enumerate(classifier_shapes(opts)):   # nn.Linear's default init, as PEFT's classifier
        bound = 1.0 / math.sqrt(cols)
        tensors[f"classifier_{k}_weight"] = kaiming_uniform((rows, cols), gen).to(dtype)
        tensors[f"classifier_{k}_bias"] = torch.empty(rows).uniform_(-bound, bound, generator=gen).to(dtype)
    return tensors


def _layout(opts: dict, sites: list[tuple[str, int, int]]) -> list[dict]:
    """Site l's layer number and the layer count, in module order (PEFT's numbering of the LoRA layers)."""
    return [{"layer": index, "n_layers": len(sites)} for index in range(len(sites))]


def readout(graph: fx.Graph) -> fx.Node:
    """The hidden state the classifier reads: the input of the linear that makes the first graph output (an LM
    head), or the first output itself when no linear makes it."""
    outputs = _flat_nodes(graph.output_node().args)
    if not outputs:
        raise ValueError("xlora: the model returns no tensor for the classifier to read a hidden state from")
    first = outputs[0]
    return first.args[0] if first.op == "call_function" and first.target is aten.linear.default else first


def _flat_nodes(args) -> list[fx.Node]:
    """The nodes in a (nested) argument structure, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _site_options(gm, path, weight_target, opts):
    """The readout's width (the classifier's input features), read from the graph."""
    value = readout(gm.graph).meta.get("val")
    if value is None:
        raise ValueError("xlora: the hidden state the classifier reads has no recorded shape in the graph")
    return {"hidden": int(value.shape[-1])}


def scalings_node(branch: Branch, call: fx.Node, params: dict[str, fx.Node], opts: dict) -> fx.Node:
    """The adapter's scalings node (batch, seq, E; batch, seq, L, E with layerwise_scalings): found in the graph
    (a later site, which then adds its experts to its copy in the scaling pass), or built at the insertion point
    by the first site's forward (the scaling pass, its own experts in it, and the classifier)."""
    for node in branch.graph.nodes:
        if node.meta.get(SCALINGS) == branch.adapter:
            _scaling_pass_update(branch, call, params, opts)
            return node
    hidden = _scaling_pass(branch, call, params, opts)
    logits = branch.op(aten.detach.default, hidden)   # no gradient into h, as PEFT's no_grad
    depth = opts["xlora_depth"]
    for k in range(depth):
        logits = branch.op(aten.linear.default, logits, params[f"classifier_{k}_weight"],
                           params[f"classifier_{k}_bias"])
        if k < depth - 1:
            logits = branch.dropout(branch.op(aten.relu.default, logits), opts["xlora_dropout_p"])
    if opts["layerwise_scalings"]:   # E L logits per token -> L x E; otherwise one row every site reads
        logits = branch.op(aten.unflatten.int, logits, -1, [opts["n_layers"], opts["n_experts"]])
    if opts["enable_softmax"]:
        logits = branch.op(aten.softmax.int, branch.op(aten.div.Tensor, logits, opts["softmax_temperature"]), -1)
    logits.meta[SCALINGS] = branch.adapter
    return logits


def _scaling_pass(branch: Branch, call: fx.Node, params: dict[str, fx.Node], opts: dict) -> fx.Node:
    """Copies of the base nodes from the first site's call to the readout, in graph order at the insertion point,
    stamped as the adapter's; returns the copy of the readout (the readout itself when it comes before the call).
    Nodes before the call compute the same values in both passes and are read as they are; with
    scaling_pass_value != 0 the call's copy is followed by the site's experts at their scaling-pass weights, which
    the later copies read (created in graph order, so a detach erases them in reverse)."""
    graph = branch.graph
    target = readout(graph)
    position = {node: index for index, node in enumerate(graph.nodes)}
    needed: set[fx.Node] = set()
    stack = [target]
    while stack:
        node = stack.pop()
        if node in needed or position[node] < position[call]:
            continue
        owner = node.meta.get("surgeon_adapter")
        if owner is not None:
            raise ValueError(f"xlora: adapter '{branch.adapter}' copies the base graph for its scaling pass, and "
                             f"node {node.name} at '{node.meta.get('surgeon_path')}' belongs to adapter '{owner}'; "
                             "insert (or activate) the X-LoRA adapter before other adapters")
        needed.add(node)
        stack.extend(node.all_input_nodes)
    copies: dict[fx.Node, fx.Node] = {}
    for node in sorted(needed, key=position.__getitem__):
        copy = graph.node_copy(node, lambda arg: copies.get(arg, arg))
        copy.meta.update(surgeon_pass=branch.made_by, surgeon_path=branch.path, surgeon_adapter=branch.adapter)
        copy.meta[COPY_OF] = node.name   # a site finds its own copy here (scaling_pass_value != 0)
        branch.created.append(copy)
        copies[node] = copy
        if node is call and opts["scaling_pass_value"]:
            copies[node] = _experts(branch, _copy_input(copy), copy, pass_scalings(opts), params, opts)
    return copies.get(target, target)


def _copy_input(copy: fx.Node) -> fx.Node:
    """The input x of a copied linear / addmm site call."""
    return copy.args[1] if copy.target is aten.addmm.default else copy.args[0]


def _route(branch: Branch, scalings: fx.Node, opts: dict) -> fx.Node:
    """PEFT's per-layer top-k mask (the k largest kept, the rest 0) and softmax over the kept ones."""
    if opts["top_k_lora"] is not None:
        top = branch.op(operator.getitem, branch.op(aten.topk.default, scalings, opts["top_k_lora"], -1), 1)
        mask = branch.op(aten.scatter.value, branch.op(aten.zeros_like.default, scalings), -1, top, 1.0)
        scalings = branch.mul(scalings, mask)
    if opts["enable_softmax_topk"]:
        dropped = branch.op(aten.eq.Scalar, scalings, 0)
        masked = branch.op(aten.masked_fill.Scalar, scalings, dropped, float("-inf"))
        scalings = branch.op(aten.masked_fill.Scalar, branch.op(aten.softmax.int, masked, -1), dropped, 0.0)
    return scalings


def _forward(branch, x, y, params, opts):
    # y + Σ_i (B_i A_i (x * s_i)) c_i g, each expert added in turn as PEFT adds them
    scalings = scalings_node(branch, y, params, opts)
    if opts["layerwise_scalings"]:
        scalings = branch.op(aten.select.int, scalings, -2, opts["layer"])
    scalings = _route(branch, scalings, opts)
    if "val" in x.meta and x.meta["val"].dim() == 2:   # GPT-2's Conv1D flattens (batch, seq) into rows
        scalings = branch.op(aten.reshape.default, scalings, [-1, opts["n_experts"]])
    weights = [branch.op(aten.slice.Tensor, scalings, -1, i, i + 1) for i in range(opts["n_experts"])]
    return _experts(branch, x, y, weights, params, opts)


def _experts(branch: Branch, x: fx.Node, y: fx.Node, weights: list, params: dict[str, fx.Node], opts: dict):
    """y + Σ_i (B_i A_i dropout_i(x * weights[i])) c_i g over the experts present at the site, in PEFT's order."""
    out, dropout = y, opts.get("expert_dropout") or [0.0] * opts["n_experts"]
    for i, (rank, scale) in enumerate(zip(expert_ranks(opts), expert_scales(opts))):
        if not rank:   # absent at this site; the expert keeps its index
            continue
        A, B = factor_names(i, opts)
        scaled = branch.dropout(branch.mul(x, weights[i]), dropout[i])   # the expert's lora_dropout, train mode only
        term = branch.mul(branch.linear(branch.linear(scaled, params[A]), params[B]), scale)
        if opts["global_scaling_weight"] != 1:
            term = branch.mul(term, opts["global_scaling_weight"])
        out = branch.add(out, term)
    return out


def pass_scalings(opts: dict) -> list[float]:
    """The site's expert weights in the scaling pass: PEFT's dummy scalings, all `scaling_pass_value`, through the
    layer's top-k mask and softmax (computed as PEFT does, on a (1, 1, L, E) tensor, ties and all)."""
    dummy = torch.full((1, 1, opts["n_layers"], opts["n_experts"]), float(opts["scaling_pass_value"]))
    return _route(EagerBranch((0, 0)), dummy[:, :, opts["layer"], :], opts).flatten().tolist()


def _scaling_pass_update(branch: Branch, call: fx.Node, params: dict[str, fx.Node], opts: dict) -> None:
    """With scaling_pass_value v != 0: the site's experts at their scaling-pass weights, added to its copy in the
    scaling pass (the copy's readers take the sum; detach gives them the copy back). A site that does not feed
    the readout has no copy, and its update could not reach the classifier."""
    if not opts["scaling_pass_value"]:
        return
    copy = next((n for n in branch.graph.nodes if n.meta.get(COPY_OF) == call.name
                 and n.meta.get("surgeon_adapter") == branch.adapter), None)
    if copy is None:
        return
    x = _copy_input(copy)
    start = len(branch.created)
    with branch.graph.inserting_before(copy.next):   # after the copy, before its readers
        refs = {name: get_attr(branch.graph, node.target, made_by=branch.made_by, adapter=branch.adapter)
                for name, node in params.items()}
        branch.created += refs.values()
        out = _experts(branch, x, copy, pass_scalings(opts), refs, opts)
    for ref in [r for r in refs.values() if not r.users]:
        branch.graph.erase_node(ref)
        branch.created.remove(ref)
    mine = set(branch.created[start:])
    out.meta["surgeon_input_of"] = copy.name   # adapter_ops.detach points the copy's readers back at the copy
    copy.replace_all_uses_with(out, delete_user_cb=lambda user: user not in mine)


def _check(opts: dict) -> None:
    for key in ("expert_scales", "expert_dropout"):
        if opts.get(key) is not None and len(opts[key]) != opts["n_experts"]:
            raise ValueError(f"xlora: {key} {opts[key]} gives {len(opts[key])} values for "
                             f"n_experts={opts['n_experts']}")
    top_k = opts["top_k_lora"]
    if top_k is not None and top_k > opts["n_experts"]:
        raise ValueError(f"xlora: top_k_lora {top_k} is more than the n_experts={opts['n_experts']} experts")


def _init_checked(opts, in_features, out_features, dtype, gen, weight):
    _check(opts)
    return _init(opts, in_features, out_features, dtype, gen, weight)


def param_count(opts: dict, fan_in: int, fan_out: int) -> int:
    """A site's own trained parameters: its experts' factors with use_trainable_adapters, else none."""
    return sum(expert_ranks(opts)) * (fan_in + fan_out) if opts["use_trainable_adapters"] else 0


def classifier_count(opts: dict) -> int:
    """The classifier's parameters, counted once per adapter."""
    return sum(rows * cols + rows for rows, cols in classifier_shapes(opts))


MAX_EXPERTS, MAX_DEPTH = 64, 16
CLASSIFIER = frozenset(f"classifier_{k}_{p}" for k in range(MAX_DEPTH) for p in ("weight", "bias"))

XLORA = AdapterKind(
    name="xlora",
    options={"n_experts": Option(int, 2, bounds=(1, MAX_EXPERTS)),
             "rank": Option(int, 8, positive=True),
             "alpha": Option((int, float), None),
             "use_rslora": Option(bool, False),
             "expert_ranks": Option(list, None),      # per site, from a loaded adapter: 0 = expert absent
             "expert_scales": Option(list, None),     # per site, from a loaded adapter: each expert's c_i
             "expert_dropout": Option(list, None),    # from a loaded adapter: each expert's lora_dropout
             "xlora_depth": Option(int, 1, bounds=(1, MAX_DEPTH)),
             "xlora_size": Option(int, 2048, positive=True),
             "xlora_dropout_p": Option(float, 0.2, bounds=(0.0, 1.0)),
             "layerwise_scalings": Option(bool, False),
             "enable_softmax": Option(bool, True),
             "softmax_temperature": Option((int, float), 1.0, positive=True),
             "top_k_lora": Option(int, None, positive=True),
             "enable_softmax_topk": Option(bool, False),
             "global_scaling_weight": Option((int, float), 1.0),
             "scaling_pass_value": Option((int, float), 0.0),   # every scaling in the scaling pass
             "use_trainable_adapters": Option(bool, False),
             "layer": Option(int, None),       # site_layout: the site's layer number
             "n_layers": Option(int, None),    # site_layout: the adapter's site count
             "hidden": Option(int, None)},     # site_options: the readout's width
    init=_init_checked,
    forward=_forward,
    delta_weight=None,
    refuse_merge=REFUSE_MERGE,
    param_count=param_count,
    frozen=frozenset(name for i in range(MAX_EXPERTS) for name in factor_names(i, {})),
    shared=CLASSIFIER,
    shared_trained=CLASSIFIER,
    shared_count=classifier_count,
    site_layout=_layout,
    site_options=_site_options,
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT's LoRA takes any rank
)
