"""Gradients of a loss with respect to adapter sites' base weights, on calibration inputs.

Gradient-initialized adapters (LoRA-GA, LoRA-SB) need, per site, the gradient G = dL/dW of a training
loss with respect to the site's base weight W on data, which neither the weight nor input statistics
give. `weight_gradients` runs the captured graph on the compile's example inputs (`ctx.examples`'s
first entry) through an fx.Interpreter that hands each watched weight's get_attr a fresh leaf copy
of it that requires grad, so the graph, its parameters and their requires_grad flags are left as
they were; nothing else is differentiated.

The loss is next-token cross-entropy, as a causal LM's training loss with labels = input_ids
(Hugging Face's convention, and what PEFT's LoRA-GA examples pass):

    L = mean over (b, t < T-1) with label != -100 of  CE(logits[b, t], labels[b, t + 1])

computed in float32. The logits are the graph's output `logits` entry (a model output with a
`logits` field) or the output itself when it is one tensor; they must be batch x seq x vocab over the
token ids. The labels are the example's `labels` keyword when it has one (ignored positions -100),
else its `input_ids` (keyword, or the first integer tensor argument). A model whose output is not
such logits (an encoder's hidden states, a classifier's scores) gets a SurgeonError: there is no
next-token loss to take the gradient of.

The graph runs in eval mode (dropout off), so the gradient is deterministic; PEFT's preprocessing
runs train mode, which is the same on a model without dropout (or with it at 0). A weight that runs
k times per forward gets, as in PEFT (its backward hook counts calls), the sum of its gradients divided
by k; a weight shared by several sites gets its whole gradient at each. The result is out x in,
float32: a GPT-2 Conv1D's in x out weight's gradient is transposed.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .errors import SurgeonError
from .modes import evaluating
from .pipeline import placed


class _Leaves(fx.Interpreter):
    """Runs the graph with the watched weights replaced by leaf tensors that require grad."""

    def __init__(self, gm: fx.GraphModule, leaves: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.leaves = leaves

    def fetch_attr(self, target: str) -> Any:
        return self.leaves[target] if target in self.leaves else super().fetch_attr(target)


def _logits(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    value = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)   # a ModelOutput is a dict
    return value if isinstance(value, torch.Tensor) else None


def _labels(arguments: dict[str, Any]) -> torch.Tensor | None:
    for name in ("labels", "input_ids"):
        if isinstance(arguments.get(name), torch.Tensor):
            return arguments[name]
    return next((v for v in arguments.values() if isinstance(v, torch.Tensor) and not v.is_floating_point()
                 and not v.is_complex() and v.dtype != torch.bool and v.dim() == 2), None)


def next_token_loss(out: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """The float32 next-token cross-entropy of a forward's output against its example's labels (see the
    module doc); SurgeonError when the output is not batch x seq x vocab logits over those labels."""
    logits, labels = _logits(out), _labels(arguments)
    if logits is None or labels is None or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape) \
            or not logits.is_floating_point() or labels.shape[1] < 2:
        got = type(out).__name__ if logits is None else f"a tensor of shape {list(logits.shape)}"
        raise SurgeonError(f"gradient calibration takes a causal LM's next-token loss: the model must output "
                           f"batch x seq x vocab logits (a `logits` entry, or one tensor) over integer token ids "
                           f"of at least 2 positions (`input_ids` or `labels`), and it outputs {got}"
                           + ("" if labels is None else f" for token ids of shape {list(labels.shape)}"))
    labels = labels.to(logits.device).long()
    if int(labels.max()) >= logits.shape[-1]:
        raise SurgeonError(f"gradient calibration: token id {int(labels.max())} is beyond the {logits.shape[-1]} "
                           "logits per position, so the output is no vocabulary's logits")
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100)


def weight_gradients(gm: fx.GraphModule, examples: list[tuple[tuple, dict]],
                     weights: dict[str, tuple[str, bool, int]]) -> dict[str, torch.Tensor]:
    """{key: dL/dW (out x in, float32)} for `weights[key]` = (the weight's get_attr target, whether it is
    stored in x out (Conv1D), the number of times it runs per forward), the loss summed over the examples
    and each gradient divided by (calls x examples), as PEFT averages its backward-hook count (see the
    module doc)."""
    targets = {target for target, _, _ in weights.values()}
    sums: dict[str, torch.Tensor] = {}
    signature = inspect.signature(gm.forward)
    with evaluating(gm), torch.enable_grad():
        for example in examples:
            args, kwargs = placed(gm, example)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            leaves = {t: _fetch(gm, t).detach().clone().requires_grad_(True) for t in sorted(targets)}
            if any(t.is_meta for t in leaves.values()):
                raise SurgeonError("gradient calibration runs the model, and this graph has no weight values "
                                   "(a structure-only compile)")
            out = _Leaves(gm, leaves).run(*bound.args)
            loss = next_token_loss(out, dict(bound.arguments))
            if not torch.isfinite(loss):
                raise SurgeonError(f"gradient calibration: the loss is {loss.item()} on a calibration example; "
                                   "pass other example inputs")
            order = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[t] for t in order], allow_unused=True)
            for target, grad in zip(order, grads):
                if grad is None:
                    raise SurgeonError(f"gradient calibration: the loss does not depend on the weight '{target}'")
                sums[target] = sums.get(target, 0) + grad.detach().float()
    out = {}
    for key, (target, transposed, calls) in weights.items():
        grad = sums[target] / (max(calls, 1) * len(examples))
        out[key] = (grad.t() if transposed else grad.flatten(1)).contiguous()
    return out


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    module, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module) if module else gm, name)
