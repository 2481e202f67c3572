"""The compiled module: a torch.fx GraphModule that stands in for the model it was captured from.

`SurgeonModule` is what `surgeon.capture` builds and `surgeon.compile` returns as `.module`:
- a call takes the original forward's arguments (surgeon.inputs binds and checks them; shapes
  outside what the graph accepts raise InputError naming the input and how to compile for it);
- a call leaves the caller's grad mode as it was, even when a `no_grad` block inside the graph
  raises, and prints nothing: torch.fx's own call prints the generated code on every error; here
  the failing graph line becomes a note on the exception;
- it carries the original model's `config` and `generation_config` (where it has them), and
  `device` and `dtype` (of its floating parameters);
- `.to(dtype / device)`, `.half()`, `.bfloat16()`, `.float()`, `.cuda()` move it like the model (no dtype or
  device constant of the capture stays baked into the graph: surgeon.portable);
- `adapter_names=[...]` (one adapter name per row, `"__base__"` for none: PEFT's mixed batch) runs a
  second graph built from this one (surgeon.serving); without it the call is the plain one;
- `task_ids=[...]` (one task id per row: PEFT's Poly convention) is held for the call and read by
  task-routed adapters (surgeon.routing); so is generate's;
- `generate(...)` runs the generator the compile attached (surgeon.generate), so the module alone
  is enough to serve;
- it trains under DDP and under FSDP2 with `fully_shard` applied to it (not to its submodules: the graph
  never calls them, and an error of that kind gets a note saying so; docs/distributed.md);
- deepcopy keeps all of it.
Parameters keep the original model's names, so `state_dict()` keys map back to the model.
"""
from __future__ import annotations

import linecache
import sys
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import portable
from .errors import InputError, SurgeonError


class SurgeonModule(fx.GraphModule):
    """A GraphModule that behaves like the model it was captured from (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        if "task_ids" in kwargs:   # one task id per row for task-routed adapters (Poly: surgeon.routing)
            from .routing import given

            with given(kwargs.pop("task_ids")):
                return self(*args, **kwargs)
        if "adapter_names" in kwargs:   # one adapter per row (surgeon.serving); None: the plain call
            names = kwargs.pop("adapter_names")
            if names is not None:
                return self._mixed(names, args, kwargs)
        inputs = self.meta.get("surgeon_inputs")
        if inputs is not None:
            args, kwargs = inputs.bind(args, kwargs), {}
            serving = self.meta.get("surgeon_serving")
            if serving is not None and args:   # virtual tokens in front need room in the model's positions
                from .adapters.virtual_tokens import check_room

                check_room(serving.ctx, inputs, args)
        grad = torch.is_grad_enabled()
        try:
            return nn.Module.__call__(self, *args, **kwargs)
        except Exception as error:
            followed = _followed_branch(error, inputs)
            if followed:
                raise InputError(f"this call takes a path the captured graph does not have ({error}): "
                                 f"{followed}. Compile with an example that takes this path.") from error
            line = graph_line(error)
            if line:
                error.add_note(f"(in the graph of {type(self).__name__}: {line})")
            sharded = _sharded_submodules(self, error)
            if sharded:
                error.add_note(f"fully_shard was applied to submodules of this compiled module "
                               f"({', '.join(sharded[:3])}{' ...' if len(sharded) > 3 else ''}): its graph reads every "
                               "parameter itself and never calls a submodule, so their FSDP hooks never gather the "
                               "shards. Apply fully_shard to the compiled module alone (docs/distributed.md)")
            raise
        finally:
            if torch.is_grad_enabled() != grad:
                torch.set_grad_enabled(grad)

    def _mixed(self, names, args, kwargs):
        """A call with `adapter_names`: the mixed graph (surgeon.serving's, which surgeon.compile attaches),
        errors noted as the plain call's."""
        serving = self.meta.get("surgeon_serving")
        if serving is None:
            raise SurgeonError(f"{type(self).__name__} takes no adapter_names: compile the model with surgeon.compile")
        grad = torch.is_grad_enabled()
        try:
            return serving.call(self, names, args, kwargs)
        except Exception as error:
            line = graph_line(error)
            if line:
                error.add_note(f"(in the mixed-batch graph of {type(self).__name__}: {line})")
            raise
        finally:
            if torch.is_grad_enabled() != grad:
                torch.set_grad_enabled(grad)

    def recompile(self):
        """GraphModule.recompile, keeping this class's __call__ (GraphModule's own would shadow it)."""
        code = super().recompile()
        cls = type(self)
        if "__call__" in cls.__dict__:
            delattr(cls, "__call__")
        return code

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (what .to, .half, .bfloat16, .float, .double, .cuda, .cpu go through), with
        the graph first made to read the dtype and device that follow the module at run time
        (surgeon.portable); a move that cannot be made raises SurgeonError before anything converts."""
        move = portable.prepare(self, fn)
        result = super()._apply(fn, recurse)
        if move is not None:
            portable.finish(self, move)
        return result

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters (the first one's)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module's floating parameters (the first one's), as transformers reports it."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Token ids, as transformers' generate returns them (see surgeon.generate)."""
        generator = self.meta.get("surgeon_generator")
        if generator is None:
            raise SurgeonError(f"{type(self).__name__} has no generator: compile it with surgeon.compile, which "
                               "attaches one to models that generate (a causal or encoder-decoder LM)")
        if "task_ids" in kwargs:   # held for the whole generate: every graph it runs reads them (surgeon.routing)
            from .routing import given

            with given(kwargs.pop("task_ids")):
                return generator.generate(self, *args, **kwargs)
        return generator.generate(self, *args, **kwargs)


def graph_line(error: BaseException) -> str | None:
    """The line of generated forward code an error was raised from, if any."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "eval_with_key" in f.filename]
    if not frames:
        return None
    frame = frames[-1]
    source = linecache.getline(frame.filename, frame.lineno).strip()
    return f"line {frame.lineno}: {source}" if source else f"line {frame.lineno}"


def _sharded_submodules(module: nn.Module, error: Exception) -> list[str]:
    """The submodules (not `module` itself) that torch.distributed.fsdp.fully_shard was applied to, when `error`
    is DTensor's complaint about an op mixing sharded and plain tensors; else []. The graph reads parameters
    directly (get_attr), so a submodule's FSDP pre-forward hook, which gathers its shards, never runs."""
    fsdp = sys.modules.get("torch.distributed.fsdp")   # never imported: nothing can be sharded
    if fsdp is None or "DTensor" not in str(error):
        return []
    return [name for name, sub in module.named_modules() if name and isinstance(sub, fsdp.FSDPModule)]


def _followed_branch(error: Exception, inputs) -> str:
    """The capture's note when `error` is a runtime assertion of a graph that follows the example's
    value-dependent branches (surgeon.capture's draft-export path), else ''."""
    if not isinstance(error, RuntimeError) or "Runtime assertion failed" not in str(error) or inputs is None:
        return ""
    return next((note for note in inputs.notes if "draft_export" in note), "")
