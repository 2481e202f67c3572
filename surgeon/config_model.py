"""The model a checkpoint folder's `config.json` describes, built without reading or allocating a weight.

    model = build_meta_model(folder)                       # every parameter and buffer on the meta device
    model = build_meta_model(folder, real_buffers=True)    # parameters on meta, buffers computed on the CPU

The class: the config's `architectures[0]` where transformers has it, else AutoModelForCausalLM's for the
config's model_type; custom code (`auto_map`) is never run. surgeon.from_folder compiles the first kind
structure only; surgeon.layerwise runs the second, one block's weights at a time: buffers a model computes
from its config when it is built (LLaMA's rotary inverse frequencies) are in no checkpoint, and a model built
on the meta device has no values for them.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

from .errors import SurgeonError


def config_path(folder: Path, how: str) -> Path:
    """folder/config.json, or SurgeonError (prefixed `how:`) naming what is missing."""
    if not folder.is_dir():
        raise SurgeonError(f"{how}: '{folder}' is not a folder; give a checkpoint folder holding config.json "
                           "(as save_pretrained writes it)")
    path = folder / "config.json"
    if path.is_symlink() or not path.is_file():
        link = " (a symbolic link there is not followed)" if path.is_symlink() else ""
        raise SurgeonError(f"{how}: '{folder}' has no config.json{link}; a Hugging Face checkpoint folder holds "
                           "config.json beside its *.safetensors")
    return path


def build_meta_model(folder: Path, dtype: "torch.dtype | str | None" = None, *, real_buffers: bool = False,
                     how: str = "compile_pretrained") -> torch.nn.Module:
    """The model `folder/config.json` describes, on the meta device (no weight allocated or read), in eval mode.

    With `real_buffers` only the parameters are on the meta device; buffers are made on the CPU as the
    model's own code computes them (small: rotary frequencies, masks). Errors are prefixed `how:`."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, RecursionError, OSError) as error:
        raise SurgeonError(f"{how}: '{path}' is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise SurgeonError(f"{how}: '{path}' must hold a JSON object, got {type(raw).__name__}")
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise SurgeonError(f"{how} builds the model with transformers, which is not installed: {error}") from error
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as error:   # transformers raises ValueError / KeyError / OSError for what it cannot read
        known = "" if model_type is None else f"model_type {model_type!r}: "
        raise SurgeonError(f"{how}: transformers {transformers.__version__} cannot read '{path}' "
                           f"({known}{first_line(error)}); surgeon runs no custom code from a checkpoint folder"
                           ) from error
    architectures = raw.get("architectures") or []
    if dtype is not None:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else dtype
        if not isinstance(dtype, torch.dtype):
            raise SurgeonError(f"{how}: dtype {dtype!r} is not a torch dtype (e.g. torch.bfloat16 or 'bfloat16')")
    options = {} if dtype is None else {"dtype": dtype}
    with (parameters_on_meta() if real_buffers else torch.device("meta")):
        if architectures:
            name = architectures[0]
            cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                custom = " (its auto_map names custom code, which surgeon does not run)" if raw.get("auto_map") \
                    else ""
                raise SurgeonError(f"{how}: '{path}' names the architecture {name!r}, which transformers "
                                   f"{transformers.__version__} does not have{custom}; set `architectures` to a "
                                   "transformers model class, or build the model yourself and use surgeon.compile")
            model = _build(lambda: cls._from_config(config, **options), path, name, how)
        else:
            try:
                model = AutoModelForCausalLM.from_config(config, **options)
            except ValueError as error:
                raise SurgeonError(f"{how}: '{path}' names no `architectures`, and transformers has no "
                                   f"causal LM for model_type {config.model_type!r} ({first_line(error)}); add "
                                   "`architectures` naming the model class") from error
            except Exception as error:
                raise SurgeonError(f"{how}: building AutoModelForCausalLM from '{path}' on the meta device "
                                   f"raised {type(error).__name__}: {first_line(error)}") from error
    return model.eval()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device as it is registered
    (before the module's init code fills it, which on meta costs nothing); buffers and every other tensor
    are made where they would be. Module-wide: the constructor runs in this thread while it is active."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: "torch.nn.Parameter | None") -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _build(make, path: Path, name: str, how: str):
    try:
        return make()
    except Exception as error:
        raise SurgeonError(f"{how}: building {name} from '{path}' on the meta device raised "
                           f"{type(error).__name__}: {first_line(error)}") from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
