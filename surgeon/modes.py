"""Train mode: the compiled module follows `.train()` / `.eval()` as the model it came from does.

Capture runs the model in eval mode (surgeon.capture), and torch.export keeps what eval mode
switches off as ops with a constant flag: a dropout as `aten.dropout(x, p, False)` (likewise
feature_dropout, alpha_dropout, feature_alpha_dropout), a BatchNorm that tracks running
statistics as `aten.batch_norm(x, w, b, mean, var, False, momentum, eps, cudnn)`. `gate_training`
runs once at the end of capture and replaces those constants by the module's training flag, read
when the module runs: the graph module gets a child `_surgeon_mode` (a plain nn.Module that
`.train()` and `.eval()` recurse into) and the flag is a `get_attr` node of `_surgeon_mode.training`,
so the ops stay the ops passes match. In train mode:

- a dropout with p > 0 drops: nn.Dropout modules and functional calls alike (Hugging Face's
  `F.dropout(x, p, training=self.training)`; a call that passes training=False literally looks the
  same in the graph and follows the mode too). p == 0 stays a constant: the identity either way;
- a BatchNorm module with running statistics normalizes by batch statistics and updates
  running_mean / running_var in place (the compiled module's own copies: capture copies buffers);
  with `momentum=None` (a cumulative average) it also counts num_batches_tracked and averages with
  1 / count (`cumulative_momentum`). A BN that `fold-bn` or `reparameterize` folded into a conv /
  linear stays folded: in train mode it is the eval affine map (no batch statistics). A functional
  `batch_norm` that is no nn.BatchNorm module keeps its flag (a frozen BN passes training=False on
  purpose), and a note names it;
- attention dropout inside `aten.scaled_dot_product_attention`: Hugging Face modules pass
  `dropout_p = attention_dropout if self.training else 0.0`, so an eval capture records 0.0 and the
  model's p is gone from the graph. It is read back from the module the call came from: a float
  `attention_dropout` attribute (LLaMA, Mistral, Qwen ...) or, on an `...Attention` module, its one
  nn.Dropout child that the graph never calls (GPT-2's attn_dropout, BERT's dropout); the call's
  dropout_p becomes `attention_p(training, p)`. The eager attention path's `dropout(w, 0.0, False)`
  in such a module gets both. Where the config names an attention dropout that no module gives,
  it stays off in train mode and a note says so.

Adapters: `Branch.dropout` builds PEFT's adapter dropout on the same flag (LoRA, DoRA, VeRA,
LoRA-XS), and `dora_base` is DoRA's base term, which PEFT computes differently in the two modes.

The compiled module starts in eval mode, as captured: call `.train()` to train it. The pass
manager's numeric checks run in eval (`evaluating`), whatever the module's mode. gm.meta
["surgeon_train_mode"] records what follows the mode, and the notes. Passes read a flag node as
"eval at capture, follows the mode": fold-bn folds such a BN (only a literal True, as with
track_running_stats=False, is a BN in training mode); fuse ends a GEMM epilogue at a gated dropout
(random in training), and the bottleneck region takes an adapter's dropped input as its source.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

MODE = "_surgeon_mode"               # the child whose `training` the graph reads
FLAG = f"{MODE}.training"            # the get_attr target of the flag

# dropout-like ops: (index of p, index of the train flag, its keyword name)
DROPOUTS = {
    aten.dropout.default: (1, 2, "train"),
    aten.feature_dropout.default: (1, 2, "train"),
    aten.alpha_dropout.default: (1, 2, "train"),
    aten.feature_alpha_dropout.default: (1, 2, "train"),
    F.dropout: (1, 2, "training"),          # the fx front end's functional calls
}
_BN_TRAINING, _BN_MOMENTUM = 5, 6      # aten.batch_norm's training and momentum positions
_SDPA_P = 4                            # aten.scaled_dot_product_attention's dropout_p position


class Mode(nn.Module):
    """Holds no tensors: its `training` flag is the compiled module's (train/eval recurse into it)."""


def ensure_mode(gm: nn.Module) -> None:
    """Give `gm` its mode child (again, after a pass dropped it with its last reader), in gm's mode."""
    if not isinstance(getattr(gm, MODE, None), nn.Module):
        mode = Mode()
        mode.training = gm.training
        gm.add_module(MODE, mode)
        gm.__dict__[MODE] = mode      # the fast lookup capture.index_children gives every child


def read_flag(graph: fx.Graph, made_by: str, adapter: str | None = None) -> fx.Node:
    """A new get_attr node of the flag at the graph's insertion point, with provenance (made directly:
    fx's get_attr warns about a target that is no tensor or module)."""
    node = graph.create_node("get_attr", FLAG)
    node.meta.update(surgeon_pass=made_by, surgeon_path=MODE)
    if adapter:
        node.meta["surgeon_adapter"] = adapter
    return node


def attention_p(training: bool, p: float) -> float:
    """SDPA's dropout_p as Hugging Face attention passes it: p in train mode, 0.0 in eval."""
    return p if training else 0.0


def cumulative_momentum(training: bool, num_batches_tracked: torch.Tensor) -> float:
    """nn.BatchNorm's factor for momentum=None: in train mode the call counts itself in
    num_batches_tracked and the running statistics average over all calls (1 / count)."""
    if not training:
        return 0.0
    num_batches_tracked.add_(1)
    return 1.0 / float(num_batches_tracked)


