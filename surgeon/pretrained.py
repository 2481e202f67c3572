"""`Compiled.save_pretrained`: the compiled model as a plain checkpoint its own class loads.

The folder holds `model.safetensors` under the original model's parameter and buffer names, with
every running adapter merged into the base weights (on a copy: the compiled module keeps its
adapters), plus `config.json` and `generation_config.json` when the model carries a Hugging Face
config, so `AutoModel...from_pretrained(folder)` (or `model.load_state_dict(load_file(...))` for any
other module) gives a model with the same outputs and no surgeon. What is not a weight of the
original model stays out: adapter parameters, and buffers the capture made for itself. State the
graph never reads (e.g. BatchNorm's num_batches_tracked) is taken from the model as captured.

Refused, with the reason: an adapter whose kind has no exact merge (a bottleneck adapter, prefix
tuning), lowered regions (merge before `lower`), and a folder that exists as a file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .errors import SurgeonError
from .safe_io import check_out_dir, write_text_nofollow

if TYPE_CHECKING:
    from .compiled import Compiled


def save_pretrained(compiled: "Compiled", directory: str | Path) -> Path:
    out = check_out_dir(directory, "save_pretrained")
    running = [name for name, state in compiled.adapters.items() if state.status in ("inserted", "quantized")]
    lowered = [name for name, state in compiled.adapters.items() if state.status == "lowered"]
    if lowered:
        raise SurgeonError(f"save_pretrained: adapters {lowered} were lowered into kernels; merge them before "
                           "`lower`, or save from a compile without it")
    meta = compiled.module.meta   # shared, not copied: the generator (it holds the original model), the unused state
    memo = {id(v): v for v in (meta.get("surgeon_generator"), meta.get("surgeon_unused_state")) if v is not None}
    work = copy.deepcopy(compiled, memo)
    if running:
        try:
            work.apply([{"merge": {"adapters": running}}])
        except SurgeonError as error:
            raise SurgeonError(f"save_pretrained: the running adapters {running} cannot all be merged into the base "
                               f"weights, so no plain checkpoint has the same outputs: {error}") from error
    state = _original_state(work.module, compiled.module.meta.get("surgeon_unused_state", {}))
    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.safetensors"
    if target.is_symlink():
        target.unlink()
    save_file(state, str(target), metadata={"format": "pt"})
    config = getattr(compiled.module, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        write_text_nofollow(out / "config.json", config.to_json_string())
    generation = getattr(compiled.module, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        write_text_nofollow(out / "generation_config.json", generation.to_json_string())
    return out


def _original_state(module: torch.nn.Module, unused: dict) -> dict[str, torch.Tensor]:
    """The module's state under the original names (adapters left out), plus what the graph never read;
    a tensor held under several names (tied embeddings) is written once, under its first name."""
    state: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    names = {**{k: v for k, v in module.state_dict().items() if ".adapter_" not in k and "_surgeon" not in k},
             **{k: v.detach() for k, v in unused.items()}}
    for name, tensor in names.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous()
    return state
