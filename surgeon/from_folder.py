"""`surgeon.compile_pretrained`: compile a model from its checkpoint folder without loading its weights.

    compiled = surgeon.compile_pretrained("llama-7b/", spec)                      # structure only
    compiled = surgeon.compile_pretrained("llama-7b/", spec, merge_to="merged/")  # and the merged checkpoint

The model is built from the folder's `config.json` (transformers' AutoConfig, then the architecture the
config names, else AutoModelForCausalLM) on the meta device, in the config's dtype, and compiled structure
only (surgeon.compile on meta weights: docs/large_models.md) on meta example input ids: no weight is read.
With `merge_to`, the running adapters (inserted, or quantized) are saved in surgeon's format to a temporary
folder and merged into the folder's safetensors by surgeon.merge_checkpoint, one tensor at a time, in the
folder's layout (shards and index kept, other files copied): the output is what `surgeon merge-checkpoint`
writes for the same adapter, bit for bit. Several adapters are merged one after another, in the spec's
order (each merge writes a complete intermediate checkpoint beside `merge_to`, removed afterwards): that is
what the merge pass does in memory, one adapter's delta rounded into the weights after the other.

(surgeon.pretrained is the other direction: Compiled.save_pretrained of a model held in memory.)

Refused, naming what and where, before anything is written: a folder without config.json, a config
transformers cannot build (unknown model_type, an architecture it lacks, custom code), targets that match
no module of the built model, a `merge_to` that exists or lies inside the folder, a folder without
safetensors weights (with merge_to), an adapter whose parameters a structure-only compile cannot have
(DoRA's magnitude, PiSSA's factors: computed from the weights' values; load a trained one with from_dir /
from_peft), and a kind with no exact merge. The folder itself is only read.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import SurgeonError

DEFAULT_EXAMPLE = (2, 16)   # batch x length of the meta input ids (length capped by the model's positions)
_HOW = "compile_pretrained"


def compile_pretrained(path: "str | Path", spec: Any, example: Any = None, example_kwargs: dict | None = None, *,
                       merge_to: "str | Path | None" = None, dtype: "torch.dtype | str | None" = None,
                       dynamic: bool | None = None, fan_in_fan_out: bool | None = None,
                       allow_nonfinite: bool = False, progress: Callable[[str], None] | None = None):
    """Build the model of the checkpoint folder `path` on the meta device and compile it structure only.

    `example`: the example input ids: None (meta ids of shape DEFAULT_EXAMPLE, 2 x 16), a shape
    `(batch, length)`, or tensors (their shapes and dtypes are used, on meta). `example_kwargs` as for
    surgeon.compile (meta tensors; e.g. an attention_mask to capture it as an input). `dtype`: the model's
    dtype (default: the config's, as transformers' from_config and from_pretrained use it).

    Returns the structure-only Compiled (its report, merge_plan(), save_adapter of the adapters as the spec
    initialized or loaded them). With `merge_to`, the merged checkpoint is written there first and
    `compiled.merged_checkpoint` is merge_checkpoint's MergeSummary of it (None without merge_to).
    `fan_in_fan_out` and `allow_nonfinite` are merge_checkpoint's; the layout default comes from the
    compile (GPT-2's Conv1D sites store their weight in x out).
    """
    from .compiled import compile as surgeon_compile, load_spec

    folder = Path(path)
    config_path = _config_path(folder)
    spec = load_spec(spec)   # everything that needs no model first
    merge_to = _check_merge_to(folder, merge_to) if merge_to is not None else None
    model = build_meta_model(folder, dtype)
    where = f"{type(model).__name__} built from '{config_path}'"
    args = meta_example(model, example)
    kwargs = {k: (torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v)
              for k, v in (example_kwargs or {}).items()} or None
    try:
        compiled = surgeon_compile(model, args, spec, kwargs, dynamic=dynamic, progress=progress)
    except SurgeonError as error:   # say which model: the spec's targets are checked against the folder's
        if error.args and isinstance(error.args[0], str):
            error.args = (f"{error.args[0]} [{_HOW}: the {where}]", *error.args[1:])
        raise
    compiled.merged_checkpoint = None
    if merge_to is not None:
        compiled.merged_checkpoint = merge_into(compiled, folder, merge_to, fan_in_fan_out, allow_nonfinite,
                                                progress)
    return compiled


# ---------------------------------------------------------------- the model, from config.json

def _config_path(folder: Path) -> Path:
    if not folder.is_dir():
        raise SurgeonError(f"{_HOW}: '{folder}' is not a folder; give a checkpoint folder holding config.json "
                           "(as save_pretrained writes it)")
    config_path = folder / "config.json"
    if config_path.is_symlink() or not config_path.is_file():
        link = " (a symbolic link there is not followed)" if config_path.is_symlink() else ""
        raise SurgeonError(f"{_HOW}: '{folder}' has no config.json{link}; a Hugging Face checkpoint folder holds "
                           "config.json beside its *.safetensors")
    return config_path


def build_meta_model(folder: Path, dtype: "torch.dtype | str | None" = None) -> torch.nn.Module:
    """The model `folder/config.json` describes, on the meta device (no weight allocated or read), in eval mode.

    The class: the config's `architectures[0]` where transformers has it, else AutoModelForCausalLM's
    for the config's model_type. Custom code (`auto_map`) is never run."""
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_bytes())
    except (ValueError, RecursionError, OSError) as error:
        raise SurgeonError(f"{_HOW}: '{config_path}' is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise SurgeonError(f"{_HOW}: '{config_path}' must hold a JSON object, got {type(raw).__name__}")
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise SurgeonError(f"{_HOW} builds the model with transformers, which is not installed: {error}") from error
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as error:   # transformers raises ValueError / KeyError / OSError for what it cannot read
        known = "" if model_type is None else f"model_type {model_type!r}: "
        raise SurgeonError(f"{_HOW}: transformers {transformers.__version__} cannot read '{config_path}' "
                           f"({known}{_first_line(error)}); surgeon runs no custom code from a checkpoint folder"
                           ) from error
    architectures = raw.get("architectures") or []
    if dtype is not None:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else dtype
        if not isinstance(dtype, torch.dtype):
            raise SurgeonError(f"{_HOW}: dtype {dtype!r} is not a torch dtype (e.g. torch.bfloat16 or 'bfloat16')")
    options = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        if architectures:
            name = architectures[0]
            cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                custom = " (its auto_map names custom code, which surgeon does not run)" if raw.get("auto_map") \
                    else ""
                raise SurgeonError(f"{_HOW}: '{config_path}' names the architecture {name!r}, which transformers "
                                   f"{transformers.__version__} does not have{custom}; set `architectures` to a "
                                   "transformers model class, or build the model yourself and use surgeon.compile")
            model = _build(lambda: cls._from_config(config, **options), config_path, name)
        else:
            try:
                model = AutoModelForCausalLM.from_config(config, **options)
            except ValueError as error:
                raise SurgeonError(f"{_HOW}: '{config_path}' names no `architectures`, and transformers has no "
                                   f"causal LM for model_type {config.model_type!r} ({_first_line(error)}); add "
                                   "`architectures` naming the model class") from error
            except Exception as error:
                raise SurgeonError(f"{_HOW}: building AutoModelForCausalLM from '{config_path}' on the meta device "
                                   f"raised {type(error).__name__}: {_first_line(error)}") from error
    return model.eval()


def _build(make, config_path: Path, name: str):
    try:
        return make()
    except Exception as error:
        raise SurgeonError(f"{_HOW}: building {name} from '{config_path}' on the meta device raised "
                           f"{type(error).__name__}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def meta_example(model: torch.nn.Module, example: Any = None) -> tuple:
    """Meta input ids: DEFAULT_EXAMPLE, a (batch, length) shape, or the shapes and dtypes of given tensors."""
    if example is None:
        batch, length = DEFAULT_EXAMPLE
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and positions >= 2:
            length = min(length, positions)
        return (torch.empty(batch, length, dtype=torch.long, device="meta"),)
    if isinstance(example, torch.Tensor):
        return (torch.empty_like(example, device="meta"),)
    if isinstance(example, (tuple, list)) and example and all(isinstance(d, int) for d in example):
        if any(d < 1 for d in example):
            raise SurgeonError(f"{_HOW}: example shape {tuple(example)} must have sizes >= 1")
        return (torch.empty(*example, dtype=torch.long, device="meta"),)
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(torch.empty_like(t, device="meta") for t in example)
    raise SurgeonError(f"{_HOW}: example must be None, a shape like (2, 16) or tensors, got {example!r}")


# ---------------------------------------------------------------- the merged checkpoint

def _check_merge_to(folder: Path, merge_to: "str | Path") -> Path:
    """Checked before the model is built: merge_to is new and outside the folder, the folder has weights."""
    from . import merge_checkpoint as mc

    merge_to = Path(merge_to)
    if os.path.lexists(merge_to):
        what = "is a symbolic link" if merge_to.is_symlink() else "exists"
        raise SurgeonError(f"{_HOW}: merge_to '{merge_to}' {what}; name a new folder for the merged checkpoint")
    source, target = folder.resolve(), merge_to.parent.resolve() / merge_to.name
    if target == source or source in target.parents:
        raise SurgeonError(f"{_HOW}: merge_to '{merge_to}' is inside the checkpoint folder '{folder}', which is "
                           "only read; name a folder outside it")
    try:
        mc._shard_files(folder)
    except SurgeonError as error:
        raise SurgeonError(f"{_HOW}: merge_to needs the folder's safetensors weights: {error}") from error
    return merge_to


def merge_into(compiled, folder: Path, merge_to: Path, fan_in_fan_out: bool | None = None,
               allow_nonfinite: bool = False, progress: Callable[[str], None] | None = None):
    """Merge the compile's running adapters into folder's checkpoint, written to merge_to (merge_checkpoint)."""
    from . import merge_checkpoint as mc

    states = compiled.adapters
    running = [name for name, state in states.items() if state.status in ("inserted", "quantized")]
    if not running:
        raise SurgeonError(f"{_HOW}: no adapter to merge into '{folder}' (adapters: "
                           f"{ {n: s.status for n, s in states.items()} }); merge_to merges inserted adapters")
    for name in running:
        reason = next((r for s in states[name].sites if (r := states[name].spec.kind.refusal(s.options))), "")
        if reason:
            raise SurgeonError(f"{_HOW}: adapter '{name}' ({states[name].spec.type}) cannot be merged: {reason}")
        unknown = sorted({p for ps in compiled.adapter_weights(name).values() for p, t in ps.items() if t.is_meta})
        if unknown:
            raise SurgeonError(
                f"{_HOW}: adapter '{name}' ({states[name].spec.type}) has parameters {unknown} computed from the "
                "base weights' values, which a structure-only compile does not read; load the trained adapter "
                "with from_dir or from_peft in the spec to merge it")
    names = {n for shard in mc._shard_files(folder) for n in mc._read_header(folder / shard)[0]}
    with tempfile.TemporaryDirectory(prefix="surgeon-adapters-") as tmp:
        adapters = []
        for name in running:
            directory = Path(tmp) / name
            compiled.save_adapter(name, directory)
            _match_checkpoint_names(compiled, name, directory, names, folder)
            flag = fan_in_fan_out if fan_in_fan_out is not None else _layout(states[name])
            adapters.append((name, directory, flag))
        return _merge_in_sequence(folder, adapters, merge_to, allow_nonfinite, progress)


def _layout(state) -> bool | None:
    """True when every site stores its weight in x out (GPT-2's Conv1D: addmm), False when none does."""
    ops = {site.op == "addmm" for site in state.sites}
    return ops.pop() if len(ops) == 1 else None


def _match_checkpoint_names(compiled, name: str, directory: Path, names: set[str], folder: Path) -> None:
    """Checkpoints written without the model's base prefix (GPT-2's `h.0...` for `transformer.h.0...`):
    rename the saved adapter's module paths to the checkpoint's names, as transformers maps them on loading."""
    paths = [site.path for site in compiled.adapters[name].sites]
    if all(f"{p}.weight" in names for p in paths):
        return
    prefix = getattr(compiled.original, "base_model_prefix", "") or ""
    renamed = {p: p[len(prefix) + 1:] for p in paths if prefix and p.startswith(prefix + ".")}
    if not renamed or not all(f"{renamed.get(p, p)}.weight" in names for p in paths):
        return   # merge_checkpoint names the first module it cannot find
    from .adapter_io import load_adapter_dir, save_adapter_dir

    config = json.loads((directory / "adapter_config.json").read_text())
    if "quantized" in config:
        raise SurgeonError(f"{_HOW}: '{folder}' stores its tensors without the '{prefix}.' prefix; a quantized "
                           f"adapter is not renamed: merge adapter '{name}' before quantizing it")
    loaded = load_adapter_dir(directory)
    weights = {renamed.get(p, p): t for p, t in loaded.weights.items()}
    site_options = {renamed.get(p, p): o for p, o in loaded.site_options.items()}
    shutil.rmtree(directory)
    save_adapter_dir(directory, config["name"], config["type"], config["options"], weights, site_options)


def _merge_in_sequence(folder: Path, adapters: list, merge_to: Path, allow_nonfinite: bool, progress):
    """merge_checkpoint per adapter: the first reads `folder`, each later one the previous output; every
    intermediate checkpoint is a hidden sibling of merge_to, removed when the next is written or on failure."""
    from . import merge_checkpoint as mc

    source, made = folder, []
    try:
        for i, (name, directory, flag) in enumerate(adapters):
            last = i == len(adapters) - 1
            out = merge_to if last else merge_to.parent / f".{merge_to.name}.{mc._run_tag()}.step{i + 1}.tmp"
            if progress:
                progress(f"merging adapter '{name}' into {'merge_to' if last else 'an intermediate checkpoint'} "
                         f"'{out}', tensor by tensor")
            if not last:
                shutil.rmtree(out, ignore_errors=True)   # left by a killed run of this process id
            summary = mc.merge_checkpoint(source, directory, out, fan_in_fan_out=flag,
                                          allow_nonfinite=allow_nonfinite)
            if not last:
                made.append(out)
            if len(made) > 1 or (last and made):
                shutil.rmtree(made.pop(0), ignore_errors=True)
            source = out
        return summary
    finally:
        for out in made:
            shutil.rmtree(out, ignore_errors=True)