def dora_base(training: bool, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """The base output DoRA's magnitude term scales, as PEFT computes it with a dropout: W dropout(x)
    in train mode (x is the dropped input here), y - b (the base output, no recomputation) in eval."""
    if training:
        return F.linear(x, weight)
    return y if bias is None else y - bias


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode inside the block (a numeric check must not drop or update BN
    statistics), then put every submodule's flag back as it was."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _owner(target: str) -> str:
    return target.rpartition(".")[0]


def _attention_p(module: nn.Module | None, path: str, called: set[str]) -> float | None:
    """The attention dropout p a Hugging Face-style attention module applies in train mode, or None."""
    if module is None:
        return None
    value = getattr(module, "attention_dropout", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, nn.Dropout):
        return float(value.p)
    if "attention" not in type(module).__name__.lower():
        return None
    unused = {float(child.p) for name, child in module.named_children()
              if isinstance(child, nn.Dropout) and (f"{path}.{name}" if path else name) not in called}
    return unused.pop() if len(unused) == 1 else None


def _config_attention_p(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attention_dropout_prob"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 0.0


def gate_training(gm: fx.GraphModule, model: nn.Module) -> dict:
    """Make the captured graph's dropouts and BatchNorms follow gm's training flag (see the module
    docstring); put gm in eval mode, as captured. Returns (and stores in gm.meta["surgeon_train_mode"])
    counts and notes."""
    ensure_mode(gm)
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")
    flag: list[fx.Node] = []

    def training() -> fx.Node:
        if not flag:
            with graph.inserting_before(first):
                flag.append(read_flag(graph, "capture"))
        return flag[0]

    def helper(before: fx.Node, target, args: tuple, path: str) -> fx.Node:
        with graph.inserting_before(before):
            node = graph.call_function(target, args)
        node.meta.update(surgeon_path=path, surgeon_pass="capture")
        return node

    info = {"dropouts": 0, "batch_norms": 0, "attention": [], "notes": []}
    called = {n.meta.get("surgeon_path", "") for n in graph.nodes if n.op == "call_function" and n.target in DROPOUTS}
    attention: dict[str, float | None] = {}
    functional_bn = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        path = node.meta.get("surgeon_path", "")
        if node.target in DROPOUTS:
            p_at, train_at, train_name = DROPOUTS[node.target]
            p, train = _arg(node, p_at, "p", 0.5), _arg(node, train_at, train_name, True)
            if train is not False or not isinstance(p, (int, float)):
                continue
            if p > 0:
                _set_arg(node, train_at, train_name, training())
                info["dropouts"] += 1
            elif node.target is aten.dropout.default:      # HF eager attention: p = 0.0 outside training
                attn = attention.setdefault(path, _attention_p(_module(model, path), path, called))
                if attn:
                    _set_arg(node, p_at, "p", helper(node, attention_p, (training(), attn), path))
                    _set_arg(node, train_at, train_name, training())
                    info["attention"].append(path)
        elif node.target is aten.batch_norm.default:
            mean = _arg(node, 3, "running_mean", None)
            if _arg(node, _BN_TRAINING, "training", True) is not False or not isinstance(mean, fx.Node):
                continue
            module = _module(model, _owner(mean.target)) if mean.op == "get_attr" else None
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                functional_bn.append(path or "<root>")
                continue
            _set_arg(node, _BN_TRAINING, "training", training())
            if module.momentum is None and isinstance(getattr(module, "num_batches_tracked", None), torch.Tensor):
                target = f"{_owner(mean.target)}.num_batches_tracked"
                owner = gm.get_submodule(_owner(target))
                if "num_batches_tracked" not in owner._buffers:
                    owner.register_buffer("num_batches_tracked", module.num_batches_tracked.detach().clone())
                with graph.inserting_before(node):
                    count = graph.get_attr(target)
                count.meta.update(surgeon_path=_owner(target), surgeon_pass="capture")
                _set_arg(node, _BN_MOMENTUM, "momentum", helper(node, cumulative_momentum, (training(), count), path))
            info["batch_norms"] += 1
        elif node.target is aten.scaled_dot_product_attention.default:
            if _arg(node, _SDPA_P, "dropout_p", 0.0) != 0.0:
                continue
            attn = attention.setdefault(path, _attention_p(_module(model, path), path, called))
            if attn:
                _set_arg(node, _SDPA_P, "dropout_p", helper(node, attention_p, (training(), attn), path))
                info["attention"].append(path)
    if info["dropouts"] or info["batch_norms"] or info["attention"]:
        parts = [f"{n} {what}" for n, what in ((info["dropouts"], "dropouts"), (info["batch_norms"], "BatchNorms"),
                                               (len(info["attention"]), "attention dropouts")) if n]
        info["notes"].append(f"train mode: {', '.join(parts)} follow .train()/.eval() (the module starts in eval)")
    configured = _config_attention_p(model)
    if configured and not info["attention"]:
        info["notes"].append(f"train mode: the config's attention dropout ({configured:g}) stays off in train mode "
                             "(eval capture records dropout_p=0.0 and no attention module names its p)")
    if functional_bn:
        info["notes"].append(f"train mode: batch_norm calls that are not nn.BatchNorm modules keep eval statistics "
                             f"in train mode ({', '.join(sorted(set(functional_bn)))})")
    gm.meta["surgeon_train_mode"] = info
    gm.eval()
    return info

